r"""BOME: bilevel optimization made easy (Liu, Ye, Wright, Stone & Liu, 2022).

A first-order method on the value-function reformulation
:math:`\min_{x, y} f(x, y)` subject to :math:`q(x, y) = g(x, y) - \min_{y'}
g(x, y') \le 0`, with :math:`\min_{y'} g` estimated by ``T`` gradient
steps. At step :math:`k`:

.. math::

   \hat y &= T \text{ lower steps on } g(x_k, \cdot) \text{ from } y_k
       \quad (\text{no gradient through them}) \\
   \nabla q &= \bigl(\nabla_x g(x_k, y_k) - \nabla_x g(x_k, \hat y),\;
       \nabla_y g(x_k, y_k)\bigr) \\
   \lambda_k &= \max\Bigl(\frac{\phi_k - \langle \nabla f, \nabla q \rangle}
       {\|\nabla q\|^2}, 0\Bigr), \qquad
       \phi_k = \eta \|\nabla q\|^2 \ (\text{or } \eta\, q) \\
   (x_{k+1}, y_{k+1}) &= \Pi_{X \times Y}\bigl((x_k, y_k)
       - \alpha (\nabla f + \lambda_k \nabla q)\bigr)

with :math:`\nabla f = (\nabla_x f, \nabla_y f)` at :math:`(x_k, y_k)`.
:math:`\lambda_k` is the smallest multiplier for which the joint step
decreases ``q`` at rate :math:`\phi_k` (a dynamic barrier): the direction
is the projection of :math:`-\nabla f` onto
:math:`\{d : \langle \nabla q, d \rangle \ge \phi_k\}`. Both lower gradients
of :math:`\nabla q` are taken on one lower batch.

References:
  Liu, Ye, Wright, Stone & Liu, "BOME! Bilevel optimization made easy: a
  simple first-order approach", NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, derivatives
from bilevel._problem import Problem
from bilevel._validation import (as_optimizer, check_positive,
                                 check_positive_int, check_step_size)

PyTree = Any

_CONTROLS = ("grad_norm", "value")


class BOMEState(NamedTuple):
  """State of :func:`bome`."""
  x: PyTree
  y: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  inner_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


class BOMEInfo(NamedTuple):
  r"""Diagnostics of one step.

  Attributes:
    upper_loss: ``f(x_k, y_k)`` on the upper batch.
    lower_grad_norm: :math:`\|\nabla_y g(x_k, y_k)\|`.
    hypergradient_norm: norm of the ``x`` part of :math:`\nabla f +
      \lambda_k \nabla q`.
    multiplier: :math:`\lambda_k`.
    lower_gap: :math:`q(x_k, y_k) = g(x_k, y_k) - g(x_k, \hat y)`.
  """
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  multiplier: jax.Array
  lower_gap: jax.Array


def bome(problem: Problem, *, step_size: Any = 0.1,
         lower_optimizer: Any = 0.5, num_lower_steps: int = 10,
         eta: float = 0.5, control: str = "grad_norm"
         ) -> _base.BilevelSolver:
  r"""BOME (see the module docstring for the update rule).

  Args:
    problem: the bilevel problem; ``project_x`` and ``project_y`` apply to
      the joint step, ``project_y`` also to the inner steps.
    step_size: :math:`\alpha`, the joint step on ``(x, y)`` (a number or a
      schedule of the step count).
    lower_optimizer: optax optimizer, step size or schedule of the ``T``
      inner steps computing :math:`\hat y` (restarted from ``y_k`` each
      step; its state persists).
    num_lower_steps: ``T``.
    eta: :math:`\eta > 0` of the control :math:`\phi_k`.
    control: ``"grad_norm"`` (:math:`\phi = \eta \|\nabla q\|^2`, the
      paper's default) or ``"value"`` (:math:`\phi = \eta\, q`).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`BOMEState` and
    :class:`BOMEInfo`; one step costs ``1 Gf + (T + 2) Gg``.
  """
  _base.require_unconstrained(problem, "bome")
  check_step_size("step_size", step_size)
  joint_optimizer = optax.sgd(step_size)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  check_positive_int("num_lower_steps", num_lower_steps)
  check_positive("eta", eta)
  if control not in _CONTROLS:
    raise ValueError(f"control must be one of {_CONTROLS}; got {control!r}.")

  def init(x, y, *, key=None, data=None) -> BOMEState:
    sampler = _base.prepare(problem, x, y, data, key)
    return BOMEState(x=x, y=y, upper_opt_state=joint_optimizer.init(x),
                     lower_opt_state=joint_optimizer.init(y),
                     inner_opt_state=lower_optimizer.init(y),
                     sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: BOMEState, data=None):
    _base.check_step_data(state.sampler, data)
    x, y = state.x, state.y
    y_hat, inner_opt_state, sampler, _ = _base.lower_loop(
        problem, lower_optimizer, x, y, state.inner_opt_state,
        state.sampler, data, num_lower_steps)
    y_hat = jax.lax.stop_gradient(y_hat)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")
    upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
        problem, x, y, upper_batch)
    g_y, (grad_x_g, grad_y_g) = jax.value_and_grad(problem.lower, (0, 1))(
        x, y, lower_batch)
    g_hat, grad_x_g_hat = jax.value_and_grad(problem.lower)(x, y_hat,
                                                            lower_batch)
    grad_q = (optax.tree.sub(grad_x_g, grad_x_g_hat), grad_y_g)
    grad_f = (grad_x_f, grad_y_f)
    q = g_y - g_hat
    q_norm2 = optax.tree.vdot(grad_q, grad_q)
    phi = eta * (q_norm2 if control == "grad_norm" else q)
    multiplier = jnp.maximum(phi - optax.tree.vdot(grad_f, grad_q), 0.0) / (
        q_norm2 + jnp.finfo(q_norm2.dtype).tiny)
    direction_x, direction_y = jax.tree.map(
        lambda f_, q_: (f_ + multiplier * q_).astype(f_.dtype), grad_f,
        grad_q)
    x, upper_opt_state = _base.update_x(problem, joint_optimizer,
                                        direction_x, state.upper_opt_state, x)
    updates, lower_opt_state = joint_optimizer.update(
        direction_y, state.lower_opt_state, y)
    y = problem.projected_y(optax.apply_updates(y, updates))
    info = BOMEInfo(
        upper_loss=upper_loss, lower_grad_norm=optax.tree.norm(grad_y_g),
        hypergradient_norm=optax.tree.norm(direction_x),
        multiplier=multiplier.astype(upper_loss.dtype), lower_gap=q)
    return BOMEState(x, y, upper_opt_state, lower_opt_state, inner_opt_state,
                     sampler, state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1,
                                   lower_grads=num_lower_steps + 2, hvps=0,
                                   cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
