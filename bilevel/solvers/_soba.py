r"""SOBA: single-loop stochastic bilevel optimization.

At step :math:`t`, with one lower batch for :math:`\nabla_y g`, :math:`H` and
:math:`J` (all three from one ``jax.vjp``) and one upper batch for
:math:`\nabla f`, all evaluated at :math:`(x_t, y_t, v_t)`:

.. math::

   y_{t+1} &= y_t - \rho_t \nabla_y g(x_t, y_t) \\
   v_{t+1} &= v_t - \rho^v_t \big(H v_t - \nabla_y f(x_t, y_t)\big) \\
   x_{t+1} &= \Pi_X\big(x_t - \gamma_t (\nabla_x f(x_t, y_t) - J v_t)\big)

(steps through the three optax optimizers). Sign convention: here
:math:`v \approx +H^{-1} \nabla_y f` as in every solver of this library; the
paper and benchopt's code store :math:`-v`.

References:
  Dagréou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that
  enables stochastic and global variance reduction algorithms", NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from bilevel import _base, _data, derivatives
from bilevel import linear_solve as linear_solve_lib
from bilevel._problem import Problem
from bilevel._validation import as_optimizer

PyTree = Any


class SOBAState(NamedTuple):
  """State of :func:`soba`."""
  x: PyTree
  y: PyTree
  v: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  linear_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


def soba(problem: Problem, *, upper_optimizer: Any = 0.5,
         lower_optimizer: Any = 0.5, linear_optimizer: Any = 0.5
         ) -> _base.BilevelSolver:
  """SOBA.

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``).
    upper_optimizer: optax optimizer, step size or schedule for ``x``
      (:math:`\\gamma`). The paper's theory uses decreasing steps, e.g.
      ``optax.schedules.polynomial_schedule`` or ``lambda t: c / sqrt(t+1)``.
    lower_optimizer: same for ``y`` (:math:`\\rho`).
    linear_optimizer: same for ``v`` (:math:`\\rho^v`).

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs
    ``1 Gf + 1 Gg + 1 HVP + 1 JVP``.
  """
  upper_optimizer = as_optimizer("upper_optimizer", upper_optimizer)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  linear_optimizer = as_optimizer("linear_optimizer", linear_optimizer)

  def init(x, y, *, key=None, data=None) -> SOBAState:
    sampler = _base.prepare(problem, x, y, data, key)
    return SOBAState(
        x=x, y=y, v=optax.tree.zeros_like(y),
        upper_opt_state=upper_optimizer.init(x),
        lower_opt_state=lower_optimizer.init(y),
        linear_opt_state=linear_optimizer.init(y), sampler=sampler,
        num_steps=jax.numpy.zeros((), jax.numpy.int32))

  def step(state: SOBAState, data=None):
    _base.check_step_data(state.sampler, data)
    x, y, v = state.x, state.y, state.v
    lower_batch, sampler = _data.sample(state.sampler, data, "lower")
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    grad_y_g, hv, cross = derivatives.lower_hvp_and_cross(
        problem, x, y, v, lower_batch)
    upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
        problem, x, y, upper_batch)
    linear_grad = optax.tree.sub(hv, grad_y_f)
    hypergradient = optax.tree.sub(grad_x_f, cross)

    updates, lower_opt_state = lower_optimizer.update(
        grad_y_g, state.lower_opt_state, y)
    y_next = problem.projected_y(optax.apply_updates(y, updates))
    updates, linear_opt_state = linear_optimizer.update(
        linear_grad, state.linear_opt_state, v)
    v_next = optax.apply_updates(v, updates)
    x_next, upper_opt_state, info = _base.upper_step(
        problem, upper_optimizer, hypergradient, state.upper_opt_state, x,
        upper_loss=upper_loss, lower_grad_norm=optax.tree.norm(grad_y_g),
        linear_residual_norm=linear_solve_lib.residual_norm(hv, grad_y_f))
    return SOBAState(x_next, y_next, v_next, upper_opt_state,
                     lower_opt_state, linear_opt_state, sampler,
                     state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1, lower_grads=1, hvps=1,
                                   cross_products=1)
  return _base.BilevelSolver(init, step, oracle_calls)
