"""Defaults that reach x*, and biases that are stated.

On the quadratics of ``tests/conformance/quadratics.py`` (lower level
1-smooth and :math:`\\mu = 1/\\kappa`-strongly convex, :math:`\\kappa = 2`
and :math:`100`), every solver either reaches :math:`x^*` with its defaults,
or its docstring states the bias of its defaults and the setting that
removes it; the tests below check both halves of each statement. The bias
of a truncated or penalised hypergradient is compared with the exact
minimiser of that hypergradient's surrogate (closed forms below), so a test
fails if the stated mechanism stops being the one at work.

The docstrings quote numbers measured on the issue's sizes (50 x 40); the
tests use 10 x 8 for speed, and the rules they check are stated in terms of
:math:`\\mu` and the step sizes, not the dimensions. Each test runs the two
condition numbers in one ``jax.vmap`` (one compilation).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from conformance.quadratics import objectives, quadratic

KAPPAS = (2.0, 100.0)
DIMS = dict(dim_x=10, dim_y=8)
# "Reaches x*": relative error ||x - x*|| / ||x*|| below this.
TOL = 1e-6
LOWER_STEP = 0.5  # the default lower (and Neumann) step of every solver


def _quadratics(kappas=KAPPAS):
  return [quadratic(kappa, **DIMS) for kappa in kappas]


def _problem(A, B, b, C, d, r):
  """The deterministic problem of ``quadratic``, with traced matrices."""
  return bilevel.Problem(*objectives(A, B, b, C, d, r))


def _errors(factory, num_steps, kappas=KAPPAS, **hyperparameters):
  """Relative errors to x* after ``num_steps``, one per condition number."""
  qs = _quadratics(kappas)
  matrices = tuple(jnp.stack([jnp.asarray(getattr(q, name)) for q in qs])
                   for name in ("A", "B", "b", "C", "d"))

  def solve(A, B, b, C, d):
    solver = factory(_problem(A, B, b, C, d, qs[0].r), **hyperparameters)
    return bilevel.run(solver, jnp.asarray(qs[0].x0), jnp.asarray(qs[0].y0),
                       num_steps=num_steps, key=jax.random.key(0)).x

  xs = np.asarray(jax.jit(jax.vmap(solve))(*matrices))
  return np.array([np.linalg.norm(x - q.x_star) / np.linalg.norm(q.x_star)
                   for x, q in zip(xs, qs)])


def _surrogate_error(kappa, inverse):
  r"""Exact error of the minimiser of a biased hypergradient.

  The hypergradient :math:`r x + B^\top W C^\top (C y^*(x) - d)` with
  ``W = inverse(A, C)`` in place of :math:`A^{-1}` vanishes at one point;
  returns its relative distance to :math:`x^*`.
  """
  q = quadratic(kappa, **DIMS)
  A_inv = np.linalg.inv(q.A)
  W = inverse(q.A, q.C)
  hessian = q.r * np.eye(q.B.shape[1]) + q.B.T @ W @ q.C.T @ q.C @ A_inv @ q.B
  x = -np.linalg.solve(hessian,
                       q.B.T @ W @ q.C.T @ (q.C @ A_inv @ q.b - q.d))
  return np.linalg.norm(x - q.x_star) / np.linalg.norm(q.x_star)


def _truncation_error(kappa, num_terms, step=LOWER_STEP):
  """ITD with K steps, StocBiO with Q + 1 terms: W = (I - (I - step A)^K) A^-1."""
  def inverse(A, C):
    del C
    eye = np.eye(len(A))
    return (eye - np.linalg.matrix_power(eye - step * A, num_terms)
            ) @ np.linalg.inv(A)
  return _surrogate_error(kappa, inverse)


def _penalty_error(kappa, penalty):
  """Value-function penalty lambda: W = (A + C^T C / lambda)^-1."""
  return _surrogate_error(
      kappa, lambda A, C: np.linalg.inv(A + C.T @ C / penalty))


def _num_terms(kappa, eps=TOL, step=LOWER_STEP):
  """The smallest K with (1 - step mu)^K <= eps, i.e. ~ log(1/eps)/(step mu)."""
  return math.ceil(math.log(eps) / math.log(1.0 - step / kappa))


# Both condition numbers run with the K of the worse one.
K_RULE = _num_terms(max(KAPPAS))  # 2757


def test_traced_problem_is_the_conformance_quadratic():
  for q in _quadratics():
    traced = _problem(*(jnp.asarray(getattr(q, n)) for n in "ABbCd"), q.r)
    x = jnp.linspace(-1.0, 1.0, DIMS["dim_x"])
    y = jnp.linspace(0.5, -0.5, DIMS["dim_y"])
    np.testing.assert_allclose(traced.upper(x, y, None),
                               q.problem.upper(x, y, None), rtol=1e-14)
    np.testing.assert_allclose(traced.lower(x, y, None),
                               q.problem.lower(x, y, None), rtol=1e-14)
  assert [_num_terms(k) for k in KAPPAS] == [49, 2757]


@pytest.mark.parametrize("name, num_steps",
                         [("aid", 2000), ("soba", 10000), ("amigo", 5000)])
def test_unbiased_defaults_reach_x_star(name, num_steps):
  errors = _errors(getattr(bilevel.solvers, name), num_steps)
  assert np.all(errors < TOL), errors


def test_itd_truncation_bias_and_rule():
  # The defaults (K = 20) stop exactly at the zero of the truncated
  # hypergradient, whose error grows with kappa.
  errors = _errors(bilevel.solvers.itd, 1000)
  expected = [_truncation_error(k, 20) for k in KAPPAS]
  np.testing.assert_allclose(errors, expected, rtol=1e-6)
  assert expected[0] < 1e-3 and expected[1] > 0.3
  # K >= log(1/eps) / -log(1 - eta mu) removes it.
  errors = _errors(bilevel.solvers.itd, 300, num_lower_steps=K_RULE)
  assert np.all(errors < TOL), errors


def test_stocbio_truncation_bias_and_rule():
  # Q Neumann terms sum Q + 1 powers of (I - eta H).
  errors = _errors(bilevel.solvers.stocbio, 1000)
  expected = [_truncation_error(k, 11) for k in KAPPAS]
  np.testing.assert_allclose(errors, expected, rtol=1e-6)
  assert expected[1] > 0.5
  errors = _errors(bilevel.solvers.stocbio, 300,
                   num_neumann_terms=K_RULE - 1)
  assert np.all(errors < TOL), errors


def test_ttsa_bias_in_expectation_and_its_removal():
  # The random truncation is unbiased for the series cut at Q terms: at
  # kappa = 100 the defaults (Q = 10) stop near that series' bias.
  errors = _errors(bilevel.solvers.ttsa, 20000, kappas=(100.0,))
  np.testing.assert_allclose(errors[0], _truncation_error(100.0, 10),
                             rtol=0.05)
  # Q from the rule removes the bias; the randomised series stays noisy.
  errors = _errors(bilevel.solvers.ttsa, 2000, kappas=(100.0,),
                   num_neumann_terms=K_RULE)
  assert errors[0] < 0.2, errors


def test_f2sa_penalty_bias_and_constant_penalty():
  num_steps = 5000
  errors = _errors(bilevel.solvers.f2sa, num_steps)
  # At least the bias of the final penalty lambda_k = 10 s^(1/7) (the x
  # step has decayed too): O(1 / (lambda mu)).
  final_penalty = 10.0 * (1.0 + (num_steps - 1) / 10.0) ** (1 / 7)
  bias = np.array([_penalty_error(k, final_penalty) for k in KAPPAS])
  assert np.all(errors >= bias) and np.all(errors < 1.5 * bias), (errors,
                                                                     bias)
  assert bias[1] > 10 * bias[0]
  # A constant penalty of 1e8 (and constant steps) removes it.
  assert all(_penalty_error(k, 1e8) < TOL / 5 for k in KAPPAS)
  errors = _errors(bilevel.solvers.f2sa, 10000, penalty=1e8,
                   penalty_power=0.0, lower_power=0.0)
  assert np.all(errors < TOL), errors


def test_bome_truncation_and_step_size_bias():
  errors = _errors(bilevel.solvers.bome, 5000)
  # Above the truncation bias of T = 10 inner steps; far off at kappa = 100.
  assert errors[0] > _truncation_error(2.0, 10) and errors[1] > 0.5, errors
  # With the truncation removed (T from the rule), the rest is that of the
  # value-function penalty with lambda = 2 / (alpha L_g) (L_g = 1), the
  # multiplier at the edge of stability: proportional to alpha.
  for step_size, num_steps in ((1e-2, 20000), (1e-3, 100000)):
    error = _errors(bilevel.solvers.bome, num_steps, kappas=(2.0,),
                    num_lower_steps=_num_terms(2.0), step_size=step_size)[0]
    penalty_bias = _penalty_error(2.0, 2.0 / step_size)
    assert penalty_bias <= error <= 1.5 * penalty_bias, (step_size, error,
                                                         penalty_bias)


def test_borep_step_length_bias_and_decaying_steps():
  errors = _errors(bilevel.solvers.borep, 5000)
  assert np.all(errors > 1e-2), errors
  errors = _errors(bilevel.solvers.borep, 16000,
                   upper_step_size=optax.exponential_decay(
                       0.1, 2000, 0.1, transition_begin=2000))
  assert np.all(errors < TOL), errors


def test_scalebio_penalty_bias_and_large_penalty():
  errors = _errors(bilevel.solvers.scalebio, 5000)
  bias = np.array([_penalty_error(k, 10.0) for k in KAPPAS])
  np.testing.assert_allclose(errors[0], bias[0], rtol=0.25)
  assert errors[1] > bias[1], (errors, bias)
  # With SGD steps (numbers), lower steps 0.5 / alpha and alpha = 1e8.
  errors = _errors(bilevel.solvers.scalebio, 20000, penalty=1e8,
                   upper_optimizer=0.2, lower_optimizer=0.5e-8)
  assert np.all(errors < TOL), errors


def test_lvhba_stated_slow_convergence_on_an_unconstrained_quadratic():
  """LV-HBA's docstring: 4.7e-3 after 50000 steps at kappa = 2 (50 x 40)."""
  q = quadratic(2.0)
  solver = bilevel.solvers.lvhba(q.problem)
  result = bilevel.run(solver, jnp.asarray(q.x0), jnp.asarray(q.y0),
                       num_steps=50_000, steps_per_chunk=25_000)
  error = np.linalg.norm(result.x - q.x_star) / np.linalg.norm(q.x_star)
  assert 1e-3 < error < 1e-2, error
