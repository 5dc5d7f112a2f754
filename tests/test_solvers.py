"""One suite for every solver: optimum, transformations, tracing, dtypes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems

# Hyperparameters with which each solver reaches x* to 1e-3 on the
# deterministic quadratic below (condition number 10). ITD and StocBiO are
# biased by truncation, (1 - eta mu)^K: they need K around 100 at eta = 1.
ACCURATE = {
    "aid": dict(upper_optimizer=1.0, lower_optimizer=1.0),
    "itd": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                num_lower_steps=100),
    "stocbio": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                    neumann_step_size=1.0, num_neumann_terms=100),
    "soba": dict(upper_optimizer=0.5, lower_optimizer=1.0,
                 linear_optimizer=1.0),
    "amigo": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                  linear_optimizer=1.0),
    # Normalized steps have length eta: they reach x* only as eta decays.
    "borep": dict(upper_step_size=optax.schedules.exponential_decay(
        0.3, 50, 0.4), lower_optimizer=1.0, linear_optimizer=1.0),
    "ma_soba": dict(upper_step_size=0.5, lower_optimizer=1.0,
                    linear_optimizer=1.0),
}
# TTSA's random truncation and decaying steps reach x* only slowly; its own
# tests (tests/test_borep.py) check the estimator's mean and its progress.
SLOW = {"ttsa": dict(neumann_step_size=0.5, num_neumann_terms=10),
        # A penalty method: O(1/alpha) from x*, checked in
        # tests/test_scalebio.py.
        "scalebio": dict(upper_optimizer=0.5, lower_optimizer=0.01,
                         penalty=100.0)}
SOLVERS = sorted(ACCURATE) + sorted(SLOW)
SETTINGS = {**ACCURATE, **SLOW}
# The argument that sets the upper step size.
UPPER = {"borep": "upper_step_size", "ma_soba": "upper_step_size"}


def _relative_error(x, x_star):
  return float(jnp.linalg.norm(x - x_star) / jnp.linalg.norm(x_star))


@functools.lru_cache(maxsize=None)
def _deterministic():
  return problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                            condition_number=10.0)


@functools.lru_cache(maxsize=None)
def _stochastic():
  return problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                            condition_number=10.0, num_samples=256,
                            batch_size=16)


@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_reaches_closed_form_optimum(name):
  instance = _deterministic()
  solver = getattr(bilevel.solvers, name)(instance.problem, **SETTINGS[name])
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=600)
  assert _relative_error(result.x, instance.x_star) <= 1e-3
  np.testing.assert_allclose(result.y, instance.lower_solution(result.x),
                             atol=1e-4)
  assert result.history.upper_loss.shape == (600,)
  assert all(bool(jnp.all(jnp.isfinite(leaf)))
             for leaf in jax.tree.leaves(result.history))


# ScaleBiO's default AdamW (the paper's) moves each coordinate of x by about
# its step size 1e-2 per step, and x* has coordinates up to 5: no run of 300
# steps can halve the error (measured 1.02 -> 0.81 in 3000 steps). Its
# convergence is tested in tests/test_scalebio.py.
@pytest.mark.parametrize("name", [n for n in SOLVERS if n != "scalebio"])
def test_defaults_make_progress_on_quadratic(name):
  instance = _deterministic()
  solver = getattr(bilevel.solvers, name)(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=300)
  start = _relative_error(instance.x0, instance.x_star)
  assert _relative_error(result.x, instance.x_star) < 0.5 * start


@pytest.mark.parametrize("name", sorted(ACCURATE))
def test_stochastic_reaches_neighbourhood(name):
  instance = _stochastic()
  schedule = optax.schedules.polynomial_schedule(
      init_value=1.0, end_value=0.05, power=1.0, transition_steps=1500)
  kwargs = dict(ACCURATE[name], upper_optimizer=schedule)
  if name in ("soba", "ma_soba"):
    kwargs["upper_optimizer"] = lambda t: 0.5 * schedule(t)
  if name == "borep":
    kwargs["upper_optimizer"] = optax.schedules.exponential_decay(
        0.2, 150, 0.7)
  kwargs[UPPER.get(name, "upper_optimizer")] = kwargs.pop("upper_optimizer")
  solver = getattr(bilevel.solvers, name)(instance.problem, **kwargs)
  result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=1500, key=jax.random.key(1))
  assert _relative_error(result.x, instance.x_star) <= 5e-2


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_over_seeds_matches_python_loop(name):
  instance = _stochastic()
  solver = getattr(bilevel.solvers, name)(instance.problem, **SETTINGS[name])
  keys = jax.random.split(jax.random.key(7), 3)

  def final_x(key):
    return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=25, key=key).x

  batched = jax.jit(jax.vmap(final_x))(keys)
  looped = jnp.stack([final_x(k) for k in keys])
  np.testing.assert_allclose(batched, looped, rtol=1e-10, atol=1e-12)
  assert not np.allclose(looped[0], looped[1])  # seeds matter


def test_vmap_over_step_sizes_builds_solver_inside():
  instance = _deterministic()

  def final_x(step_size):
    solver = bilevel.solvers.soba(instance.problem, upper_optimizer=step_size)
    return bilevel.run(solver, instance.x0, instance.y0, num_steps=20).x

  step_sizes = jnp.array([0.1, 0.3])
  batched = jax.vmap(final_x)(step_sizes)
  for i, step_size in enumerate([0.1, 0.3]):
    np.testing.assert_allclose(batched[i], final_x(step_size), rtol=1e-10)


@pytest.mark.parametrize("name", SOLVERS)
def test_step_traced_once_across_runs(name):
  instance = _stochastic()
  solver = getattr(bilevel.solvers, name)(instance.problem)
  traces = []

  def counting_step(state, data=None):
    traces.append(1)
    return solver.step(state, data)

  counting = solver._replace(step=counting_step)
  # 3 chunks of 4 steps and a last, padded chunk of 2.
  first = bilevel.run(counting, instance.x0, instance.y0, instance.data,
                      num_steps=14, key=jax.random.key(0), steps_per_chunk=4)
  assert len(traces) == 1
  second = bilevel.run(counting, instance.x0 + 1.0, instance.y0,
                       instance.data, num_steps=14, key=jax.random.key(1),
                       steps_per_chunk=4)
  assert len(traces) == 1
  assert first.history.upper_loss.shape == (14,)
  assert int(second.state.num_steps) == 14
  assert np.isnan(second.compile_seconds)  # nothing compiled
  assert second.num_timed_steps == 14


@pytest.mark.parametrize("name", SOLVERS)
def test_chunks_and_resume_give_the_same_numbers(name):
  instance = _stochastic()
  solver = getattr(bilevel.solvers, name)(instance.problem)
  key = jax.random.key(3)
  whole = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                      num_steps=12, key=key, steps_per_chunk=12)
  chunked = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                        num_steps=12, key=key, steps_per_chunk=5)
  half = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                     num_steps=6, key=key)
  resumed = bilevel.run(solver, None, None, instance.data, num_steps=6,
                        state=half.state)
  np.testing.assert_array_equal(whole.x, chunked.x)
  np.testing.assert_array_equal(whole.x, resumed.x)
  np.testing.assert_array_equal(whole.history.upper_loss,
                                chunked.history.upper_loss)


@pytest.mark.parametrize("name", SOLVERS)
def test_deterministic_given_key(name):
  instance = _stochastic()
  solver = getattr(bilevel.solvers, name)(instance.problem)
  runs = [bilevel.run(solver, instance.x0, instance.y0, instance.data,
                      num_steps=10, key=jax.random.key(5)) for _ in range(2)]
  chex.assert_trees_all_equal(runs[0].state, runs[1].state)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes_are_stable(name, dtype):
  instance = _deterministic()
  solver = getattr(bilevel.solvers, name)(instance.problem)
  x0 = instance.x0.astype(dtype)
  y0 = instance.y0.astype(dtype)
  state = solver.init(x0, y0)
  new_state, info = jax.jit(solver.step)(state, None)
  # The problem's matrices are float64, so the objectives promote float32
  # variables; the state must keep the dtypes it started with all the same.
  chex.assert_trees_all_equal_dtypes(new_state, state)
  assert new_state.x.dtype == dtype
  assert all(bool(jnp.all(jnp.isfinite(leaf)))
             for leaf in jax.tree.leaves(info))


@pytest.mark.parametrize("name", SOLVERS)
def test_float32_problem_keeps_float32(name):
  with jax.enable_x64(False):
    instance = problems.quadratic(jax.random.key(0), dim_x=6, dim_y=5)
    solver = getattr(bilevel.solvers, name)(instance.problem)
    state = solver.init(instance.x0, instance.y0)
    new_state, _ = jax.jit(solver.step)(state, None)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    assert new_state.x.dtype == jnp.float32


@pytest.mark.parametrize("name", SOLVERS)
def test_projection_keeps_x_feasible(name):
  instance = _deterministic()
  box = functools.partial(optax.projections.projection_box, lower=-0.05,
                          upper=0.05)
  problem = bilevel.Problem(instance.problem.upper, instance.problem.lower,
                            project_x=box)
  assert float(jnp.max(jnp.abs(instance.x_star))) > 0.05  # box is active
  solver = getattr(bilevel.solvers, name)(problem, **SETTINGS[name])
  seen = []
  bilevel.run(solver, instance.x0, instance.y0, num_steps=30,
              steps_per_chunk=3,
              callback=lambda step, state: seen.append(state.x))
  assert len(seen) == 10
  for x in seen:
    assert float(jnp.max(jnp.abs(x))) <= 0.05 + 1e-15


@pytest.mark.parametrize("name", SOLVERS)
def test_oracle_calls_are_declared(name):
  solver = getattr(bilevel.solvers, name)(_deterministic().problem)
  calls = solver.oracle_calls
  assert isinstance(calls, bilevel.OracleCalls)
  assert calls.upper_grads == 1 and calls.lower_grads >= 1
  assert all(isinstance(c, int) and c >= 0 for c in calls)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("kwargs", [
    dict(upper_optimizer=-1.0), dict(upper_optimizer=0.0),
    dict(lower_optimizer=-0.1), dict(upper_optimizer="fast")])
def test_bad_step_sizes_are_rejected(name, kwargs):
  kwargs = {UPPER.get(name, key) if key == "upper_optimizer" else key: value
            for key, value in kwargs.items()}
  with pytest.raises((ValueError, TypeError), match=list(kwargs)[0]):
    getattr(bilevel.solvers, name)(_deterministic().problem, **kwargs)


@pytest.mark.parametrize("name,kwargs", [
    ("aid", dict(num_lower_steps=0)), ("itd", dict(num_lower_steps=-2)),
    ("stocbio", dict(num_neumann_terms=0)),
    ("stocbio", dict(neumann_step_size=0.0)),
    ("amigo", dict(num_linear_steps=0)), ("aid", dict(num_lower_steps=2.5)),
    ("borep", dict(period=0)), ("borep", dict(num_refine_steps=1.5)),
    ("ttsa", dict(num_neumann_terms=0)), ("ttsa", dict(neumann_step_size=-1.0)),
    ("ma_soba", dict(momentum=1.0)), ("soba", dict(linear_radius=0.0))])
def test_bad_counts_are_rejected(name, kwargs):
  with pytest.raises((ValueError, TypeError), match=list(kwargs)[0]):
    getattr(bilevel.solvers, name)(_deterministic().problem, **kwargs)


@pytest.mark.parametrize("name,lower_batches_per_step", [
    ("aid", 10 + 1), ("itd", 20), ("stocbio", 10 + 10 + 1), ("soba", 1),
    ("amigo", 10 + 10 + 1), ("ma_soba", 1),
    ("borep", 100 + 1), ("scalebio", 1)])  # 100 refinement steps in init, then step 0
def test_every_oracle_draws_a_fresh_minibatch(name, lower_batches_per_step):
  """Each lower step, Neumann term or linear step reads its own batch."""
  instance = problems.quadratic(jax.random.key(0), dim_x=4, dim_y=3,
                                num_samples=10_000, batch_size=7)
  solver = getattr(bilevel.solvers, name)(instance.problem)
  state = solver.init(instance.x0, instance.y0, key=jax.random.key(0),
                      data=instance.data)
  state, _ = jax.jit(solver.step)(state, instance.data)
  assert int(state.sampler.lower.position) == 7 * lower_batches_per_step
  assert int(state.sampler.upper.position) == 7


def test_aid_cold_linear_start_ignores_the_previous_v():
  instance = _deterministic()
  one_cg = bilevel.linear_solve.cg(tol=0.0, maxiter=1)
  x_after = {}
  for warm in (True, False):
    solver = bilevel.solvers.aid(instance.problem, linear_solver=one_cg,
                                 warm_start_linear=warm)
    state = solver.init(instance.x0, instance.y0)
    far = state._replace(v=jax.tree.map(lambda v: v + 1e3, state.v))
    x_after[warm] = (solver.step(state)[0].x, solver.step(far)[0].x)
  # Cold: the solve starts from zero whatever v the state carries.
  np.testing.assert_array_equal(*x_after[False])
  # Warm: one CG iteration from a far start leaves a different v and x.
  assert float(jnp.max(jnp.abs(x_after[True][0] - x_after[True][1]))) > 1.0


def test_aid_cold_linear_start_reaches_closed_form_optimum():
  instance = _deterministic()
  solver = bilevel.solvers.aid(instance.problem, upper_optimizer=1.0,
                               lower_optimizer=1.0, warm_start_linear=False)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=600)
  assert _relative_error(result.x, instance.x_star) <= 1e-3
