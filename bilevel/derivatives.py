r"""First and second derivatives of the two objectives, by autodiff.

This is the only place where the library differentiates ``f`` and ``g``.
Second-order information is never materialised: with
:math:`H = \nabla^2_{yy} g(x, y)` and :math:`J = \nabla^2_{xy} g(x, y)` (the
derivative of :math:`\nabla_y g` with respect to ``x``), one ``jax.vjp`` of
``(x, y) -> grad_y g(x, y, batch)`` gives, for a cotangent ``v`` shaped like
``y``, both the cross product :math:`J v` (shaped like ``x``) and the
Hessian-vector product :math:`H v` (``H`` is symmetric), plus
:math:`\nabla_y g` itself as the primal output.

**A lower level constrained to a convex set Y** (``Problem.project_y``).
Then :math:`y^*(x)` is the fixed point of the projected gradient map
:math:`y = \Pi_Y(y - \eta \nabla_y g(x, y))`, and the unconstrained formula
:math:`\nabla_x f - J H^{-1} \nabla_y f` is wrong wherever :math:`y^*` lies
on the boundary of ``Y``. Differentiating the fixed point, with
:math:`D = \partial \Pi_Y(y - \eta \nabla_y g)` the projection's Jacobian
(by autodiff of ``project_y``; symmetric, with eigenvalues in
:math:`[0, 1]`, wherever a Euclidean projection onto a convex set is
differentiable), gives

.. math::

   \frac{dy^*}{dx}^{\!\top} \nabla_y f = -J D u, \qquad
   \tilde H u = D \nabla_y f, \qquad
   \tilde H = D \Big(\frac{I - D}{\eta} + H D\Big)

(written :math:`\tilde H u = D((u - Du)/\eta + H D u)`), a symmetric
positive semi-definite system whose solution enters the hypergradient only
through :math:`D u`. On a box, :math:`D` is the 0/1 mask of the free
coordinates and :math:`D u` solves :math:`H_{FF} (Du)_F = (\nabla_y f)_F`
on the free coordinates ``F``; on the face of a simplex, :math:`D`
projects onto the face's tangent space; on the sphere of a ball of radius
``R``, :math:`D = (I - \hat z \hat z^\top) R / \|z\|` and the system
becomes :math:`(H + \mu I)` on the tangent space, :math:`\mu` the
constraint's multiplier, exactly the derivative of the KKT conditions. At an
exact fixed point the result does not depend on :math:`\eta`
(:data:`PROJECTION_STEP_SIZE`); it only decides which bounds count as
active at an inexact ``y``. Without ``project_y``, :math:`D = I` and every
function below reduces to the unconstrained one, bit for bit.

References:
  Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa &
  Vert, "Efficient and modular implicit differentiation", NeurIPS 2022
  (the projected gradient fixed point). Gould, Fernando, Cherian, Anderson,
  Santa Cruz & Guo, "On differentiating parameterized argmin and argmax
  problems with application to bi-level optimization", 2016 (the KKT
  derivative on an active constraint).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

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
    "PROJECTION_STEP_SIZE",
    "lower_tangent",
    "implicit_tangent",
    "tangent_apply",
    "implicit_vjp",
    "implicit_hvp",
]

# The step size eta of the projected fixed point y = P_Y(y - eta grad_y g)
# that the implicit derivatives differentiate (see the module docstring).
PROJECTION_STEP_SIZE = 1.0


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


def lower_tangent(problem: Problem, y: PyTree, lower_grad_: PyTree,
                  step_size: float = PROJECTION_STEP_SIZE
                  ) -> Callable[[PyTree], PyTree] | None:
  r"""The Jacobian :math:`D` of :math:`\Pi_Y` at :math:`y - \eta \nabla_y g`.

  Args:
    problem: the bilevel problem.
    y: the lower variable.
    lower_grad_: :math:`\nabla_y g(x, y)` (on some lower batch).
    step_size: :math:`\eta`.

  Returns:
    The linear map :math:`u \mapsto D u` (a ``jax.linearize`` of
    ``problem.project_y``), or ``None`` without ``project_y``
    (:math:`D = I`).

  Raises:
    ValueError: if JAX cannot differentiate ``project_y``.
  """
  if problem.project_y is None:
    return None
  point = optax.tree.add_scale(y, -step_size, lower_grad_)
  try:
    return jax.linearize(problem.project_y, point)[1]
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        "Problem.project_y cannot be differentiated by JAX "
        f"({type(error).__name__}: {str(error).strip().splitlines()[0]}), "
        "but implicit and unrolled hypergradients need its Jacobian where "
        "y* lies on the boundary of Y. Write the projection with "
        "differentiable jax.numpy operations (optax.projections has boxes, "
        "simplices and balls), or use a solver that does not differentiate "
        "it: bilevel.solvers.penalty or penalty_momentum.") from error


def implicit_tangent(problem: Problem, x: PyTree, y: PyTree, batch=None
                     ) -> Callable[[PyTree], PyTree] | None:
  """:func:`lower_tangent` at ``(x, y)`` from a lower gradient on ``batch``.

  Costs one lower gradient with ``project_y``, nothing without it.
  """
  if problem.project_y is None:
    return None
  return lower_tangent(problem, y, lower_grad(problem, x, y, batch))


def tangent_apply(tangent: Callable[[PyTree], PyTree] | None,
                  tree: PyTree) -> PyTree:
  """:math:`D` applied to ``tree`` (``tree`` itself when ``D = I``)."""
  return tree if tangent is None else tangent(tree)


def _projected_operator(tangent, hvp, u, step_size=PROJECTION_STEP_SIZE):
  r""":math:`D((u - Du)/\eta + H D u)` given ``hvp`` = :math:`H D u`."""
  du = tangent(u)
  return tangent(optax.tree.add_scale(hvp(du), 1.0 / step_size,
                                      optax.tree.sub(u, du)))


def implicit_vjp(problem: Problem, x: PyTree, y: PyTree, batch=None,
                 tangent: Callable[[PyTree], PyTree] | None = None):
  r"""Linearises the lower optimality condition at ``(x, y)``.

  Without ``project_y`` this is :func:`lower_vjp`; with it, the operators of
  the projected fixed point (module docstring).

  Args:
    problem: the bilevel problem.
    x: upper variable.
    y: lower variable.
    batch: lower batch.
    tangent: :math:`D`, if already computed (e.g. once per step for
      several batches); by default from :math:`\nabla_y g` on ``batch``.

  Returns:
    ``(grad_y_g, pullback, tangent)``: ``pullback(u)`` returns
    :math:`(J D u, \tilde H u)` (:math:`(J u, H u)` without ``project_y``)
    and ``tangent`` is :math:`D` (``None`` for the identity), to map
    :math:`\nabla_y f` to the right-hand side :math:`D \nabla_y f`.
  """
  grad_y, pullback = lower_vjp(problem, x, y, batch)
  if problem.project_y is None:
    return grad_y, pullback, None
  if tangent is None:
    tangent = lower_tangent(problem, y, grad_y)

  def projected_pullback(u):
    du = tangent(u)
    cross, hdu = pullback(du)
    operator = _projected_operator(tangent, lambda _: hdu, u)
    return cross, operator

  return grad_y, projected_pullback, tangent


def implicit_hvp(problem: Problem, x: PyTree, y: PyTree, u: PyTree,
                 batch=None, tangent: Callable[[PyTree], PyTree] | None = None
                 ) -> PyTree:
  r""":math:`\tilde H u` of the projected fixed point (:math:`H u` without
  ``project_y``), one forward-over-reverse product on ``batch``.

  ``tangent`` is :math:`D` (:func:`implicit_tangent`); with ``project_y``
  and no ``tangent`` it is computed from :math:`\nabla_y g` on ``batch``.
  """
  if problem.project_y is None:
    return lower_hvp(problem, x, y, u, batch)
  if tangent is None:
    tangent = implicit_tangent(problem, x, y, batch)
  return _projected_operator(
      tangent, lambda du: lower_hvp(problem, x, y, du, batch), u)


def lower_hvp(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
              batch=None) -> PyTree:
  r""":math:`\nabla^2_{yy} g(x, y)\, v` (forward-over-reverse)."""
  return jax.jvp(lambda y_: lower_grad(problem, x, y_, batch), (y,), (v,))[1]


def lower_cross(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
                batch=None) -> PyTree:
  r""":math:`\nabla^2_{xy} g(x, y)\, v`, shaped like ``x``."""
  _, pullback = jax.vjp(lambda x_: lower_grad(problem, x_, y, batch), x)
  return pullback(v)[0]
