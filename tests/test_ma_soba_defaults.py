"""MA-SOBA's default hyperparameters on quadratics with known optima.

The quadratics of ``tests/conformance/quadratics.py`` (``x`` in R^50, ``y``
in R^40, lower condition number 2 or 100, :math:`\\Phi` 0.9-smooth, ``x*``
in closed form). On them every MA-SOBA step is affine in the state
``(x, y, v, m)``, so the Jacobian of ``solver.step`` is the iteration
matrix and its spectral radius decides convergence: the tests check it
directly, then check the runs against ``x*``.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
from tests.conformance.quadratics import quadratic

# The defaults before they were changed: a moving average with weight 0.1 on
# the new estimate at an upper step of 0.5 (theta = step / 5).
FORMER_DEFAULTS = dict(upper_step_size=0.5, momentum=0.9)


def _relative_error(q, x):
  return float(np.linalg.norm(np.asarray(x) - q.x_star)
               / np.linalg.norm(q.x_star))


def _run(q, num_steps, **hyperparameters):
  solver = bilevel.solvers.ma_soba(q.problem, **hyperparameters)
  return bilevel.run(solver, jnp.asarray(q.x0), jnp.asarray(q.y0),
                     num_steps=num_steps, steps_per_chunk=num_steps,
                     on_divergence="ignore").x


def _spectral_radius(q, **hyperparameters):
  """Largest |eigenvalue| of the Jacobian of one step in (x, y, v, m)."""
  solver = bilevel.solvers.ma_soba(q.problem, **hyperparameters)
  state = solver.init(jnp.asarray(q.x0), jnp.asarray(q.y0))
  ema_state, *rest = state.upper_opt_state
  flat, unravel = jax.flatten_util.ravel_pytree(
      (state.x, state.y, state.v, ema_state.ema))

  def step_map(z):
    x, y, v, m = unravel(z)
    upper_opt_state = (ema_state._replace(ema=m), *rest)
    new, _ = solver.step(state._replace(x=x, y=y, v=v,
                                        upper_opt_state=upper_opt_state))
    return jax.flatten_util.ravel_pytree(
        (new.x, new.y, new.v, new.upper_opt_state[0].ema))[0]

  jacobian = np.asarray(jax.jit(jax.jacfwd(step_map))(flat))
  return float(np.max(np.abs(np.linalg.eigvals(jacobian))))


@pytest.mark.parametrize("condition_number", [1.5, 2.0, 5.0, 10.0, 30.0,
                                              100.0])
def test_defaults_contract_for_every_condition_number(condition_number):
  # Radii 0.971 (kappa 1.5) to 0.9971 (kappa 100); the former defaults give
  # 1.021 to 1.016 for kappa 1.5 to 10.
  assert _spectral_radius(quadratic(condition_number)) < 1.0


def test_former_defaults_expand_and_new_ones_contract():
  q = quadratic(2.0)
  np.testing.assert_allclose(_spectral_radius(q, **FORMER_DEFAULTS), 1.0243,
                             atol=1e-4)
  np.testing.assert_allclose(_spectral_radius(q), 0.9790, atol=1e-4)
  # The defaults tie the averaging weight to the step, theta = 2 alpha; at
  # alpha = 0.5, theta = 0.5 (the same ratio as alpha = 0.1, theta = 0.1)
  # still expands.
  assert _spectral_radius(q, upper_step_size=0.5, momentum=0.5) > 1.0
  assert _spectral_radius(q, upper_step_size=0.1, momentum=0.9) < 1.0


def test_defaults_reach_x_star_with_a_strongly_coupled_lower_level():
  q = quadratic(2.0)
  assert _relative_error(q, _run(q, 2000)) < 1e-10


def test_defaults_reach_x_star_with_an_ill_conditioned_lower_level():
  # The slow lower directions (eigenvalue 0.01, steps 0.5) set the rate:
  # 1.7e-7 after 5000 steps.
  q = quadratic(100.0)
  assert _relative_error(q, _run(q, 5000)) < 1e-6


def test_former_defaults_diverge_with_a_strongly_coupled_lower_level():
  q = quadratic(2.0)
  # From x0 = 0 the relative error starts at 1; a radius of 1.024 multiplies
  # it by about 1e10 in 1000 steps.
  assert _relative_error(q, _run(q, 1000, **FORMER_DEFAULTS)) > 1e6
