"""First-order methods: the penalty method, F2SA, BOME, and their problems."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems
from conformance.quadratics import quadratic


def _relative_error(x, x_star):
  return float(jnp.linalg.norm(x - x_star) / jnp.linalg.norm(x_star))


@functools.lru_cache(maxsize=None)
def _quadratic():
  return problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                            condition_number=10.0)


@functools.lru_cache(maxsize=None)
def _least_squares():
  return problems.underdetermined_least_squares(jax.random.key(0))


def _penalty_run(instance, weight, *, num_steps=1000, upper=0.1,
                 num_inner_steps=20):
  solver = bilevel.solvers.penalty(
      instance.problem, upper_optimizer=upper, lower_optimizer=0.5,
      penalty=weight, num_inner_steps=num_inner_steps)
  return bilevel.run(solver, instance.x0, instance.y0, num_steps=num_steps)


class TestProblems:

  def test_least_squares_closed_forms(self):
    instance = _least_squares()
    x = jnp.linspace(-1.0, 1.0, 5)
    y = instance.lower_solution(x)
    # y*(x) minimises g (A y = x) ...
    grad_y_g = jax.grad(instance.problem.lower, 1)(x, y, None)
    assert float(jnp.linalg.norm(grad_y_g)) < 1e-12
    # ... and is the solution closest to the upper target: grad_y f is
    # orthogonal to the solution set (in the row space of A).
    grad_y_f = jax.grad(instance.problem.upper, 1)(x, y, None)
    step = 1e-3 * jax.random.normal(jax.random.key(1), (12,))
    a = jax.jacobian(lambda y_: jax.grad(instance.problem.lower, 0)(
        jnp.zeros(5), y_, None))(y)  # -A
    null_step = step - jnp.linalg.pinv(a) @ (a @ step)
    assert abs(float(grad_y_f @ null_step)) < 1e-12
    value = lambda x_: instance.problem.upper(x_, instance.lower_solution(
        x_), None)
    np.testing.assert_allclose(instance.value(x), value(x), rtol=1e-12)
    np.testing.assert_allclose(instance.hypergradient(x),
                               jax.grad(value)(x), rtol=1e-10, atol=1e-12)
    assert float(jnp.linalg.norm(instance.hypergradient(
        instance.x_star))) < 1e-12

  def test_box_solution_is_on_the_boundary_and_inside(self):
    instance = problems.box_constrained(jax.random.key(0), dim=30)
    x_star = instance.x_star
    assert int(jnp.sum(x_star == 0.0)) > 0
    assert int(jnp.sum(x_star == 1.0)) > 0
    assert int(jnp.sum((x_star > 0) & (x_star < 1))) > 0
    # x* minimises Phi: no coordinate move of 1e-3 lowers it.
    for i in range(30):
      for sign in (-1.0, 1.0):
        moved = x_star.at[i].add(sign * 1e-3)
        assert float(instance.value(moved)) >= float(
            instance.value(x_star)) - 1e-15

  def test_sphere_closed_forms(self):
    instance = problems.sphere_lower_level(jax.random.key(0))
    x = jnp.array([1.7])
    y = instance.lower_solution(x)
    # On the sphere |y|^2 = x, and the closest point to b on it.
    np.testing.assert_allclose(jnp.sum(y ** 2), 1.7, rtol=1e-12)
    grad_y_f = jax.grad(instance.problem.upper, 1)(x, y, None)
    tangent = grad_y_f - (grad_y_f @ y) / (y @ y) * y
    assert float(jnp.linalg.norm(tangent)) < 1e-12
    value = lambda x_: instance.problem.upper(x_, instance.lower_solution(
        x_), None)
    np.testing.assert_allclose(instance.value(x), value(x), rtol=1e-12)
    assert abs(float(instance.hypergradient(instance.x_star)[0])) < 1e-10
    # g is nonconvex in y: its Hessian at y = 0 is -x/2 times the identity.
    hessian = jax.hessian(instance.problem.lower, 1)(x, jnp.zeros(5), None)
    assert float(jnp.max(jnp.linalg.eigvalsh(hessian))) < 0

  @pytest.mark.parametrize("builder, kwargs", [
      (problems.underdetermined_least_squares, dict(dim_x=5, dim_y=5)),
      (problems.underdetermined_least_squares, dict(rho=0.0)),
      (problems.box_constrained, dict(rho=-1.0)),
      (problems.box_constrained, dict(low=1.0, high=0.0)),
      (problems.sphere_lower_level, dict(x_min=0.0)),
      (problems.sphere_lower_level, dict(dim=1)),
  ])
  def test_bad_arguments(self, builder, kwargs):
    with pytest.raises(ValueError):
      builder(**kwargs)


class TestPenalty:

  @pytest.mark.parametrize("name", ["quadratic", "least_squares"])
  def test_gap_to_the_solution_shrinks_like_one_over_penalty(self, name):
    instance = _quadratic() if name == "quadratic" else _least_squares()
    upper = 1.0 if name == "quadratic" else 0.1
    errors = {weight: _relative_error(
        _penalty_run(instance, weight, upper=upper, num_steps=2000).x,
        instance.x_star) for weight in (10.0, 100.0)}
    # O(1/lambda): ten times the penalty, about a tenth of the error.
    assert 7.0 < errors[10.0] / errors[100.0] < 13.0, errors
    assert errors[100.0] < 0.02, errors

  def test_reaches_optimistic_solution_where_implicit_methods_fail(self):
    instance = _least_squares()
    result = _penalty_run(instance, None, num_steps=2000)  # default schedule
    assert _relative_error(result.x, instance.x_star) < 1e-2
    # SOBA keeps y on the solution reached from y0 (the row space of A),
    # which minimises another hyper-objective.
    soba = bilevel.solvers.soba(instance.problem, upper_optimizer=0.1,
                                lower_optimizer=0.5, linear_optimizer=0.5)
    other = bilevel.run(soba, instance.x0, instance.y0, num_steps=2000)
    assert _relative_error(other.x, instance.x_star) > 0.3
    # AID's conjugate gradients on the singular lower Hessian blow up.
    aid = bilevel.solvers.aid(instance.problem, upper_optimizer=0.1,
                              lower_optimizer=0.5)
    with pytest.raises(bilevel.DivergenceError):
      bilevel.run(aid, instance.x0, instance.y0, num_steps=2000)

  @pytest.mark.parametrize("seed", [0, 1])
  def test_nonconvex_lower_level_gap_shrinks_like_one_over_penalty(self,
                                                                  seed):
    instance = problems.sphere_lower_level(jax.random.key(seed))
    errors = {}
    for weight in (10.0, 100.0):
      solver = bilevel.solvers.penalty(
          instance.problem, upper_optimizer=0.1, lower_optimizer=0.2,
          penalty=weight, num_inner_steps=20)
      result = bilevel.run(solver, instance.x0, instance.y0, num_steps=1500)
      errors[weight] = _relative_error(result.x, instance.x_star)
      # The penalised point reaches the optimistic lower solution, not just
      # any point of the sphere.
      distance = jnp.linalg.norm(result.y_penalized
                                 - instance.lower_solution(result.x))
      assert float(distance) < 0.2 / weight
    assert 7.0 < errors[10.0] / errors[100.0] < 13.0, errors
    assert errors[100.0] < 1e-3
    # SOBA follows the lower gradient flow, which keeps y0's direction.
    soba = bilevel.solvers.soba(instance.problem, upper_optimizer=0.1,
                                lower_optimizer=0.2, linear_optimizer=0.2)
    other = bilevel.run(soba, instance.x0, instance.y0, num_steps=3000)
    assert _relative_error(other.x, instance.x_star) > 0.05

  def test_box_constrained_iterates_stay_feasible_and_reach_x_star(self):
    instance = problems.box_constrained(jax.random.key(0))
    solver = bilevel.solvers.penalty(
        instance.problem,
        upper_optimizer=optax.exponential_decay(0.5, 100, 0.5),
        lower_optimizer=0.5, penalty=1000.0, num_inner_steps=30)
    state = solver.init(instance.x0, instance.y0)
    step = jax.jit(solver.step)
    for _ in range(1000):
      state, info = step(state)
      for variable in (state.y, state.y_penalized):
        assert float(jnp.min(variable)) >= 0.0
        assert float(jnp.max(variable)) <= 1.0
    # Error O(1/lambda) = 5e-4 here, active and inactive coordinates alike.
    assert float(jnp.max(jnp.abs(state.x - instance.x_star))) < 2e-3
    assert float(info.lower_gap) >= -1e-12

  def test_projection_of_x(self):
    instance = _quadratic()
    problem = bilevel.Problem(
        instance.problem.upper, instance.problem.lower,
        project_x=lambda x: optax.projections.projection_box(x, -0.1, 0.1))
    solver = bilevel.solvers.penalty(problem, upper_optimizer=1.0,
                                     lower_optimizer=1.0, penalty=10.0)
    result = bilevel.run(solver, instance.x0 * 0.0, instance.y0,
                         num_steps=50)
    assert float(jnp.max(jnp.abs(result.x))) <= 0.1

  def test_info_and_oracle_calls(self):
    instance = _quadratic()
    solver = bilevel.solvers.penalty(instance.problem, upper_optimizer=1.0,
                                     lower_optimizer=1.0, penalty=50.0,
                                     num_inner_steps=7)
    assert solver.oracle_calls == bilevel.OracleCalls(
        upper_grads=8, lower_grads=16, hvps=0, cross_products=0)
    result = bilevel.run(solver, instance.x0, instance.y0, num_steps=300)
    np.testing.assert_allclose(result.history.penalty, 50.0)
    # y_penalized minimises f/lambda + g, y minimises g:
    # 0 <= g(y_penalized) - g(y) = O(1/lambda).
    gap = float(result.history.lower_gap[-1])
    assert 0.0 <= gap < 1.0 / 50.0
    # The hypergradient is that of psi_lambda at a stationary point: ~0.
    assert float(result.history.hypergradient_norm[-1]) < 1e-8

  def test_hypergradient_matches_the_exact_one_as_penalty_grows(self):
    instance = _quadratic()
    x = instance.x0 + 0.3
    exact = jax.grad(instance.value)(x)
    errors = []
    for weight in (10.0, 100.0, 1000.0):
      solver = bilevel.solvers.penalty(instance.problem, upper_optimizer=1.0,
                                       lower_optimizer=1.0, penalty=weight,
                                       num_inner_steps=2000)
      state = solver.init(x, instance.y0)
      _, info = solver.step(state)
      # Recompute h_k at the converged inner iterates from the state.
      new_state, _ = solver.step(state)
      hypergradient, _, _ = bilevel.solvers._penalty.penalty_hypergradient(
          instance.problem, x, new_state.y_penalized, new_state.y, weight,
          None, None)
      errors.append(float(jnp.linalg.norm(hypergradient - exact)))
    assert errors[1] < errors[0] / 7 and errors[2] < errors[1] / 7, errors

  def test_schedule(self):
    schedule = bilevel.solvers.penalty_schedule(2.0, 200.0, 100)
    np.testing.assert_allclose(schedule(0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(50), 20.0, rtol=1e-5)
    np.testing.assert_allclose(schedule(100), 200.0, rtol=1e-5)
    np.testing.assert_allclose(schedule(1000), 200.0, rtol=1e-5)
    with pytest.raises(ValueError, match="must be >= initial"):
      bilevel.solvers.penalty_schedule(10.0, 1.0)

  @pytest.mark.parametrize("kwargs, error, match", [
      (dict(num_inner_steps=0), ValueError, "num_inner_steps must be "
       "positive"),
      (dict(penalty=-1.0), ValueError, "penalty must be positive"),
      (dict(penalty=optax.sgd(0.1)), TypeError, "penalty is a step size"),
      (dict(lower_optimizer="fast"), TypeError, "lower_optimizer must be"),
  ])
  def test_bad_hyperparameters(self, kwargs, error, match):
    with pytest.raises(error, match=match):
      bilevel.solvers.penalty(_quadratic().problem, **kwargs)

  def test_refuses_coupled_lower_constraints(self):
    problem = bilevel.Problem(_quadratic().problem.upper,
                              _quadratic().problem.lower,
                              lower_constraints=lambda x, y: y - 1.0)
    with pytest.raises(ValueError, match="cannot handle lower-level"):
      bilevel.solvers.penalty(problem)

  def test_stochastic_deterministic_given_key_and_jittable(self):
    instance = problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                                  condition_number=10.0, num_samples=256,
                                  batch_size=16)
    solver = bilevel.solvers.penalty(instance.problem, upper_optimizer=0.3,
                                     lower_optimizer=0.5, penalty=10.0)
    runs = [bilevel.run(solver, instance.x0, instance.y0, instance.data,
                        num_steps=200, key=jax.random.key(3))
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].x, runs[1].x)
    start = _relative_error(instance.x0, instance.x_star)
    assert _relative_error(runs[0].x, instance.x_star) < 0.3 * start


def _stationary_point_of_psi(q, weight):
  """The stationary point of psi_lambda on a conformance quadratic (NumPy).

  With ``g = y'Ay/2 - y'(Bx + b)`` and ``f = |Cy - d|^2/2 + r|x|^2/2``:
  ``y_lambda = (lambda A + C'C)^-1 (lambda (Bx + b) + C'd)``, ``z* = A^-1
  (Bx + b)`` and ``grad psi_lambda = r x - lambda B' (y_lambda - z*)``,
  affine in ``x``.
  """
  a_inv = np.linalg.inv(q.A)
  k = np.linalg.inv(weight * q.A + q.C.T @ q.C)
  slope = q.r * np.eye(q.B.shape[1]) - weight * q.B.T @ (
      weight * k @ q.B - a_inv @ q.B)
  offset = -weight * q.B.T @ (k @ (weight * q.b + q.C.T @ q.d) - a_inv @ q.b)
  return np.linalg.solve(slope, -offset)


def _quadratic_error(q, x):
  return float(np.linalg.norm(np.asarray(x) - q.x_star)
               / np.linalg.norm(q.x_star))


class TestBiasAndDefaults:
  """The numbers the docstrings of bilevel.solvers._penalty state."""

  @pytest.mark.parametrize("kappa, weight, stated", [
      (2.0, 100.0, 1.6e-2), (2.0, 1e4, 1.7e-4), (10.0, 1e3, 4.1e-3),
      (100.0, 100.0, 1.9e-1), (100.0, 1e3, 2.3e-2), (100.0, 1e4, 2.3e-3)])
  def test_bias_table(self, kappa, weight, stated):
    q = quadratic(kappa)
    error = _quadratic_error(q, _stationary_point_of_psi(q, weight))
    np.testing.assert_allclose(error, stated, rtol=0.05)
    # c / lambda: between 0.1 / (lambda mu) and 0.9 / (lambda mu).
    if weight > 100.0:
      assert 0.1 < error * weight / kappa < 0.9

  def test_penalty_defaults_reach_x_star(self):
    q = quadratic(100.0)
    solver = bilevel.solvers.penalty(q.problem)
    result = bilevel.run(solver, jnp.asarray(q.x0), jnp.asarray(q.y0),
                         num_steps=5000)
    assert _quadratic_error(q, result.x) < 3e-3
    # ... because it converged to the stationary point of psi at the final
    # penalty 1e4 (measured 2.32e-3 from x*).
    closed_form = _stationary_point_of_psi(q, 1e4)
    assert float(np.linalg.norm(np.asarray(result.x) - closed_form)) < (
        1e-3 * float(np.linalg.norm(closed_form - q.x_star)))

  def test_penalty_momentum_default_and_stated_setting(self):
    q = quadratic(100.0)
    x0, y0 = jnp.asarray(q.x0), jnp.asarray(q.y0)
    default = bilevel.run(bilevel.solvers.penalty_momentum(q.problem), x0,
                          y0, num_steps=5000)
    # The default ends near its bias 23 / 1e3 (stated: 2.4e-2) ...
    assert 0.02 < _quadratic_error(q, default.x) < 0.03
    # ... and the stated setting reaches 23 / 1e4 (stated: 2.4e-3).
    solver = bilevel.solvers.penalty_momentum(
        q.problem, penalty=bilevel.solvers.penalty_schedule(10.0, 1e4, 5000))
    result = bilevel.run(solver, x0, y0, num_steps=15000)
    assert _quadratic_error(q, result.x) < 3e-3

  @pytest.mark.parametrize("name", ["penalty", "penalty_momentum"])
  def test_default_initial_penalty_keeps_the_inner_steps_stable(self, name):
    # f is 3.9-smooth in y: from lambda_0 = 1 the steps of 0.5 on f + g
    # diverged (the double loop's hypergradient reached 1e19), from the
    # default lambda_0 = 10 they do not.
    q = quadratic(2.0)
    assert np.linalg.eigvalsh(q.C.T @ q.C)[-1] > 3.0
    solver = getattr(bilevel.solvers, name)(q.problem)
    result = bilevel.run(solver, jnp.asarray(q.x0), jnp.asarray(q.y0),
                         num_steps=300)
    np.testing.assert_allclose(result.history.penalty[0], 10.0, rtol=1e-6)
    assert float(jnp.max(result.history.hypergradient_norm)) < 10.0
    assert _quadratic_error(q, result.x) < 0.1


def _tree_close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


class TestF2SA:

  def test_steps_follow_the_paper_pseudocode_and_schedules(self):
    instance = _quadratic()
    problem = instance.problem
    eta0, gamma0, lambda0, offset = 0.2, 0.4, 5.0, 3.0
    solver = bilevel.solvers.f2sa(problem, upper_step_size=eta0,
                                  lower_step_size=gamma0, penalty=lambda0,
                                  num_inner_steps=2, schedule_offset=offset)
    state = solver.init(instance.x0, instance.y0)
    # The paper's names: its y is state.y_penalized, its z is state.y.
    x, y, z = instance.x0, instance.y0, instance.y0
    grad = lambda fun, arg: jax.grad(fun, arg)
    for k in range(6):
      s = 1.0 + k / offset
      lam = lambda0 * s ** (1 / 7)
      gamma = gamma0 * s ** (-4 / 7)
      alpha = gamma / lam
      for _ in range(2):
        z_new = z - gamma * grad(problem.lower, 1)(x, z, None)
        y = y - alpha * (grad(problem.upper, 1)(x, y, None)
                         + lam * grad(problem.lower, 1)(x, y, None))
        z = z_new
      h = grad(problem.upper, 0)(x, y, None) + lam * (
          grad(problem.lower, 0)(x, y, None)
          - grad(problem.lower, 0)(x, z, None))
      x = x - eta0 * s ** (-5 / 7) * h
      state, info = solver.step(state)
      # The schedules are computed in float32.
      np.testing.assert_allclose(info.penalty, lam, rtol=1e-6)
      np.testing.assert_allclose(state.x, x, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.y_penalized, y, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.y, z, rtol=1e-5, atol=1e-6)

  def test_larger_initial_penalty_smaller_bias(self):
    instance = _quadratic()
    errors = [_relative_error(bilevel.run(
        bilevel.solvers.f2sa(instance.problem, penalty=weight),
        instance.x0, instance.y0, num_steps=2000).x, instance.x_star)
              for weight in (1.0, 10.0, 100.0)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 0.05, errors

  def test_stochastic_run(self):
    instance = problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                                  condition_number=10.0, num_samples=256,
                                  batch_size=16)
    solver = bilevel.solvers.f2sa(instance.problem)
    result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                         num_steps=2000, key=jax.random.key(0))
    assert _relative_error(result.x, instance.x_star) < 0.15
    assert solver.oracle_calls == bilevel.OracleCalls(11, 22, 0, 0)

  @pytest.mark.parametrize("kwargs, match", [
      (dict(penalty=0.0), "penalty must be positive"),
      (dict(penalty_power=1.5), r"penalty_power must lie in \[0.0, 1.0\)"),
      (dict(num_inner_steps=0), "num_inner_steps must be positive"),
  ])
  def test_bad_hyperparameters(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      bilevel.solvers.f2sa(_quadratic().problem, **kwargs)


class TestBOME:

  def test_one_step_is_the_dynamic_barrier_step(self):
    instance = _quadratic()
    problem = instance.problem
    x, y = instance.x0 + 0.5, instance.y0
    solver = bilevel.solvers.bome(problem, step_size=0.1,
                                  lower_optimizer=0.5, num_lower_steps=3,
                                  eta=0.5)
    state, info = solver.step(solver.init(x, y))
    y_hat = y
    for _ in range(3):
      y_hat = y_hat - 0.5 * jax.grad(problem.lower, 1)(x, y_hat, None)
    grad_f = jax.grad(problem.upper, (0, 1))(x, y, None)
    grad_q = jax.grad(lambda x_, y_: problem.lower(x_, y_, None)
                      - problem.lower(x_, y_hat, None), (0, 1))(x, y)
    norm2 = sum(float(jnp.sum(g * g)) for g in grad_q)
    inner = sum(float(jnp.sum(a * b)) for a, b in zip(grad_f, grad_q))
    multiplier = max(0.5 * norm2 - inner, 0.0) / norm2
    np.testing.assert_allclose(info.multiplier, multiplier, rtol=1e-10)
    _tree_close(state.x, x - 0.1 * (grad_f[0] + multiplier * grad_q[0]))
    _tree_close(state.y_penalized,
                y - 0.1 * (grad_f[1] + multiplier * grad_q[1]))
    # The joint direction decreases q at rate phi = eta |grad q|^2 (or
    # faster, when the multiplier is 0).
    direction = [f_ + multiplier * q_ for f_, q_ in zip(grad_f, grad_q)]
    rate = sum(float(jnp.sum(d * q_)) for d, q_ in zip(direction, grad_q))
    assert rate >= 0.5 * norm2 - 1e-9

  def test_bias_shrinks_with_the_step(self):
    instance = _quadratic()
    errors, gaps = [], []
    for step_size in (0.05, 0.02):
      solver = bilevel.solvers.bome(instance.problem, step_size=step_size,
                                    num_lower_steps=100)
      result = bilevel.run(solver, instance.x0, instance.y0, num_steps=4000)
      errors.append(_relative_error(result.x, instance.x_star))
      gaps.append(float(result.history.lower_gap[-1]))
    start = _relative_error(instance.x0, instance.x_star)
    assert errors[1] < 0.6 * errors[0] and errors[0] < 0.1 * start, errors
    assert gaps[1] < 0.5 * gaps[0], gaps

  @pytest.mark.parametrize("kwargs, error, match", [
      (dict(control="hessian"), ValueError, "control must be one of"),
      (dict(eta=-1.0), ValueError, "eta must be positive"),
      (dict(step_size=optax.sgd(0.1)), TypeError, "step_size is a step size"),
      (dict(num_lower_steps=0), ValueError, "num_lower_steps must be"),
  ])
  def test_bad_hyperparameters(self, kwargs, error, match):
    with pytest.raises(error, match=match):
      bilevel.solvers.bome(_quadratic().problem, **kwargs)


class TestPenaltyMomentum:

  @pytest.mark.parametrize("weight", [10.0, 100.0])
  def test_same_fixed_point_as_the_double_loop(self, weight):
    instance = _quadratic()
    single = bilevel.solvers.penalty_momentum(
        instance.problem, upper_optimizer=0.1, lower_optimizer=0.5,
        penalty=weight, momentum=0.3)
    result = bilevel.run(single, instance.x0, instance.y0, num_steps=5000)
    double = _penalty_run(instance, weight, upper=1.0, num_steps=1000)
    np.testing.assert_allclose(result.x, double.x, rtol=1e-6, atol=1e-8)

  def test_storm_estimate_of_one_step(self):
    from bilevel import _data
    instance = problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                                  condition_number=10.0, num_samples=256,
                                  batch_size=16)
    problem, data, a = instance.problem, instance.data, 0.25
    weights = {0: 7.0, 1: 11.0}  # the penalty changes between the steps
    solver = bilevel.solvers.penalty_momentum(
        problem, upper_optimizer=0.1, lower_optimizer=0.3,
        penalty=lambda k: jnp.where(k == 0, weights[0], weights[1]),
        momentum=a)
    state0 = solver.init(instance.x0, instance.y0 + 0.1,
                         key=jax.random.key(2), data=data)
    state1, _ = solver.step(state0, data)
    state2, _ = solver.step(state1, data)
    upper_batch, sampler = _data.sample(state1.sampler, data, "upper")
    lower_batch, _ = _data.sample(sampler, data, "lower")

    def oracles(x, y_penalized, y):
      fx, fy = jax.grad(problem.upper, (0, 1))(x, y_penalized, upper_batch)
      gx_p, gy_p = jax.grad(problem.lower, (0, 1))(x, y_penalized,
                                                   lower_batch)
      gx_y, gy_y = jax.grad(problem.lower, (0, 1))(x, y, lower_batch)
      return fx, gx_p, gx_y, fy, gy_p, gy_y

    now = oracles(state1.x, state1.y_penalized, state1.y)
    before = oracles(state0.x, state0.y_penalized, state0.y)
    expected = [d + (1 - a) * (old - prev) for d, old, prev in zip(
        now, state1.estimates, before)]
    for got, want in zip(state2.estimates, expected):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # ... the correction is not zero (the sample changed) ...
    assert max(float(jnp.max(jnp.abs(old - prev))) for old, prev in zip(
        state1.estimates, before)) > 1e-6
    # ... and the steps combine the estimates with the step's penalty.
    fx, gx_p, gx_y, fy, gy_p, gy_y = expected
    lam = weights[1]
    np.testing.assert_allclose(state2.x, state1.x - 0.1 * (
        fx + lam * (gx_p - gx_y)), rtol=1e-12)
    np.testing.assert_allclose(state2.y_penalized, state1.y_penalized - 0.3 * (
        fy / lam + gy_p), rtol=1e-12)
    np.testing.assert_allclose(state2.y, state1.y - 0.3 * gy_y, rtol=1e-12)

  def test_exact_directions_while_the_penalty_grows(self):
    # Deterministic oracles: every STORM estimate is the exact gradient, so
    # the directions are the exact ones for the current lambda, even as
    # lambda grows from 1 to 100 over 200 steps. (One estimate of the
    # combined directions lagged by 7% at step 10 and 25% at step 199.)
    q = quadratic(10.0, dim_x=10, dim_y=8)
    problem = q.problem
    schedule = bilevel.solvers.penalty_schedule(1.0, 100.0, 200)
    upper_step, lower_step = 0.1, 0.5
    solver = bilevel.solvers.penalty_momentum(
        problem, upper_optimizer=upper_step, lower_optimizer=lower_step,
        penalty=schedule, momentum=0.1)
    step = jax.jit(solver.step)
    state = solver.init(jnp.asarray(q.x0), jnp.asarray(q.y0))
    checked = []
    for k in range(200):
      new_state, info = step(state)
      if k in (10, 199):
        x, y_p, y = state.x, state.y_penalized, state.y
        lam = schedule(k)
        np.testing.assert_allclose(info.penalty, lam, rtol=1e-15)
        fx, fy = jax.grad(problem.upper, (0, 1))(x, y_p, None)
        gx_p, gy_p = jax.grad(problem.lower, (0, 1))(x, y_p, None)
        gx_y, gy_y = jax.grad(problem.lower, (0, 1))(x, y, None)
        exact = (fx + lam * (gx_p - gx_y), fy / lam + gy_p, gy_y)
        # The directions the steps took, read off the iterates ...
        used = ((x - new_state.x) / upper_step,
                (y_p - new_state.y_penalized) / lower_step,
                (y - new_state.y) / lower_step)
        # ... and the solver's own combination of its estimates.
        combined = bilevel.solvers._penalty.penalty_directions(
            new_state.estimates, lam)
        for want, got, mine in zip(exact, used, combined):
          scale = float(jnp.linalg.norm(want))
          assert float(jnp.linalg.norm(got - want)) < 1e-12 * max(scale, 1)
          assert float(jnp.linalg.norm(mine - want)) < 1e-12 * max(scale, 1)
          assert scale > 1e-3  # not trivially zero
        checked.append(k)
      state = new_state
    assert checked == [10, 199]
    assert float(schedule(199)) > 90.0

  def test_checkpointed_run_resumes_bit_identically(self, tmp_path):
    instance = problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                                  num_samples=64, batch_size=8)
    solver = bilevel.solvers.penalty_momentum(
        instance.problem, penalty=bilevel.solvers.penalty_schedule(
            1.0, 100.0, 20))

    def run(num_steps, **kwargs):
      return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                         num_steps=num_steps, key=jax.random.key(3),
                         steps_per_chunk=5, **kwargs)

    whole = run(30)
    run(15, checkpoint_dir=tmp_path)
    resumed = run(30, checkpoint_dir=tmp_path)
    chex.assert_trees_all_equal(resumed.state, whole.state)
    chex.assert_trees_all_equal(resumed.history, whole.history)
    assert isinstance(resumed.state.estimates,
                      bilevel.solvers._penalty.PenaltyOracles)

  def test_vmap_over_momentum_matches_separate_runs(self):
    instance = problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                                  num_samples=64, batch_size=8)

    def final_x(momentum):
      solver = bilevel.solvers.penalty_momentum(
          instance.problem, momentum=momentum,
          penalty=bilevel.solvers.penalty_schedule(1.0, 100.0, 20))
      return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                         num_steps=40, key=jax.random.key(3)).x

    momenta = jnp.array([0.1, 1.0])
    batched = jax.jit(jax.vmap(final_x))(momenta)
    for i, momentum in enumerate([0.1, 1.0]):
      np.testing.assert_allclose(batched[i], final_x(momentum), rtol=1e-12,
                                 atol=1e-14)
    assert float(jnp.max(jnp.abs(batched[0] - batched[1]))) > 1e-6

  def test_box_iterates_feasible(self):
    instance = problems.box_constrained(jax.random.key(0))
    solver = bilevel.solvers.penalty_momentum(
        instance.problem, upper_optimizer=optax.exponential_decay(
            0.3, 200, 0.5), lower_optimizer=0.5, penalty=100.0)
    state = solver.init(instance.x0, instance.y0)
    step = jax.jit(solver.step)
    for _ in range(2000):
      state, _ = step(state)
      for variable in (state.y, state.y_penalized):
        assert 0.0 <= float(jnp.min(variable))
        assert float(jnp.max(variable)) <= 1.0
    assert float(jnp.max(jnp.abs(state.x - instance.x_star))) < 2e-2

  @pytest.mark.parametrize("momentum", [0.0, 1.5, -0.1])
  def test_bad_momentum(self, momentum):
    with pytest.raises(ValueError, match="momentum must"):
      bilevel.solvers.penalty_momentum(_quadratic().problem,
                                       momentum=momentum)
