r"""F2SA: fully first-order stochastic approximation (Kwon et al., ICML 2023).

The same value-function penalty as :func:`bilevel.solvers.penalty`,
:math:`\mathcal{L}_\lambda(x, y) = f(x, y) + \lambda (g(x, y) - \min_z g(x,
z))`, for an unconstrained, strongly convex lower level, with the penalty
weight and every step size on polynomial schedules of the outer step
:math:`k` (:math:`s_k = 1 + k / k_0`):

.. math::

   \lambda_k = \lambda_0 s_k^{1/7}, \quad
   \gamma_k = \gamma_0 s_k^{-4/7}, \quad
   \alpha_k = \frac{\gamma_k}{\lambda_k} = \frac{\gamma_0}{\lambda_0}
       s_k^{-5/7}, \quad
   \xi \alpha_k = \eta_0 s_k^{-5/7},

and at outer step :math:`k`

.. math::

   &\text{repeat } T \text{ times, fresh batches:} \\
   &\qquad z \leftarrow z - \gamma_k \nabla_y g(x_k, z) \\
   &\qquad y \leftarrow y - \alpha_k \bigl(\nabla_y f(x_k, y)
        + \lambda_k \nabla_y g(x_k, y)\bigr) \\
   &x_{k+1} = \Pi_X\Bigl(x_k - \xi \alpha_k \bigl[\nabla_x f(x_k, y)
        + \lambda_k \bigl(\nabla_x g(x_k, y) - \nabla_x g(x_k, z)\bigr)
        \bigr]\Bigr).

:math:`\alpha_k \lambda_k = \gamma_k`: ``y`` and ``z`` see the same step on
``g``, so ``lower_step_size`` is a plain lower step size whatever
:math:`\lambda`. The exponents give :math:`\lambda_k \to \infty` (the bias
:math:`O(1/\lambda_k)` vanishes) slowly enough for the inner iterates to
follow; they are those of our notes on the paper (``algorithms.md`` §2.2),
not checked against the PDF here, and are arguments
(``penalty_power``, ``lower_power``) should the paper's differ.

Differences from benchmark_bilevel's ``f2sa`` (the only public JAX F2SA),
where we follow the paper: it grows the penalty additively, :math:`\lambda
\leftarrow \lambda + 0.1 (k + 1)^{-1/7}`, so :math:`\lambda_k` grows like
:math:`k^{6/7}` instead of :math:`k^{1/7}`, and it decays the ``x`` step
with exponent 4/7 instead of 5/7. Like it (and unlike a third-party F2BA
script that evaluates ``y``'s lower gradient at ``z``), every gradient here
is taken at its own iterate.

References:
  Kwon, Kwon, Wright & Nowak, "A fully first-order method for stochastic
  bilevel optimization", ICML 2023.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from bilevel import _base, _data
from bilevel._problem import Problem
from bilevel._validation import (check_in_interval, check_positive,
                                 check_positive_int)
from bilevel.solvers._penalty import (PenaltyInfo, PenaltyState, inner_loop,
                                      penalty_hypergradient)

PyTree = Any

_EMPTY = optax.EmptyState()


def f2sa(problem: Problem, *, upper_step_size: float = 0.2,
         lower_step_size: float = 0.5, penalty: float = 10.0,
         num_inner_steps: int = 10, schedule_offset: float = 10.0,
         penalty_power: float = 1 / 7, lower_power: float = 4 / 7
         ) -> _base.BilevelSolver:
  r"""F2SA with the paper's polynomial schedules (see the module docstring).

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``;
      ``project_x`` is applied to ``x``, ``project_y`` to ``y`` and ``z``).
    upper_step_size: :math:`\eta_0 = \xi \alpha_0`, the ``x`` step at
      :math:`k = 0`.
    lower_step_size: :math:`\gamma_0`, the ``z`` step (and ``y``'s step on
      ``g``) at :math:`k = 0`.
    penalty: :math:`\lambda_0`. The default 10 is ours: with
      :math:`\lambda_k` growing like :math:`k^{1/7}` (a factor 2.1 over
      2000 outer steps from :math:`k_0 = 10`), the starting value sets the
      bias :math:`O(1/\lambda)` of most runs; measured on
      ``problems.quadratic`` after 2000 steps at the default step sizes:
      relative error to :math:`x^*` 0.44 from :math:`\lambda_0 = 1`, 0.086
      from 10, 0.026 from 100.
    num_inner_steps: ``T``.
    schedule_offset: :math:`k_0`: the schedules start to decay after about
      :math:`k_0` outer steps.
    penalty_power: exponent of :math:`\lambda_k` (1/7).
    lower_power: decay exponent of :math:`\gamma_k` (4/7); ``y``'s and
      ``x``'s steps decay with ``penalty_power + lower_power`` (5/7).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`PenaltyState` and
    :class:`PenaltyInfo`. One outer step costs ``(T + 1) Gf + 2 (T + 1) Gg``.
  """
  _base.require_unconstrained(problem, "f2sa")
  check_positive("upper_step_size", upper_step_size)
  check_positive("lower_step_size", lower_step_size)
  check_positive("penalty", penalty)
  check_positive_int("num_inner_steps", num_inner_steps)
  check_positive("schedule_offset", schedule_offset)
  check_in_interval("penalty_power", penalty_power, 0.0, 1.0)
  check_in_interval("lower_power", lower_power, 0.0, 1.0)

  def schedules(count):
    s = 1.0 + jnp.asarray(count, jnp.float32) / schedule_offset
    weight = penalty * s ** penalty_power
    lower = lower_step_size * s ** -lower_power
    upper = upper_step_size * s ** -(penalty_power + lower_power)
    return weight, lower, upper

  def init(x, y, *, key=None, data=None) -> PenaltyState:
    sampler = _base.prepare(problem, x, y, data, key)
    return PenaltyState(x=x, y=y, z=y, upper_opt_state=_EMPTY,
                        y_opt_state=_EMPTY, z_opt_state=_EMPTY,
                        sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: PenaltyState, data=None):
    _base.check_step_data(state.sampler, data)
    x = state.x
    weight, lower, upper = schedules(state.num_steps)
    y, z, _, _, sampler, lower_grad_norm = inner_loop(
        problem, optax.scale(-lower / weight), optax.scale(-lower), x,
        state.y, state.z, _EMPTY, _EMPTY, state.sampler, data,
        num_inner_steps, upper_weight=1.0, lower_weight=weight)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")
    hypergradient, upper_loss, lower_gap = penalty_hypergradient(
        problem, x, y, z, weight, upper_batch, lower_batch)
    x, _ = _base.update_x(problem, optax.scale(-upper), hypergradient,
                          _EMPTY, x)
    info = PenaltyInfo(
        upper_loss=upper_loss, lower_grad_norm=lower_grad_norm,
        hypergradient_norm=optax.tree.norm(hypergradient),
        penalty=jnp.asarray(weight, upper_loss.dtype), lower_gap=lower_gap)
    return PenaltyState(x, y, z, _EMPTY, _EMPTY, _EMPTY, sampler,
                        state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(
      upper_grads=num_inner_steps + 1,
      lower_grads=2 * (num_inner_steps + 1), hvps=0, cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
