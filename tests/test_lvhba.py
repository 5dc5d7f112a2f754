"""LV-HBA, lower-level constraints, projections and the constrained problems."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import bilevel
from bilevel import constraints, projections
from problems import constrained

# Measured to converge on the LLC toy (see paper_repro/lvhba/README.md).
LLC_SETTINGS = dict(step_size=0.003, saddle_step_size=0.003, z_step_size=0.1,
                    gamma1=10.0, gamma2=1.0, penalty_base=1.0,
                    penalty_power=0.5)
SVM_SETTINGS = dict(step_size=0.01, z_step_size=0.1, saddle_step_size=0.001,
                    gamma1=1.0, gamma2=1.0, penalty_base=0.01,
                    penalty_power=0.5)


def _scan(solver, state, num_steps, metric=None):
  def body(state, _):
    state, info = solver.step(state)
    return state, (info if metric is None else metric(state))
  return jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_steps))(
      state)


def _relative_error(instance):
  return lambda state: (jnp.linalg.norm(state.x - instance.x_star)
                        / jnp.linalg.norm(instance.x_star))


# ---------------------------------------------------------------------------
# The LLC toy: closed forms, then LV-HBA reaching x*.


def test_llc_closed_forms():
  instance = constrained.llc_toy(dim=7)
  x = jax.random.normal(jax.random.key(0), (7,))
  # The optimistic lower solution is feasible and stationary for the
  # Lagrangian with multiplier -1.
  y = instance.lower_solution(x)
  coupling = instance.problem.lower_equality_constraints
  assert abs(float(coupling(x, y)[0])) < 1e-12
  grad_y = jax.grad(instance.problem.lower, 1)(x, y, None)
  grad_c = jax.grad(lambda y_: coupling(x, y_)[0])(y)
  chex.assert_trees_all_close(
      jax.tree.map(lambda g, c: g - c, grad_y, grad_c),
      jax.tree.map(jnp.zeros_like, y), atol=1e-12)
  # Phi's gradient against central differences; x* is its minimiser.
  step = 1e-6
  fd = jnp.stack([(instance.value(x + step * e) - instance.value(x - step * e))
                  / (2 * step) for e in jnp.eye(7)])
  np.testing.assert_allclose(instance.hypergradient(x), fd, atol=1e-7)
  np.testing.assert_allclose(instance.hypergradient(instance.x_star), 0.0,
                             atol=1e-12)
  np.testing.assert_allclose(instance.x_star, -0.3)
  y1, y2 = instance.lower_solution(instance.x_star)
  np.testing.assert_allclose(y1, 0.7, atol=1e-12)
  np.testing.assert_allclose(y2, -0.4, atol=1e-12)


@pytest.mark.parametrize("as_inequalities", [False, True])
def test_lvhba_reaches_llc_solution(as_inequalities):
  instance = constrained.llc_toy(joint_projection=True,
                                 as_inequalities=as_inequalities)
  solver = bilevel.solvers.lvhba(instance.problem, **LLC_SETTINGS)
  state, errors = _scan(solver, solver.init(instance.x0, instance.y0),
                        50_000, _relative_error(instance))
  # Measured: 8e-4 (equality) and 8e-4 (two inequalities); from 1.1 at the
  # first step.
  assert float(errors[0]) > 1.0
  assert float(errors[-1]) < 1e-2
  assert float(constraints.violation(instance.problem, state.x,
                                     state.y)) < 1e-10
  inequality, equality = state.multipliers
  multiplier = (equality[0] if not as_inequalities
                else inequality[0] - inequality[1])
  # The KKT multiplier of the coupling constraint is -1.
  assert abs(float(multiplier) + 1.0) < 1e-2
  if as_inequalities:
    assert float(jnp.min(inequality)) >= 0.0


def test_lvhba_official_defaults_do_not_converge_on_llc():
  # The code's defaults (alpha 0.008, beta 0.02, eta 0.01, gamma 10,
  # c_k = 0.025 (k + 1)^0.3, u = 1000): the iteration map is unstable.
  instance = constrained.llc_toy(joint_projection=True)
  solver = bilevel.solvers.lvhba(
      instance.problem, step_size=0.008, z_step_size=0.02,
      saddle_step_size=0.01, gamma1=10.0, gamma2=10.0, penalty_base=0.025,
      penalty_power=0.3, multiplier_bound=1000.0)
  _, errors = _scan(solver, solver.init(instance.x0, instance.y0), 1500,
                    _relative_error(instance))
  assert float(jnp.max(errors[500:])) > 1.0


def test_penalized_baseline_violates_constraint_by_one_over_rho():
  instance = constrained.llc_toy(joint_projection=True)
  rho = 10.0
  problem = constraints.penalize(instance.problem, rho,
                                 drop_joint_projection=True)
  assert not problem.has_lower_constraints
  solver = bilevel.solvers.penalty(problem, upper_optimizer=0.05,
                                   lower_optimizer=0.9 / (200 * rho + 2),
                                   penalty=1000.0, num_inner_steps=10)
  state, errors = _scan(solver, solver.init(instance.x0, instance.y0), 3000,
                        _relative_error(instance))
  assert float(errors[-1]) < 1e-2
  # The penalised lower solution has 1'x + 1'y = -1/rho (multiplier -1).
  violation = float(constraints.violation(instance.problem, state.x, state.y))
  assert abs(violation - 1.0 / rho) < 0.01


# ---------------------------------------------------------------------------
# The LLSC toy.


def test_llsc_lower_solution_is_the_projection():
  instance = constrained.llsc_toy(jax.random.key(1), dim=12,
                                  num_constraints=8, num_upper_constraints=8)
  x = jax.random.normal(jax.random.key(2), (12,))
  y = instance.lower_solution(x)
  coupling = instance.problem.lower_equality_constraints
  np.testing.assert_allclose(coupling(x, y), 0.0, atol=1e-10)
  # Brute force: minimise 1/2 |x - y|^2 on A y = -H x by least squares on
  # the null space of A.
  a = jax.jacobian(coupling, 1)(x, y)
  y_particular = np.linalg.lstsq(a, -(coupling(x, y) - a @ y), rcond=None)[0]
  null = scipy.linalg.null_space(np.asarray(a))
  best = y_particular + null @ (null.T @ (np.asarray(x) - y_particular))
  np.testing.assert_allclose(y, best, atol=1e-10)
  # project_xy lands on C = {Hx + Ay = 0, Bx = 0} and is idempotent.
  px, py = instance.problem.project_xy(x, x + 1.0)
  np.testing.assert_allclose(coupling(px, py), 0.0, atol=1e-10)
  chex.assert_trees_all_close(instance.problem.project_xy(px, py), (px, py),
                              atol=1e-10)


def test_lvhba_on_llsc_tracks_the_lower_solution():
  instance = constrained.llsc_toy()
  # The official code's settings (alpha = beta = eta = 0.1, gamma1 = 0.1,
  # gamma2 = 1, c_k = (k + 1)^0.3).
  solver = bilevel.solvers.lvhba(
      instance.problem, step_size=0.1, z_step_size=0.1, saddle_step_size=0.1,
      gamma1=0.1, gamma2=1.0, penalty_base=1.0, penalty_power=0.3)

  def gap(state):
    return jnp.linalg.norm(state.y - instance.lower_solution(state.x))

  state, gaps = _scan(solver, solver.init(instance.x0, instance.y0), 5000,
                      gap)
  # Measured: the distance to y*(x) falls from 1.7 to 0.24 (step 1000) and
  # 0.20 (step 5000), shrinking with 1/c_k; Phi from 0.97 to -0.069.
  assert float(gaps[0]) > 1.0 and float(gaps[-1]) < 0.25
  assert float(gaps[-1]) < float(gaps[999])
  assert float(constraints.violation(instance.problem, state.x,
                                     state.y)) < 1e-8
  assert float(instance.value(state.x)) < float(instance.value(
      instance.x0)) - 0.5


# ---------------------------------------------------------------------------
# Projections against brute force.


def _brute_force_polyhedron(v, g, h, m=None, r=None):
  """The projection onto {G u <= h, M u = r} by enumerating active sets."""
  best = None
  for size in range(len(h) + 1):
    for active in itertools.combinations(range(len(h)), size):
      rows = [g[list(active)]] + ([m] if m is not None else [])
      rhs = [h[list(active)]] + ([r] if r is not None else [])
      a, b = np.concatenate(rows), np.concatenate(rhs)
      u = v - np.linalg.pinv(a) @ (a @ v - b) if len(b) else v
      feasible = np.all(g @ u <= h + 1e-9) and (
          m is None or np.allclose(m @ u, r, atol=1e-9))
      if feasible and (best is None or
                       np.linalg.norm(u - v) < np.linalg.norm(best - v)):
        best = u
  return best


def test_affine_projection_matches_least_squares():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, 6))
  r = rng.normal(size=3)
  project = jax.jit(projections.affine(m, r))
  v = rng.normal(size=6)
  expected = _brute_force_polyhedron(v, np.zeros((0, 6)), np.zeros(0), m, r)
  np.testing.assert_allclose(project(jnp.asarray(v)), expected, atol=1e-10)


def test_polyhedron_projection_matches_brute_force_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  n, p = 5, 6
  g = rng.normal(size=(p, n))
  inside = rng.normal(size=n)
  h = g @ inside + rng.uniform(0.0, 1.0, size=p)
  m = rng.normal(size=(1, n))
  r = m @ inside
  project = projections.polyhedron(g, h, m, r, tol=1e-10)
  points = 3.0 * rng.normal(size=(4, n))
  projected = jax.jit(jax.vmap(project))(jnp.asarray(points))
  for v, u in zip(points, projected):
    np.testing.assert_allclose(u, _brute_force_polyhedron(v, g, h, m, r),
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "qp"])
def test_svm_margin_projections_match_brute_force(kind):
  rng = np.random.default_rng(2)
  n, d = 6, 2
  features = rng.normal(size=(n, d))
  labels = np.sign(rng.normal(size=n))
  project = (constrained.svm_margin_projection(features, labels)
             if kind == "exact" else constrained.svm_margin_qp_projection(
                 features, labels, tol=1e-10, maxiter=100_000))
  g = -np.concatenate([features * labels[:, None], labels[:, None],
                       np.eye(n)], 1)
  for _ in range(3):
    params = {"w": jnp.asarray(rng.normal(size=d)),
              "b": jnp.asarray(rng.normal()),
              "xi": jnp.asarray(rng.normal(size=n) - 1.0)}
    out = jax.jit(project)(params)
    v = np.concatenate([params["w"], [params["b"]], params["xi"]])
    expected = _brute_force_polyhedron(v, g, -np.ones(n))
    got = np.concatenate([out["w"], [out["b"]], out["xi"]])
    np.testing.assert_allclose(got, expected,
                               atol=1e-10 if kind == "exact" else 1e-6)


def test_joint_projection_flattens_x_then_y():
  project_xy = projections.joint(projections.affine(np.ones((1, 5))))
  x, y = jnp.arange(2.0), {"a": jnp.ones(3)}
  px, py = project_xy(x, y)
  assert float(jnp.sum(px) + jnp.sum(py["a"])) == pytest.approx(0.0, abs=1e-12)
  # The mean of the five coordinates, 4/5, is subtracted from each.
  chex.assert_trees_all_close((px, py), (x - 0.8, {"a": y["a"] - 0.8}))


# ---------------------------------------------------------------------------
# Constraint utilities.


def test_violation_and_penalize():
  problem = bilevel.Problem(
      lambda x, y, b: jnp.sum(y ** 2), lambda x, y, b: jnp.sum((y - x) ** 2),
      lower_constraints=lambda x, y: {"c": y - 1.0},
      lower_equality_constraints=lambda x, y: jnp.sum(y, keepdims=True) - x[:1])
  x, y = jnp.array([0.5, 0.0]), jnp.array([2.0, -1.0])
  # Inequality violations [1, 0]; equality |1 - 0.5| = 0.5.
  assert float(constraints.violation(problem, x, y)) == pytest.approx(1.0)
  penalized = constraints.penalize(problem, 4.0)
  expected = problem.lower(x, y, None) + 0.5 * 4.0 * (1.0 + 0.25)
  assert float(penalized.lower(x, y, None)) == pytest.approx(float(expected))
  assert float(constraints.violation(bilevel.Problem(
      problem.upper, problem.lower), x, y)) == 0.0
  multipliers = constraints.project_multipliers(
      ({"c": jnp.array([-2.0, 5.0])}, jnp.array([-5.0])), 3.0)
  chex.assert_trees_all_close(
      multipliers, ({"c": jnp.array([0.0, 3.0])}, jnp.array([-3.0])))


# ---------------------------------------------------------------------------
# The SVM problems.


def test_svm_lower_solution_matches_scipy():
  instance = constrained.svm_hyperparameter(dataset="fourclass",
                                            num_train=60, num_val=30)
  x = instance.x0 + 3.0
  y = jax.jit(instance.lower_solution)(x)
  assert float(constraints.violation(instance.problem, x, y)) < 1e-12
  # The lower level in (w, b) with the slacks at their best.
  def reduced(u):
    params = {"w": u[:-1], "b": u[-1]}
    xi = jnp.maximum(instance.problem.lower_constraints(
        x, {**params, "xi": jnp.zeros_like(x)}), 0.0)
    return instance.problem.lower(x, {**params, "xi": xi}, None)
  result = scipy.optimize.minimize(
      jax.jit(reduced), np.zeros(3), jac=jax.jit(jax.grad(reduced)),
      method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15,
                                  "maxiter": 10_000})
  got = np.concatenate([y["w"], [y["b"]]])
  np.testing.assert_allclose(got, result.x, atol=1e-5)
  assert float(reduced(jnp.asarray(got))) <= result.fun + 1e-12


@pytest.mark.parametrize("make", [constrained.svm_hyperparameter,
                                  constrained.svm_hyper_cleaning])
def test_lvhba_on_svm_updates_x_and_stays_feasible(make):
  instance = make(dataset="breast_cancer")
  solver = bilevel.solvers.lvhba(instance.problem, **SVM_SETTINGS)
  state, info = _scan(solver, solver.init(instance.x0, instance.y0), 1000)
  # The official code never moves x (a non-in-place torch add): ours does
  # (measured: by 10 and 8 at most).
  assert float(jnp.max(jnp.abs(state.x - instance.x0))) > 1.0
  assert float(info.constraint_violation[-1]) < 1e-10
  before = instance.evaluate(instance.x0, instance.y0)
  after = instance.evaluate(state.x, state.y)
  assert float(after["val_loss"]) < float(before["val_loss"]) - 0.5
  assert float(after["val_accuracy"]) > 0.9
  if "flip_recall" in after:
    # Measured 0.81 against 0.36 at x0: the flipped samples get the
    # smallest penalties.
    assert float(after["flip_recall"]) > 0.6

def test_svm_hyper_cleaning_flips_labels():
  clean = constrained.svm_hyperparameter(dataset="fourclass")
  noisy = constrained.svm_hyper_cleaning(dataset="fourclass", label_noise=0.4)
  evaluate = noisy.evaluate(noisy.x0, noisy.y0)
  assert "flip_recall" in evaluate and "flip_recall" not in clean.evaluate(
      clean.x0, clean.y0)
  with pytest.raises(ValueError, match="label_noise"):
    constrained.svm_hyper_cleaning(label_noise=0.6)


def test_fourclass_like_is_not_linearly_separable():
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  features, labels = constrained.fourclass_like()
  assert features.shape == (862, 2)
  score = LinearSVC().fit(features[:500], labels[:500]).score(
      features[650:], labels[650:])
  assert 0.7 < score < 0.85


# ---------------------------------------------------------------------------
# The solver's contract.


def test_lvhba_step_follows_the_paper_order():
  # One step by hand on a small problem with an inequality coupling x, y.
  def upper(x, y, b):
    return jnp.sum((y - 2.0) ** 2) + jnp.sum(x ** 2)

  def lower(x, y, b):
    return 0.5 * jnp.sum((y - x) ** 2)

  def coupled(x, y):
    return y + x - 1.0

  problem = bilevel.Problem(upper, lower, lower_constraints=coupled)
  kw = dict(step_size=0.1, z_step_size=0.2, saddle_step_size=0.3, gamma1=2.0,
            gamma2=4.0, penalty_base=1.5, penalty_power=0.5)
  solver = bilevel.solvers.lvhba(problem, **kw)
  x, y = jnp.array([0.3, -0.2]), jnp.array([1.0, 0.5])
  state = solver.init(x, y)
  state = state._replace(theta=jnp.array([0.8, 0.1]),
                         multipliers=(jnp.array([0.5, 0.0]), ()),
                         z=(jnp.array([0.2, 0.3]), ()))
  new, info = solver.step(state)
  theta, lam, z = state.theta, state.multipliers[0], state.z[0]
  d_theta = (theta - x) + lam + (theta - y) / 2.0
  d_lam = -coupled(x, theta) + (lam - z) / 4.0
  theta1 = theta - 0.3 * d_theta
  lam1 = jnp.clip(lam - 0.3 * d_lam, 0.0)
  c_k = 1.5
  d_x = 2 * x / c_k + (x - y) - ((x - theta1) + lam1)
  d_y = 2 * (y - 2.0) / c_k + (y - x) - (y - theta1) / 2.0
  d_z = -(lam1 - z) / 4.0
  np.testing.assert_allclose(new.theta, theta1, rtol=1e-12)
  np.testing.assert_allclose(new.multipliers[0], lam1, rtol=1e-12)
  np.testing.assert_allclose(new.x, x - 0.1 * d_x, rtol=1e-12)
  np.testing.assert_allclose(new.y, y - 0.1 * d_y, rtol=1e-12)
  np.testing.assert_allclose(new.z[0], jnp.clip(z - 0.2 * d_z, 0.0),
                             rtol=1e-12)
  assert float(info.penalty) == pytest.approx(c_k)
  assert int(new.num_steps) == 1


def test_lvhba_vmaps_over_starting_points():
  instance = constrained.llc_toy(dim=5, joint_projection=True)
  solver = bilevel.solvers.lvhba(instance.problem, **LLC_SETTINGS)
  starts = jnp.stack([instance.x0, -instance.x0])
  states = jax.vmap(lambda x: solver.init(x, instance.y0))(starts)
  stepped, _ = jax.jit(jax.vmap(solver.step))(states)
  for i in range(2):
    single, _ = solver.step(solver.init(starts[i], instance.y0))
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], stepped.x),
                                single.x, rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma1=0.0), "gamma1"),
    (dict(gamma2=-1.0), "gamma2"),
    (dict(multiplier_bound=0.0), "multiplier_bound"),
    (dict(penalty_power=0.0), "penalty_power"),
    (dict(penalty_base=-1.0), "penalty_base"),
    (dict(saddle_step_size=-0.1), "saddle_step_size"),
])
def test_lvhba_rejects_bad_hyperparameters(kwargs, match):
  instance = constrained.llc_toy(dim=3)
  with pytest.raises(ValueError, match=match):
    bilevel.solvers.lvhba(instance.problem, **kwargs)


def test_lvhba_oracle_calls():
  solver = bilevel.solvers.lvhba(constrained.llc_toy(dim=3).problem)
  assert solver.oracle_calls == bilevel.OracleCalls(1, 3, 0, 0)
