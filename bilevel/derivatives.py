r"""First and second derivatives of the two objectives, by autodiff.

This is the only place where the library differentiates ``f`` and ``g``.
Second-order information is never materialised: with
:math:`H = \nabla^2_{yy} g(x, y)` and :math:`J = \nabla^2_{xy} g(x, y)` (the
derivative of :math:`\nabla_y g` with respect to ``x``), one ``jax.vjp`` of
``(x, y) -> grad_y g(x, y, batch)`` gives, for a cotangent ``v`` shaped like
``y``, both the cross product :math:`J v` (shaped like ``x``) and the
Hessian-vector product :math:`H v` (``H`` is symmetric), plus
:math:`\nabla_y g` itself as the primal output.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from bilevel._problem import Problem

PyTree = Any

__all__ = [
    "upper_value_and_grads",
    "lower_value_and_grad",
    "lower_grad",
    "lower_vjp",
    "lower_hvp",
    "lower_cross",
    "lower_hvp_and_cross",
]


def upper_value_and_grads(problem: Problem, x: PyTree, y: PyTree, batch=None):
  """``f(x, y, batch)`` and ``(grad_x f, grad_y f)`` from one backward pass."""
  value, (grad_x, grad_y) = jax.value_and_grad(problem.upper, argnums=(0, 1))(
      x, y, batch)
  return value, grad_x, grad_y


def lower_value_and_grad(problem: Problem, x: PyTree, y: PyTree, batch=None):
  """``g(x, y, batch)`` and ``grad_y g(x, y, batch)``."""
  return jax.value_and_grad(problem.lower, argnums=1)(x, y, batch)


def lower_grad(problem: Problem, x: PyTree, y: PyTree, batch=None) -> PyTree:
  """``grad_y g(x, y, batch)``."""
  return jax.grad(problem.lower, argnums=1)(x, y, batch)


def lower_vjp(problem: Problem, x: PyTree, y: PyTree, batch=None
              ) -> tuple[PyTree, Callable[[PyTree], tuple[PyTree, PyTree]]]:
  """Linearises ``grad_y g`` at ``(x, y)``.

  Returns:
    ``(grad_y_g, pullback)`` where ``pullback(v)`` returns ``(J v, H v)`` for
    ``v`` shaped like ``y``. The pullback may be called many times (e.g. inside
    a conjugate-gradient loop) at the cost of one reverse pass each, without
    re-running the forward pass.
  """
  return jax.vjp(lambda x_, y_: lower_grad(problem, x_, y_, batch), x, y)


def lower_hvp_and_cross(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
                        batch=None) -> tuple[PyTree, PyTree, PyTree]:
  """``(grad_y g, H v, J v)`` from a single ``jax.vjp``."""
  grad_y, pullback = lower_vjp(problem, x, y, batch)
  cross, hvp = pullback(v)
  return grad_y, hvp, cross


def lower_hvp(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
              batch=None) -> PyTree:
  r""":math:`\nabla^2_{yy} g(x, y)\, v` (forward-over-reverse)."""
  return jax.jvp(lambda y_: lower_grad(problem, x, y_, batch), (y,), (v,))[1]


def lower_cross(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
                batch=None) -> PyTree:
  r""":math:`\nabla^2_{xy} g(x, y)\, v`, shaped like ``x``."""
  _, pullback = jax.vjp(lambda x_: lower_grad(problem, x_, y, batch), x)
  return pullback(v)[0]
