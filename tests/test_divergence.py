"""Divergence that stays finite: blow-ups are reported like NaN (issue 17)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems

jax.config.update("jax_enable_x64", True)


def _unbounded_problem():
  """Phi(x) = -0.0075 |x|^2 + const: unbounded below, x grows without end.

  f = -0.0075 |x|^2 + |y - 1|^2 / 2, g = |y - 0.1 x|^2 / 2, so y*(x) = 0.1 x
  and Phi(x) = -0.0075 |x|^2 + |0.1 x - 1|^2 / 2 = -0.0025 |x|^2 + ...
  """
  def upper(x, y, batch=None):
    return -0.0075 * jnp.sum(x ** 2) + 0.5 * jnp.sum((y - 1.0) ** 2)

  def lower(x, y, batch=None):
    return 0.5 * jnp.sum((y - 0.1 * x) ** 2)

  return bilevel.Problem(upper=upper, lower=lower)


X0 = jnp.ones(4)  # |x0| = 2
Y0 = jnp.zeros(4)


def _soba(step_size=1.0):
  return bilevel.solvers.soba(_unbounded_problem(), upper_optimizer=step_size)


def test_finite_blow_up_of_the_issue_raises():
  # The measured case: soba with an upper step of 1, 4000 steps. Unchecked,
  # |x| goes from 2 to 4.3e10 and the run returns normally.
  unchecked = bilevel.run(_soba(), X0, Y0, num_steps=4000,
                          max_growth=math.inf)
  assert unchecked.divergence_step is None
  assert float(jnp.linalg.norm(unchecked.x)) > 1e10
  with pytest.raises(bilevel.DivergenceError,
                     match="divergence at step 1696 of 4000: values grew "
                     "past max_growth") as error:
    bilevel.run(_soba(), X0, Y0, num_steps=4000)
  error = error.value
  # The upper loss (-0.0025 |x|^2 at y = y*) passes 1e8 times its start
  # first: |x| is then about 2.8e5.
  assert error.step == 1696
  assert error.variables == ["info.upper_loss"]
  value, bound = error.magnitudes["info.upper_loss"]
  assert value > bound
  first = abs(float(error.result.history.upper_loss[0]))
  np.testing.assert_allclose(bound, 1e8 * max(first, 1.0), rtol=1e-6)
  assert int(error.result.state.num_steps) == 1695
  np.testing.assert_allclose(float(jnp.linalg.norm(error.result.x)),
                             2.76e5, rtol=1e-2)
  assert error.last_good_info["upper_loss"] < -1e8


def test_max_growth_and_max_magnitude_are_settable():
  with pytest.raises(bilevel.DivergenceError) as error:
    bilevel.run(_soba(), X0, Y0, num_steps=4000, max_growth=1e3)
  early = error.value.step
  assert early < 1696
  # An absolute bound of 100: the upper loss (-0.0025 |x|^2 + ...) passes
  # it first, at step 307, long before 1e8 times its start.
  with pytest.raises(bilevel.DivergenceError,
                     match=r"step 307 of 4000.*info\.upper_loss reached 101 "
                     r"\(bound 100\)") as error:
    bilevel.run(_soba(), X0, Y0, num_steps=4000, max_magnitude=100.0)
  value, bound = error.value.magnitudes["info.upper_loss"]
  assert bound == 100.0 and 100.0 < value < 102.0
  assert abs(error.value.last_good_info["upper_loss"]) <= 100.0


def test_warn_reports_once_and_keeps_going():
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    result = bilevel.run(_soba(), X0, Y0, num_steps=2000,
                         on_divergence="warn")
  messages = [str(w.message) for w in record
              if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 1 and "step 1696 of 2000" in messages[0]
  assert result.divergence_step == 1696
  assert int(result.state.num_steps) == 2000


def test_each_member_of_a_sweep_stops_at_its_own_blow_up():
  def one(step_size):
    result = bilevel.run(_soba(step_size), X0, Y0, num_steps=2000)
    return result.divergence_step, result.x

  steps, xs = jax.jit(jax.vmap(one))(jnp.array([0.01, 1.0, 2.0]))
  assert steps[0] == -1 and steps[1] == 1696 and 1 < steps[2] < 1696
  alone = bilevel.run(_soba(0.01), X0, Y0, num_steps=2000)
  np.testing.assert_allclose(xs[0], alone.x, rtol=1e-12)
  # The diverging members froze at their last good x, below the bound.
  stopped = bilevel.run(_soba(1.0), X0, Y0, num_steps=1695)
  np.testing.assert_allclose(xs[1], stopped.x, rtol=1e-12)


def test_a_zero_start_is_floored_at_one():
  # x0 = 0: the bound on x is max_growth * 1, not 0; a run that moves x by
  # O(1) is healthy.
  result = bilevel.run(_soba(0.1), jnp.zeros(4) + 1e-12, Y0, num_steps=200)
  assert result.divergence_step is None


# No false alarm -------------------------------------------------------------
# Measured with max_growth=1e4 (10^4 below the default), 500 steps, every
# solver with its defaults on quadratic, ridge, logistic (breast cancer),
# hyper-cleaning, box_constrained and sphere_lower_level: no alarm except
# borep on logistic (NaN at step 633 without the check) and the
# hypergradient solvers on underdetermined_least_squares (a singular lower
# Hessian: NaN or 1e280 later). Below, each solver on one healthy problem of
# the suite, with a margin of 100 under the default.

PAIRS = {
    "aid": "hyper_cleaning", "itd": "ridge", "stocbio": "logistic",
    "soba": "quadratic", "ma_soba": "hyper_cleaning", "amigo": "ridge",
    "ttsa": "logistic", "borep": "quadratic", "penalty": "sphere",
    "penalty_momentum": "least_squares", "f2sa": "box",
    "bome": "least_squares", "lvhba": "box",
}
BUILDERS = {
    "quadratic": lambda: problems.quadratic(jax.random.key(0)),
    "ridge": lambda: problems.ridge(),
    "logistic": lambda: problems.logistic_regularization(
        dataset="breast_cancer"),
    "hyper_cleaning": lambda: problems.hyper_cleaning(num_train=100,
                                                      num_val=300),
    "least_squares": lambda: problems.underdetermined_least_squares(),
    "box": lambda: problems.box_constrained(),
    "sphere": lambda: problems.sphere_lower_level(),
}


@pytest.mark.parametrize("solver_name", sorted(PAIRS))
def test_no_false_alarm_on_the_suite(solver_name):
  instance = BUILDERS[PAIRS[solver_name]]()
  solver = getattr(bilevel.solvers, solver_name)(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=300, key=jax.random.key(0),
                       max_growth=1e6)
  assert result.divergence_step is None


def test_many_diagnostics_share_the_last_slot():
  # More diagnostics than bilevel._divergence.INFO_SLOTS (32): the leaves
  # past the last slot share its start (their largest); growth is still seen.
  solver = _soba(0.01)

  def step(state, data=None):
    new, info = solver.step(state, data)
    extra = {f"d{i:02d}": jnp.asarray(1.0) for i in range(40)}
    # d39 is 10 at the first step (its start, shared with d31..d38: the
    # largest, 10) and grows by 10 per step: past 1e8 * 10 at step 10.
    extra["d39"] = 10.0 ** new.num_steps.astype(jnp.float64)
    return new, (info, extra)

  with pytest.raises(bilevel.DivergenceError,
                     match=r"step 10 of 20.*d39'\] reached 1e\+10 "
                     r"\(bound 1e\+09\)") as error:
    bilevel.run(solver._replace(step=step), X0, Y0, num_steps=20)
  assert error.value.variables == ["info[1]['d39']"]
