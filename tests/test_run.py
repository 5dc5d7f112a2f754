"""The run loop: history, callbacks, timing fields, progress."""

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
import problems


def _instance():
  return problems.quadratic(jax.random.key(0), dim_x=4, dim_y=3)


def test_history_callback_and_timing():
  instance = _instance()
  solver = bilevel.solvers.soba(instance.problem)
  seen = []
  result = bilevel.run(
      solver, instance.x0, instance.y0, num_steps=25, steps_per_chunk=10,
      callback=lambda step, state: seen.append(step) or
      float(instance.value(state.x)))
  assert seen == [10, 20, 25]
  assert [s for s, _ in result.evaluations] == [10, 20, 25]
  assert result.history.hypergradient_norm.shape == (25,)
  np.testing.assert_array_equal(result.x, result.state.x)
  assert int(result.state.num_steps) == 25
  # The evaluation at step 25 is that of the returned x.
  np.testing.assert_allclose(result.evaluations[-1][1],
                             instance.value(result.x))


def test_history_matches_manual_steps():
  instance = _instance()
  solver = bilevel.solvers.aid(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=7,
                       steps_per_chunk=3)
  state = solver.init(instance.x0, instance.y0)
  step = jax.jit(solver.step)
  losses = []
  for _ in range(7):
    state, info = step(state)
    losses.append(info.upper_loss)
  np.testing.assert_allclose(result.history.upper_loss, jnp.stack(losses),
                             rtol=1e-12)
  np.testing.assert_allclose(result.x, state.x, rtol=1e-12)


def test_progress_bar_runs(capsys):
  instance = _instance()
  solver = bilevel.solvers.soba(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=5,
                       progress=True)
  assert result.history.upper_loss.shape == (5,)


def test_steps_per_second_excludes_compilation():
  instance = _instance()
  solver = bilevel.solvers.itd(instance.problem)
  first = bilevel.run(solver, instance.x0, instance.y0, num_steps=30,
                      steps_per_chunk=10)
  assert first.compile_seconds > 0
  assert first.num_timed_steps == 20  # the first chunk compiled
  second = bilevel.run(solver, instance.x0, instance.y0, num_steps=30,
                       steps_per_chunk=10)
  assert np.isnan(second.compile_seconds)
  assert second.num_timed_steps == 30 and second.steps_per_second > 0
