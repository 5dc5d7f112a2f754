"""One meaning for ``y``: the lower iterate that never saw the upper data.

For the penalty-type solvers (``penalty``, ``penalty_momentum``, ``f2sa``,
``scalebio``), ``state.y`` (``result.y``) descends the lower objective ``g``
alone, and ``state.y_penalized`` (``result.y_penalized``) descends the
penalised objective, which includes the upper one. Float64 (tests/conftest).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems
from tests.conformance.y_meaning import shifted_validation_labels

SOLVERS = ("penalty", "penalty_momentum", "f2sa", "scalebio")


# ---------------------------------------------------------------------------
# (a) On data hyper-cleaning, y never sees the validation labels.


@functools.lru_cache(maxsize=None)
def _hyper_cleaning():
  return problems.hyper_cleaning(jax.random.key(0), batch_size=100)


def _with_x_fixed(name, problem):
  """The solver with ``x`` held at its start: upper step size 0.

  F2SA refuses a zero ``upper_step_size``; there ``x`` is projected back
  onto the start (``x0 = 0`` on hyper-cleaning) after each step instead.
  """
  factory = getattr(bilevel.solvers, name)
  if name == "f2sa":
    return factory(bilevel.Problem(problem.upper, problem.lower,
                                   project_x=jnp.zeros_like))
  return factory(problem, upper_optimizer=optax.sgd(0.0))


def _run(solver, instance, data, num_steps=30):
  return bilevel.run(solver, instance.x0, instance.y0, data,
                     num_steps=num_steps, key=jax.random.key(1),
                     progress=False)


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", SOLVERS)
def test_y_is_bit_identical_when_the_upper_labels_change(name):
  instance = _hyper_cleaning()
  data = instance.data
  # Every validation label changed (to the next class).
  flipped = shifted_validation_labels(data)
  solver = _with_x_fixed(name, instance.problem)
  clean, wrong = _run(solver, instance, data), _run(solver, instance, flipped)
  for result in (clean, wrong):
    chex.assert_trees_all_equal(result.x, instance.x0)
    assert result.y is result.state.y
    assert result.y_penalized is result.state.y_penalized
  # y never saw the upper labels: bit for bit the same model ...
  chex.assert_trees_all_equal(clean.y, wrong.y)
  # ... and it did train (on g; it moved by 0.027 to 0.35, largest entry).
  assert _max_difference(clean.y, instance.y0) > 1e-2
  # y_penalized trained on them: different labels, a different model
  # (measured: 0.041 to 0.19 apart).
  assert _max_difference(clean.y_penalized, wrong.y_penalized) > 1e-2
  # y_penalized fits the validation labels it saw better than y does.
  upper = lambda y, d: float(instance.problem.upper(instance.x0, y, {
      "features": d.upper["features"], "labels": d.upper["labels"]}))
  for result, seen in ((clean, data), (wrong, flipped)):
    assert upper(result.y_penalized, seen) < upper(result.y, seen)


@pytest.mark.parametrize("name", SOLVERS)
def test_y_and_y_penalized_differ_in_a_normal_run(name):
  instance = _hyper_cleaning()
  solver = getattr(bilevel.solvers, name)(instance.problem)  # defaults
  result = _run(solver, instance, instance.data)
  assert _max_difference(result.x, instance.x0) > 0.0  # x moved
  # Measured: 0.11, 0.079, 0.099 and 0.023 (largest entry).
  assert _max_difference(result.y, result.y_penalized) > 1e-2
  # y_penalized has fit the validation set (full-batch validation loss,
  # measured 0.83 against 1.08 for y with the penalty's defaults).
  upper = lambda y: float(instance.problem.upper(result.x, y,
                                                 instance.data.upper))
  assert upper(result.y_penalized) < upper(result.y)


# ---------------------------------------------------------------------------
# (b) Non-unique lower solutions, from the math.
#
# x in R, y in R^2; g(x, y) = (y1 - x)^2 / 2 does not depend on y2, so the
# lower solutions are the line S(x) = {(x, t)}. f(x, y) = (y1 - 2)^2 / 2 +
# (y2 - 1)^2 / 2 + x^2 / 2. The optimistic hyper-objective is psi(x) =
# min_t f(x, (x, t)) = (x - 2)^2 / 2 + x^2 / 2, so x* = 1 and the optimistic
# lower solution is (1, 1); any other point of S(1), e.g. the (1, y0_2) that
# gradient descent on g reaches, is worse for f.
#
# With penalty lambda, y_lambda(x) = argmin f + lambda g = ((lambda x + 2) /
# (lambda + 1), 1), and grad psi_lambda(x) = x + lambda (g_x(x, y_lambda) -
# g_x(x, y*)) = x - lambda (2 - x) / (lambda + 1) vanishes at x_lambda =
# 2 lambda / (2 lambda + 1). There y_lambda = (1 + e, 1) and x_lambda = 1 - e
# with e = 1 / (2 lambda + 1): the bias of the penalty is exactly e.


def _lower(x, y, batch):
  del batch
  return 0.5 * (y[0] - x[0]) ** 2


def _upper(x, y, batch):
  del batch
  return (0.5 * (y[0] - 2.0) ** 2 + 0.5 * (y[1] - 1.0) ** 2
          + 0.5 * x[0] ** 2)


FLAT = bilevel.Problem(_upper, _lower)
X0, Y0 = jnp.array([0.0]), jnp.array([0.0, -0.5])
OPTIMISTIC_X, OPTIMISTIC_Y = np.array([1.0]), np.array([1.0, 1.0])


def _penalised_solution(weight):
  bias = 1.0 / (2.0 * weight + 1.0)
  return np.array([1.0 - bias]), np.array([1.0 + bias, 1.0]), bias


# name: (solver, steps, final penalty). Constant steps, so that each run
# converges to the stationary point of its final psi_lambda; y_penalized's
# steps along the flat direction are lambda times smaller than its steps on
# g (penalty, penalty_momentum: step / lambda on f; F2SA: gamma / lambda;
# ScaleBiO: its SGD step on f), hence the budgets.
FLAT_RUNS = {
    # The default schedule, lambda from 10 to 1e4 over 1000 steps.
    "penalty": (lambda: bilevel.solvers.penalty(FLAT), 2000, 1e4),
    # The default schedule, lambda from 10 to 1e3 over 2000 steps.
    "penalty_momentum": (lambda: bilevel.solvers.penalty_momentum(FLAT),
                         4000, 1e3),
    "f2sa": (lambda: bilevel.solvers.f2sa(FLAT, penalty=1e3,
                                          penalty_power=0.0,
                                          lower_power=0.0), 4000, 1e3),
    "scalebio": (lambda: bilevel.solvers.scalebio(
        FLAT, upper_optimizer=0.2, lower_optimizer=0.005,
        z_optimizer=0.005, penalty=100.0), 5000, 100.0),
}


def test_flat_problem_closed_forms():
  # x_lambda is stationary for psi_lambda, y_lambda minimises f + lambda g,
  # and both tend to the optimistic solution.
  weight = 50.0
  x_lam, y_lam, bias = _penalised_solution(weight)
  penalised = lambda y: _upper(x_lam, y, None) + weight * _lower(x_lam, y,
                                                                 None)
  assert float(jnp.linalg.norm(jax.grad(penalised)(jnp.asarray(y_lam)))) < (
      1e-12)
  psi = lambda x: (_upper(x, jnp.array([(weight * x[0] + 2.0) / (weight + 1),
                                        1.0]), None)
                   + weight * _lower(x, jnp.array([
                       (weight * x[0] + 2.0) / (weight + 1), 1.0]), None))
  assert abs(float(jax.grad(psi)(jnp.asarray(x_lam))[0])) < 1e-12
  np.testing.assert_allclose(np.abs(y_lam - OPTIMISTIC_Y).max(), bias)
  np.testing.assert_allclose(np.abs(x_lam - OPTIMISTIC_X).max(), bias)
  # The optimistic lower solution is the best point of S(1) for f.
  for t in (-0.5, 0.0, 0.9, 1.1):
    assert float(_upper(OPTIMISTIC_X, jnp.array([1.0, t]), None)) > float(
        _upper(OPTIMISTIC_X, jnp.asarray(OPTIMISTIC_Y), None))


@pytest.mark.parametrize("name", SOLVERS)
def test_y_penalized_is_optimistic_and_y_stays_a_plain_lower_minimiser(name):
  make, num_steps, weight = FLAT_RUNS[name]
  result = bilevel.run(make(), X0, Y0, num_steps=num_steps, progress=False)
  x_lam, y_lam, bias = _penalised_solution(weight)
  x, y = np.asarray(result.x), np.asarray(result.y)
  y_penalized = np.asarray(result.y_penalized)
  # The run reached the stationary point of psi_lambda, to 1e-4 of the bias
  # (measured: at most 6.2e-6 of it, F2SA's y_penalized) ...
  assert np.abs(x - x_lam).max() < 1e-4 * bias
  assert np.abs(y_penalized - y_lam).max() < 1e-4 * bias
  # ... so y_penalized is the optimistic lower solution up to the penalty's
  # bias e = 1 / (2 lambda + 1) (5e-5, 5e-4, 5e-4, 5e-3).
  assert np.abs(y_penalized - OPTIMISTIC_Y).max() < 1.01 * bias
  # y minimises g at x (y1 = x) ...
  assert abs(float(jax.grad(_lower, 1)(result.x, result.y, None)[0])) < 1e-10
  # ... and never moved along the flat direction, where g has no gradient:
  # a lower solution, but not the optimistic one.
  assert float(y[1]) == float(Y0[1])
  assert np.abs(y - OPTIMISTIC_Y).max() > 1.0
