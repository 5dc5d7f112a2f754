r"""TTSA: two-timescale stochastic approximation for bilevel problems.

One stochastic gradient step on ``y`` per iteration on a faster time scale
than ``x``, and a hypergradient whose inverse Hessian is replaced by a
*randomly truncated* Neumann series (unbiased for the series truncated at
``Q`` terms):

.. math::

   y_{t+1} &= \Pi_Y\big(y_t - \beta_t \nabla_y g(x_t, y_t)\big) \\
   p_t &\sim \mathcal{U}\{0, \dots, Q - 1\} \\
   v_t &= Q \eta \prod_{i=1}^{p_t} (I - \eta H_i)\, \nabla_y f(x_t, y_{t+1})
   \qquad (H_i = \nabla^2_{yy} g(x_t, y_{t+1}) \text{ on batch } i) \\
   x_{t+1} &= \Pi_X\big(x_t - \alpha_t (\nabla_x f(x_t, y_{t+1})
              - J v_t)\big)

with :math:`\mathbb{E}_p[v_t] = \eta \sum_{q=0}^{Q-1} (I - \eta H)^q
\nabla_y f \to H^{-1} \nabla_y f`. The paper's step sizes decay on two time
scales, :math:`\alpha_t \propto t^{-3/5}` and :math:`\beta_t \propto
t^{-2/5}`; they are the defaults here.

The truncation ``p`` is random: the state carries a PRNG key, split every
step (derived from ``init``'s ``key``; ``jax.random.key(0)`` without one,
for deterministic problems), so runs are reproducible given the key. The products run in a ``lax.fori_loop`` of
``p`` iterations, each on a fresh lower batch: a step costs ``p`` HVPs, at
most ``Q - 1``.

**Bias and noise.** Averaged over the truncation p, ``v_t`` is the series
cut at Q terms, so the hypergradient carries StocBiO's bias, (1 - eta mu)^Q
along a lower curvature mu; the random truncation also makes it noisy on
deterministic problems, and the decaying steps average that noise out only
slowly. On the quadratics of ``tests/conformance/quadratics.py`` (x in R^50,
y in R^40, lower level 1-smooth and mu = 1/kappa strongly convex), the
defaults (Q = 10) stop after 5000 steps at relative error 0.026 (kappa = 2)
and 0.71 (kappa = 100), with or without minibatches; the truncation bias
alone is 0.018 and 0.70. Q >= log(1/eps) / (eta mu) removes the bias but not
the noise: with Q = 49 and 2757 (eps = 1e-6) the error after 20000 steps is
0.014 and 0.020. TTSA does not reach x* to high accuracy in practical time;
:func:`stocbio` evaluates the same series without the randomness
(``tests/test_defaults.py``).

References:
  Hong, Wai, Wang & Yang, "A two-timescale stochastic algorithm framework for
  bilevel optimization: complexity analysis and application to
  actor-critic", SIAM J. Optim., 2023 (arXiv 2007.05170, 2020). The
  truncated series follows Ghadimi & Wang, "Approximation methods for
  bilevel programming", 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, derivatives
from bilevel._problem import Problem
from bilevel._validation import as_optimizer, check_positive, check_positive_int
from bilevel.hypergradient import hypergradient_from_solution, lower_descent

PyTree = Any


class TTSAState(NamedTuple):
  """State of :func:`ttsa` (``key`` draws the truncations)."""
  x: PyTree
  y: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  sampler: _data.SamplerState
  key: jax.Array
  num_steps: jax.Array


def power_schedule(step_size: float, power: float):
  """``t -> step_size * (t + 1) ** -power`` (an optax schedule).

  Computed in float32 whatever ``jax_enable_x64`` says, so that a float32 run
  gives the same bits with and without x64.
  """
  check_positive("step_size", step_size)
  check_positive("power", power, allow_zero=True)

  def schedule(count):
    steps = jnp.asarray(count, jnp.float32) + 1.0
    return jnp.float32(step_size) * steps ** jnp.float32(-power)

  return schedule


def ttsa(problem: Problem, *, upper_optimizer: Any = None,
         lower_optimizer: Any = None, neumann_step_size: float = 0.5,
         num_neumann_terms: int = 10) -> _base.BilevelSolver:
  """TTSA (Hong, Wai, Wang & Yang).

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``).
    upper_optimizer: optax optimizer, step size or schedule for ``x``
      (:math:`\\alpha_t`); default :math:`(t + 1)^{-3/5}`.
    lower_optimizer: same for ``y`` (:math:`\\beta_t`); default
      :math:`0.5 (t + 1)^{-2/5}`.
    neumann_step_size: :math:`\\eta`, below ``1 / L`` of the lower level.
    num_neumann_terms: :math:`Q`; the truncation is uniform on
      ``0..Q-1``.

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs
    ``1 Gf + 1 Gg + p HVP + 1 JVP`` with ``p <= Q - 1`` (declared).
  """
  _base.require_unconstrained(problem, "ttsa")
  if upper_optimizer is None:
    upper_optimizer = power_schedule(1.0, 0.6)
  if lower_optimizer is None:
    lower_optimizer = power_schedule(0.5, 0.4)
  upper_optimizer = as_optimizer("upper_optimizer", upper_optimizer)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  check_positive("neumann_step_size", neumann_step_size)
  check_positive_int("num_neumann_terms", num_neumann_terms)

  def init(x, y, *, key=None, data=None) -> TTSAState:
    # prepare validates the key.
    sampler = _base.prepare(problem, x, y, data, key,
                            differentiates_projection=True)
    # The truncations draw from their own stream (the sampler splits key).
    key = jax.random.key(0) if key is None else jax.random.fold_in(key, 1)
    return TTSAState(
        x=x, y=y, upper_opt_state=upper_optimizer.init(x),
        lower_opt_state=lower_optimizer.init(y), sampler=sampler, key=key,
        num_steps=jnp.zeros((), jnp.int32))

  def step(state: TTSAState, data=None):
    _base.check_step_data(state.sampler, data)
    x = state.x
    lower_batch, sampler = _data.sample(state.sampler, data, "lower")
    y, lower_opt_state, lower_grad_norm = lower_descent(
        problem, lower_optimizer, x, state.y, state.lower_opt_state,
        lower_batch)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
        problem, x, y, upper_batch)

    tangent = derivatives.implicit_tangent(problem, x, y, lower_batch)
    key, truncation_key = jax.random.split(state.key)
    num_terms = jax.random.randint(truncation_key, (), 0, num_neumann_terms,
                                   dtype=jnp.int32)

    def neumann_term(_, carry):
      v, sampler_ = carry
      batch, sampler_ = _data.sample(sampler_, data, "lower")
      hv = derivatives.implicit_hvp(problem, x, y, v, batch, tangent)
      return optax.tree.add_scale(v, -neumann_step_size, hv), sampler_

    v, sampler = jax.lax.fori_loop(
        0, num_terms, neumann_term,
        (derivatives.tangent_apply(tangent, grad_y_f), sampler))
    v = optax.tree.scale(num_neumann_terms * neumann_step_size, v)
    cross_batch, sampler = _data.sample(sampler, data, "lower")
    hypergradient, residual = hypergradient_from_solution(
        problem, x, y, v, grad_x_f, grad_y_f, cross_batch, tangent)
    x, upper_opt_state, info = _base.upper_step(
        problem, upper_optimizer, hypergradient, state.upper_opt_state, x,
        upper_loss=upper_loss, lower_grad_norm=lower_grad_norm,
        linear_residual_norm=residual)
    return TTSAState(x, y, upper_opt_state, lower_opt_state, sampler, key,
                     state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(
      upper_grads=1, lower_grads=1 + _base.tangent_grads(problem),
      hvps=num_neumann_terms - 1, cross_products=1)
  return _base.BilevelSolver(init, step, oracle_calls)
