"""The run loop: history, callbacks, timing fields, progress."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# Divergence detection -------------------------------------------------------


def _poisoned(solver, bad_step, field="v"):
  """``solver`` whose state's ``field`` becomes NaN at step ``bad_step``."""
  def step(state, data=None):
    new, info = solver.step(state, data)
    poison = new.num_steps == bad_step
    value = jax.tree.map(lambda a: jnp.where(poison, jnp.nan, a),
                         getattr(new, field))
    return new._replace(**{field: value}), info
  return solver._replace(step=step)


@pytest.mark.parametrize("bad_step", [1, 5, 6, 7, 12])
def test_divergence_names_step_variable_and_last_diagnostics(bad_step):
  instance = _instance()
  solver = bilevel.solvers.aid(instance.problem)
  clean = bilevel.run(solver, instance.x0, instance.y0, num_steps=12,
                      steps_per_chunk=5)
  with pytest.raises(bilevel.DivergenceError,
                     match=rf"step {bad_step} of 12: non-finite values \(NaN or inf\) in state\.v\b") as error:
    bilevel.run(_poisoned(solver, bad_step), instance.x0, instance.y0,
                num_steps=12, steps_per_chunk=5)
  error = error.value
  assert error.step == bad_step
  assert error.variables == ["state.v"]
  # The result stops at the last finite state, its history at the bad step.
  assert int(error.result.state.num_steps) == bad_step - 1
  assert error.result.divergence_step == bad_step
  assert error.result.nonfinite_step == bad_step  # the former name
  assert error.result.history.upper_loss.shape == (bad_step,)
  np.testing.assert_array_equal(error.result.history.upper_loss,
                                clean.history.upper_loss[:bad_step])
  if bad_step == 1:
    assert error.last_good_info is None
    np.testing.assert_array_equal(error.result.x, instance.x0)
  else:
    expected = float(clean.history.upper_loss[bad_step - 2])
    assert error.last_good_info["upper_loss"] == expected
    assert set(error.last_finite_info) == set(clean.history._fields)
    assert all(np.all(np.isfinite(leaf)) for leaf in
               jax.tree.leaves(error.result.state) if leaf.dtype.kind == "f")


def test_divergence_in_x_is_named():
  instance = _instance()
  solver = _poisoned(bilevel.solvers.soba(instance.problem), 3, field="x")
  with pytest.raises(bilevel.DivergenceError) as error:
    bilevel.run(solver, instance.x0, instance.y0, num_steps=10)
  assert error.value.variables == ["state.x"]
  assert "state.x" in str(error.value) and "step 3 of 10" in str(error.value)


def test_real_divergence_raises():
  instance = _instance()
  solver = bilevel.solvers.soba(instance.problem, upper_optimizer=50.0,
                                lower_optimizer=5.0)
  with pytest.raises(bilevel.DivergenceError, match="divergence at step") as error:
    bilevel.run(solver, instance.x0, instance.y0, num_steps=2000)
  assert 1 < error.value.step < 2000
  assert error.value.variables  # something is named
  assert np.all(np.isfinite(error.value.result.x))


def test_warn_keeps_going_and_ignore_does_not_check():
  instance = _instance()
  solver = _poisoned(bilevel.solvers.aid(instance.problem), 4)
  with pytest.warns(RuntimeWarning, match="step 4 of 9") as record:
    result = bilevel.run(solver, instance.x0, instance.y0, num_steps=9,
                         steps_per_chunk=3, on_divergence="warn")
  assert len(record) == 1
  assert result.divergence_step == 4 and int(result.state.num_steps) == 9
  ignored = bilevel.run(solver, instance.x0, instance.y0, num_steps=9,
                        steps_per_chunk=3, on_divergence="ignore")
  assert ignored.divergence_step is None
  assert int(ignored.state.num_steps) == 9
  assert not np.all(np.isfinite(ignored.history.hypergradient_norm))


def test_healthy_run_reports_no_divergence():
  instance = _instance()
  result = bilevel.run(bilevel.solvers.aid(instance.problem), instance.x0,
                       instance.y0, num_steps=7, steps_per_chunk=3)
  assert result.divergence_step is None


def test_divergence_under_vmap_stops_each_member():
  instance = _instance()

  clean = bilevel.run(bilevel.solvers.aid(instance.problem), instance.x0,
                      instance.y0, num_steps=10)

  def run(bad_step):
    solver = _poisoned(bilevel.solvers.aid(instance.problem), bad_step)
    result = bilevel.run(solver, instance.x0, instance.y0, num_steps=10)
    return result.divergence_step, result.x, result.state.num_steps

  steps, xs, counts = jax.jit(jax.vmap(run))(jnp.array([3, 100, 10]))
  np.testing.assert_array_equal(steps, [3, -1, 10])
  # x stops at the last finite step (the NaN in v reaches x one step later,
  # so x after step 2 for the first member); counters keep counting.
  history = bilevel.run(bilevel.solvers.aid(instance.problem), instance.x0,
                        instance.y0, num_steps=2).x
  np.testing.assert_allclose(xs[0], history, rtol=1e-12)
  np.testing.assert_allclose(xs[1], clean.x, rtol=1e-12)
  assert np.all(np.isfinite(xs))
  np.testing.assert_array_equal(counts, [10, 10, 10])


def test_bad_on_divergence_and_foreign_state_are_refused():
  instance = _instance()
  solver = bilevel.solvers.aid(instance.problem)
  with pytest.raises(ValueError, match="on_divergence"):
    bilevel.run(solver, instance.x0, instance.y0, num_steps=3,
                on_divergence="skip")
  with pytest.warns(DeprecationWarning, match="on_divergence"):
    former = bilevel.run(solver, instance.x0, instance.y0, num_steps=3,
                         on_nonfinite="ignore")
  assert former.divergence_step is None
  soba_state = bilevel.solvers.soba(instance.problem).init(instance.x0,
                                                            instance.y0)
  with pytest.raises(ValueError, match="state does not match"):
    bilevel.run(solver, None, None, num_steps=3, state=soba_state)
  with pytest.raises(TypeError, match="state must be a solver state"):
    bilevel.run(solver, None, None, num_steps=3, state={"x": 1.0})
