"""BO-REP, its ablation MA-SOBA, and TTSA: the update rules, step by step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems


@functools.lru_cache(maxsize=None)
def _quadratic(num_samples=None, batch_size=None):
  return problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                            condition_number=10.0, num_samples=num_samples,
                            batch_size=batch_size)


def _relative_error(x, x_star):
  return float(jnp.linalg.norm(x - x_star) / jnp.linalg.norm(x_star))


def _iterates(solver, instance, num_steps, data=None, key=None):
  """States after each of ``num_steps`` steps (and the initial one)."""
  state = solver.init(instance.x0, instance.y0, key=key, data=data)
  step = jax.jit(solver.step)
  states, infos = [state], []
  for _ in range(num_steps):
    state, info = step(state, data)
    states.append(state)
    infos.append(info)
  return states, infos


def test_borep_reaches_the_closed_form_optimum():
  instance = _quadratic()
  schedule = optax.schedules.exponential_decay(0.2, 100, 0.5)
  solver = bilevel.solvers.borep(instance.problem, upper_step_size=schedule,
                                 lower_optimizer=1.0, linear_optimizer=1.0)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=1500)
  assert _relative_error(result.x, instance.x_star) <= 1e-3
  np.testing.assert_allclose(result.y, instance.lower_solution(result.x),
                             atol=1e-4)


def test_borep_stochastic_reaches_neighbourhood():
  instance = _quadratic(256, 16)
  schedule = optax.schedules.exponential_decay(0.2, 150, 0.7)
  solver = bilevel.solvers.borep(instance.problem, upper_step_size=schedule,
                                 lower_optimizer=0.5, linear_optimizer=0.5)
  result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=2000, key=jax.random.key(1))
  assert _relative_error(result.x, instance.x_star) <= 5e-2


@pytest.mark.parametrize("step_size", [0.3, 0.01])
def test_every_upper_step_has_length_eta(step_size):
  instance = _quadratic()
  # A linear upper term in x keeps the hypergradient away from zero.
  problem = bilevel.Problem(
      lambda x, y, b: instance.problem.upper(x, y, b) + jnp.sum(x),
      instance.problem.lower)
  solver = bilevel.solvers.borep(problem, upper_step_size=step_size)
  states, infos = _iterates(solver, instance, 12)
  lengths = [float(jnp.linalg.norm(b.x - a.x))
             for a, b in zip(states[:-1], states[1:])]
  np.testing.assert_allclose(lengths, step_size, rtol=1e-12)
  assert all(float(info.momentum_norm) > 0 for info in infos)


def test_momentum_is_a_moving_average_of_hypergradients():
  instance = _quadratic()
  problem = bilevel.Problem(
      lambda x, y, b: instance.problem.upper(x, y, b) + jnp.sum(x),
      instance.problem.lower)
  solver = bilevel.solvers.borep(problem, upper_step_size=0.1,
                                 momentum=0.7, period=3)
  states, _ = _iterates(solver, instance._replace(problem=problem), 6)
  momentum = jnp.zeros_like(instance.x0)
  for before, after in zip(states[:-1], states[1:]):
    # h_t from the state before the step (y after its periodic update).
    y = after.y
    _, _, cross = bilevel.derivatives.lower_hvp_and_cross(
        problem, before.x, y, before.z)
    _, grad_x_f, _ = bilevel.derivatives.upper_value_and_grads(
        problem, before.x, y)
    momentum = 0.7 * momentum + 0.3 * (grad_x_f - cross)
    np.testing.assert_allclose(
        after.x, before.x - 0.1 * momentum / jnp.linalg.norm(momentum),
        rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("period", [1, 2, 3])
def test_lower_variable_changes_only_every_period(period):
  instance = _quadratic()
  solver = bilevel.solvers.borep(instance.problem, period=period,
                                 num_lower_steps=4)
  states, infos = _iterates(solver, instance, 10)
  for t, (before, after, info) in enumerate(zip(states[:-1], states[1:],
                                                infos)):
    updated = t >= 1 and t % period == 0
    assert bool(info.lower_updated) == updated
    moved = not np.array_equal(before.y, after.y)
    assert moved == updated, (t, period)


def test_refinement_runs_once_in_init():
  instance = _quadratic(1024, 8)
  solver = bilevel.solvers.borep(instance.problem, num_refine_steps=50,
                                 period=3, num_lower_steps=4)
  key = jax.random.key(0)
  state = solver.init(instance.x0, instance.y0, key=key, data=instance.data)
  # 50 refinement batches, drawn in init.
  assert int(state.sampler.lower.position) == 8 * 50
  y_star = instance.lower_solution(instance.x0)
  assert (jnp.linalg.norm(state.y - y_star) <
          0.1 * jnp.linalg.norm(instance.y0 - y_star))
  step = jax.jit(solver.step)
  for _ in range(7):
    state, _ = step(state, instance.data)
  # 7 steps: one lower batch each, plus 4 per update at t = 3 and t = 6.
  assert int(state.sampler.lower.position) == 8 * (50 + 7 + 2 * 4)
  assert int(state.sampler.upper.position) == 8 * 7
  none = bilevel.solvers.borep(instance.problem, num_refine_steps=0)
  state = none.init(instance.x0, instance.y0, key=key, data=instance.data)
  np.testing.assert_array_equal(state.y, instance.y0)


def test_linear_variable_stays_in_its_ball():
  instance = _quadratic()
  solver = bilevel.solvers.borep(instance.problem, linear_radius=0.05)
  states, _ = _iterates(solver, instance, 20)
  norms = [float(jnp.linalg.norm(s.z)) for s in states]
  assert max(norms) <= 0.05 * (1 + 1e-12)
  assert max(norms) >= 0.05 * (1 - 1e-9)  # the ball is active


def test_periodic_update_stays_a_branch_under_vmap():
  """vmap over seeds keeps lax.cond: steps without update cost no Gg."""
  instance = _quadratic(256, 16)
  solver = bilevel.solvers.borep(instance.problem)

  def final_x(key):
    return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=6, key=key).x

  jaxpr = str(jax.make_jaxpr(jax.vmap(final_x))(
      jax.random.split(jax.random.key(0), 3)))
  assert "cond[" in jaxpr


def test_ma_soba_without_momentum_is_soba():
  instance = _quadratic(256, 16)
  kwargs = dict(lower_optimizer=0.3, linear_optimizer=0.4)
  ma_soba = bilevel.solvers.ma_soba(instance.problem, upper_step_size=0.2,
                                    momentum=0.0, **kwargs)
  soba = bilevel.solvers.soba(instance.problem, upper_optimizer=0.2, **kwargs)
  runs = [bilevel.run(s, instance.x0, instance.y0, instance.data,
                      num_steps=15, key=jax.random.key(2))
          for s in (ma_soba, soba)]
  np.testing.assert_allclose(runs[0].x, runs[1].x, rtol=1e-13, atol=1e-15)


def test_ma_soba_averages_hypergradients():
  instance = _quadratic()
  solver = bilevel.solvers.ma_soba(instance.problem, upper_step_size=0.2,
                                   momentum=0.8)
  states, _ = _iterates(solver, instance, 5)
  momentum = jnp.zeros_like(instance.x0)
  for before, after in zip(states[:-1], states[1:]):
    _, _, cross = bilevel.derivatives.lower_hvp_and_cross(
        instance.problem, before.x, before.y, before.v)
    _, grad_x_f, _ = bilevel.derivatives.upper_value_and_grads(
        instance.problem, before.x, before.y)
    momentum = 0.8 * momentum + 0.2 * (grad_x_f - cross)
    np.testing.assert_allclose(after.x, before.x - 0.2 * momentum,
                               rtol=1e-10, atol=1e-12)


def test_ma_soba_reaches_the_closed_form_optimum():
  instance = _quadratic()
  solver = bilevel.solvers.ma_soba(instance.problem, upper_step_size=0.5,
                                   lower_optimizer=1.0, linear_optimizer=1.0)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=800)
  assert _relative_error(result.x, instance.x_star) <= 1e-3


def test_ttsa_truncated_series_is_unbiased():
  """Averaged over truncations, TTSA's v is the Neumann partial sum."""
  instance = _quadratic()
  eta, num_terms = 0.5, 6
  solver = bilevel.solvers.ttsa(instance.problem, upper_optimizer=1e-3,
                                lower_optimizer=1e-9, neumann_step_size=eta,
                                num_neumann_terms=num_terms)
  x, y = instance.x0, instance.lower_solution(instance.x0)
  hessian = jax.hessian(instance.problem.lower, argnums=1)(x, y, None)
  _, grad_x_f, grad_y_f = bilevel.derivatives.upper_value_and_grads(
      instance.problem, x, y)
  series = sum(jnp.linalg.matrix_power(jnp.eye(8) - eta * hessian, q)
               for q in range(num_terms)) @ grad_y_f * eta
  expected = grad_x_f - bilevel.derivatives.lower_cross(
      instance.problem, x, y, series)

  def one_step(key):
    state = solver.init(x, y, key=key)
    state, _ = solver.step(state)
    return (state.x - x) / -1e-3  # the hypergradient estimate

  estimates = jax.jit(jax.vmap(one_step))(
      jax.random.split(jax.random.key(0), 6000))
  mean = estimates.mean(axis=0)
  error = estimates.std(axis=0) / np.sqrt(len(estimates))
  assert np.all(np.abs(mean - expected) <= 5 * error + 1e-8)
  assert float(estimates.std(axis=0).max()) > 1e-3  # truncation is random


def test_ttsa_makes_progress_and_is_reproducible():
  instance = _quadratic(256, 16)
  solver = bilevel.solvers.ttsa(instance.problem)
  runs = [bilevel.run(solver, instance.x0, instance.y0, instance.data,
                      num_steps=2000, key=jax.random.key(1))
          for _ in range(2)]
  np.testing.assert_array_equal(runs[0].x, runs[1].x)
  assert _relative_error(runs[0].x, instance.x_star) < 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(upper_step_size=-1.0), "step_size"),
    (dict(momentum=1.0), "momentum"), (dict(period=0), "period"),
    (dict(num_lower_steps=0), "num_lower_steps"),
    (dict(num_refine_steps=-1), "num_refine_steps"),
    (dict(linear_radius=0.0), "linear_radius")])
def test_borep_rejects_bad_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    bilevel.solvers.borep(_quadratic().problem, **kwargs)
