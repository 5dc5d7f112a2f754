r"""Hypergradients :math:`\nabla \Phi(x)` of :math:`\Phi(x) = f(x, y^*(x))`.

Two estimators, each written once and used by every solver that needs it:

* implicit differentiation (AID): with :math:`H = \nabla^2_{yy} g`,
  :math:`J = \nabla^2_{xy} g` at :math:`(x, y)` and ``v`` solving
  :math:`H v = \nabla_y f`,

  .. math:: \nabla \Phi(x) \approx \nabla_x f(x, y) - J v ;

  with ``project_y`` the projected version of :mod:`bilevel.derivatives`
  (:math:`\tilde H u = D \nabla_y f`, :math:`\nabla_x f - J D u`), right
  where :math:`y^*` lies on the boundary of ``Y``;

* unrolled differentiation (ITD): reverse-mode differentiation of
  :math:`x \mapsto f(x, y_K(x))` through ``K`` lower-level optimizer steps
  run as a ``lax.scan``.

References:
  Pedregosa, "Hyperparameter optimization with approximate gradient" (HOAG),
  ICML 2016. Franceschi et al., "Forward and reverse gradient-based
  hyperparameter optimization", ICML 2017. Grazzi et al., "On the iteration
  complexity of hypergradient computation", ICML 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from bilevel import derivatives
from bilevel import linear_solve as linear_solve_lib
from bilevel._problem import Problem
from bilevel._validation import as_optimizer, check_positive_int

PyTree = Any

__all__ = [
    "ImplicitInfo",
    "SingleLoopEstimate",
    "linear_descent",
    "single_loop_estimate",
    "hypergradient_from_solution",
    "implicit_hypergradient",
    "implicit_hypergradient_and_info",
    "UnrolledInfo",
    "unrolled_hypergradient",
    "unrolled_hypergradient_and_info",
    "lower_descent",
]


class ImplicitInfo(NamedTuple):
  """By-products of :func:`implicit_hypergradient_and_info`.

  Attributes:
    v: the solution of :math:`H v = \\nabla_y f` (warm start for the next
      call).
    upper_loss: ``f(x, y, upper_batch)``.
    lower_grad_norm: :math:`\\|\\nabla_y g(x, y)\\|` on the lower batch.
    linear_residual_norm: :math:`\\|H v - \\nabla_y f\\|`.
  """
  v: PyTree
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  linear_residual_norm: jax.Array


def implicit_hypergradient_and_info(
    problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
    lower_batch=None, *, linear_solver: linear_solve_lib.LinearSolver | None
    = None, v_init: PyTree | None = None
) -> tuple[PyTree, ImplicitInfo]:
  r"""Implicit hypergradient and its diagnostics.

  Cost: one upper gradient, one linearisation of :math:`\nabla_y g` (a
  forward and a backward pass), ``linear_solver.max_matvecs`` reverse passes
  for the solve and one more that gives :math:`J v` and, for free,
  :math:`H v` (hence the residual).

  With ``problem.project_y`` the system is that of the projected fixed
  point (:mod:`bilevel.derivatives`): :math:`\tilde H v = D \nabla_y f`
  and the estimate :math:`\nabla_x f - J D v`, exact where :math:`y^*`
  lies on the boundary of ``Y`` (active bounds of a box, a face of a
  simplex, the sphere of a ball).

  Args:
    problem: the bilevel problem.
    x: upper variable.
    y: lower variable, ideally close to :math:`y^*(x)`; the estimate is exact
      at :math:`y = y^*(x)` with an exact solve.
    upper_batch: batch passed to ``f``.
    lower_batch: batch passed to ``g`` (the same for every matvec).
    linear_solver: a :class:`bilevel.linear_solve.LinearSolver`; default
      ``cg(tol=1e-10, maxiter=100)``.
    v_init: warm start for the linear solve.

  Returns:
    ``(hypergradient, info)``; the hypergradient is shaped like ``x``.
  """
  if linear_solver is None:
    linear_solver = linear_solve_lib.cg()
  upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
      problem, x, y, upper_batch)
  grad_y_g, pullback, tangent = derivatives.implicit_vjp(
      problem, x, y, lower_batch)
  rhs = derivatives.tangent_apply(tangent, grad_y_f)
  v = linear_solver.solve(lambda u: pullback(u)[1], rhs, v_init)
  hypergradient, residual = _estimate(pullback, v, grad_x_f, rhs)
  info = ImplicitInfo(v=v, upper_loss=upper_loss,
                      lower_grad_norm=optax.tree.norm(grad_y_g),
                      linear_residual_norm=residual)
  return hypergradient, info


def _estimate(pullback, v, grad_x_f, grad_y_f):
  cross, hv = pullback(v)
  return (optax.tree.sub(grad_x_f, cross),
          linear_solve_lib.residual_norm(hv, grad_y_f))


def hypergradient_from_solution(problem: Problem, x: PyTree, y: PyTree,
                                v: PyTree, grad_x_f: PyTree, grad_y_f: PyTree,
                                lower_batch=None, tangent=None
                                ) -> tuple[PyTree, jax.Array]:
  r"""The estimate :math:`\nabla_x f - J v` for a given ``v``, and its residual.

  For solvers that compute ``v`` their own way (Neumann series with fresh
  batches, SGD on the linear system). One ``jax.vjp`` of
  :math:`\nabla_y g` on ``lower_batch`` gives :math:`J v` and, for free,
  :math:`H v`. With ``project_y`` the estimate is :math:`\nabla_x f - J D v`
  and the residual :math:`\|\tilde H v - D \nabla_y f\|`
  (:mod:`bilevel.derivatives`), with ``tangent`` :math:`D` (by default from
  :math:`\nabla_y g` on ``lower_batch``).

  Returns:
    ``(hypergradient, ||H v - grad_y f||)``.
  """
  _, pullback, tangent = derivatives.implicit_vjp(problem, x, y, lower_batch,
                                                  tangent)
  return _estimate(pullback, v, grad_x_f,
                   derivatives.tangent_apply(tangent, grad_y_f))


class SingleLoopEstimate(NamedTuple):
  r"""What :func:`single_loop_estimate` returns.

  Attributes:
    upper_loss: ``f(x, y, upper_batch)``.
    lower_grad: :math:`\nabla_y g(x, y)` on the lower batch.
    hypergradient: :math:`\nabla_x f - J v`.
    linear_grad: :math:`H v - \nabla_y f`, the gradient in ``v`` of
      :math:`\tfrac12 v^\top H v - \nabla_y f^\top v`.
    linear_residual_norm: :math:`\|H v - \nabla_y f\|`.
  """
  upper_loss: jax.Array
  lower_grad: PyTree
  hypergradient: PyTree
  linear_grad: PyTree
  linear_residual_norm: jax.Array


def single_loop_estimate(problem: Problem, x: PyTree, y: PyTree, v: PyTree,
                         upper_batch=None, lower_batch=None
                         ) -> SingleLoopEstimate:
  r"""Every oracle of a single-loop step (SOBA, MA-SOBA, BO-REP) at once.

  One ``jax.vjp`` of :math:`\nabla_y g` on ``lower_batch`` gives
  :math:`\nabla_y g`, :math:`H v` and :math:`J v`; one backward pass of
  ``f`` on ``upper_batch`` gives :math:`\nabla_x f` and :math:`\nabla_y f`.
  Cost: ``1 Gf + 1 Gg + 1 HVP + 1 JVP``. With ``project_y``, ``H`` is the
  projected operator :math:`\tilde H`, the right-hand side
  :math:`D \nabla_y f` and the cross term :math:`J D v`
  (:mod:`bilevel.derivatives`).
  """
  lower_grad, pullback, tangent = derivatives.implicit_vjp(
      problem, x, y, lower_batch)
  cross, hv = pullback(v)
  upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
      problem, x, y, upper_batch)
  linear_grad = optax.tree.sub(hv, derivatives.tangent_apply(tangent,
                                                             grad_y_f))
  return SingleLoopEstimate(upper_loss, lower_grad,
                            optax.tree.sub(grad_x_f, cross), linear_grad,
                            optax.tree.norm(linear_grad))


def linear_descent(optimizer: optax.GradientTransformation,
                   linear_grad: PyTree, opt_state: PyTree, v: PyTree,
                   radius: float | None = None):
  r"""One optimizer step on :math:`\tfrac12 v^\top H v - \nabla_y f^\top v`.

  Projected onto the ball :math:`\|v\| \le` ``radius`` when given (the
  safeguard of the analyses of MA-SOBA and BO-REP).

  Returns:
    ``(v, opt_state)``.
  """
  updates, opt_state = optimizer.update(linear_grad, opt_state, v)
  v = optax.apply_updates(v, updates)
  if radius is not None:
    v = optax.projections.projection_l2_ball(v, radius)
  return v, opt_state


def implicit_hypergradient(
    problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
    lower_batch=None, *, linear_solver: linear_solve_lib.LinearSolver | None
    = None, v_init: PyTree | None = None) -> PyTree:
  r"""Implicit (AID) hypergradient :math:`\nabla_x f - J H^{-1} \nabla_y f`.

  Example:
    >>> import jax, bilevel, problems
    >>> jax.config.update("jax_enable_x64", True)
    >>> instance = problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4)
    >>> x = instance.x0
    >>> y = instance.lower_solution(x)
    >>> h = bilevel.implicit_hypergradient(instance.problem, x, y)
    >>> bool(jax.numpy.allclose(h, instance.hypergradient(x)))
    True

  See :func:`implicit_hypergradient_and_info` for the arguments.
  """
  return implicit_hypergradient_and_info(
      problem, x, y, upper_batch, lower_batch, linear_solver=linear_solver,
      v_init=v_init)[0]


def lower_descent(problem: Problem, optimizer: optax.GradientTransformation,
                  x: PyTree, y: PyTree, opt_state: PyTree, batch=None):
  """One (projected) optimizer step on ``g(x, ., batch)``.

  Returns:
    ``(y, opt_state, lower_grad_norm)``, the norm taken before the step.
  """
  grad = derivatives.lower_grad(problem, x, y, batch)
  updates, opt_state = optimizer.update(grad, opt_state, y)
  y = problem.projected_y(optax.apply_updates(y, updates))
  return y, opt_state, optax.tree.norm(grad)


class UnrolledInfo(NamedTuple):
  """By-products of :func:`unrolled_hypergradient_and_info`.

  Attributes:
    y: the last lower iterate :math:`y_K` (no gradient attached).
    upper_loss: ``f(x, y_K, upper_batch)``.
    lower_grad_norm: gradient norm before the last lower step.
  """
  y: PyTree
  upper_loss: jax.Array
  lower_grad_norm: jax.Array


def unrolled_hypergradient_and_info(
    problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
    lower_batch=None, *, lower_optimizer: Any = 0.1, num_steps: int = 100,
    lower_batches: PyTree | None = None) -> tuple[PyTree, UnrolledInfo]:
  r"""Unrolled hypergradient :math:`\frac{d}{dx} f(x, y_K(x))` and diagnostics.

  :math:`y_0 = y` (treated as a constant) and :math:`y_{k+1}` is one step of
  ``lower_optimizer`` (a fresh optimizer state, so the map is the same at
  every call) on :math:`g(x, \cdot)`, projected onto ``Y``. Reverse mode
  through a ``lax.scan`` stores the ``K`` iterates: memory grows linearly
  with ``num_steps``.

  Args:
    problem: the bilevel problem.
    x: upper variable.
    y: starting point of the unrolled lower iterations.
    upper_batch: batch for ``f``.
    lower_batch: batch for ``g``, used at every step (ignored if
      ``lower_batches`` is given).
    lower_optimizer: an optax optimizer, a step size or a schedule.
    num_steps: ``K``.
    lower_batches: optional batches stacked on a leading axis of length
      ``num_steps``, one per step.

  Returns:
    ``(hypergradient, info)``.
  """
  check_positive_int("num_steps", num_steps)
  optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  y = jax.lax.stop_gradient(y)

  def upper_at_unrolled(x_):
    def body(carry, batch):
      y_, opt_state, _ = carry
      batch = lower_batch if lower_batches is None else batch
      return lower_descent(problem, optimizer, x_, y_, opt_state, batch), None

    init = (y, optimizer.init(y), optax.tree.norm(y) * 0.0)
    (y_last, _, grad_norm), _ = jax.lax.scan(
        body, init, lower_batches, length=num_steps)
    return problem.upper(x_, y_last, upper_batch), (y_last, grad_norm)

  (loss, (y_last, grad_norm)), hypergradient = jax.value_and_grad(
      upper_at_unrolled, has_aux=True)(x)
  info = UnrolledInfo(y=jax.lax.stop_gradient(y_last), upper_loss=loss,
                      lower_grad_norm=jax.lax.stop_gradient(grad_norm))
  return hypergradient, info


def unrolled_hypergradient(
    problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
    lower_batch=None, *, lower_optimizer: Any = 0.1, num_steps: int = 100,
    lower_batches: PyTree | None = None) -> PyTree:
  """Unrolled (ITD) hypergradient; see :func:`unrolled_hypergradient_and_info`.
  """
  return unrolled_hypergradient_and_info(
      problem, x, y, upper_batch, lower_batch,
      lower_optimizer=lower_optimizer, num_steps=num_steps,
      lower_batches=lower_batches)[0]
