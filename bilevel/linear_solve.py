r"""Solvers for the linear system :math:`H v = b` of implicit differentiation.

:math:`H = \nabla^2_{yy} g` is symmetric positive definite near a strict lower
minimum, so conjugate gradients runs on ``H`` itself (never on the normal
equations :math:`H^2 v = H b`, which square the condition number). Every
option that bounds accuracy is explicit: CG's ``tol``/``atol``/``maxiter``,
Neumann's ``step_size``/``num_terms``.

A :class:`LinearSolver` bundles ``solve(matvec, b, x0=None)`` with
``max_matvecs``, the number of matrix-vector products it may spend, which
solvers report as Hessian-vector products in their oracle counts.

Precision: both solvers keep their iterates (and CG its residual, search
direction and step lengths) in one working dtype, the common floating dtype
of the leaves of ``b`` promoted to at least float32. ``matvec`` still
receives, and the solution is returned in, the dtypes of ``b``'s own leaves.
For a float32 or float64 ``b`` (all leaves alike) nothing changes. A
bfloat16 (or float16) system is solved with low-precision matrix-vector
products and float32 recurrences, and a pytree mixing dtypes (bfloat16 and
float32 leaves, or float32 and float64) can be solved at all.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel._validation import check_positive, check_positive_int

PyTree = Any

__all__ = ["LinearSolver", "cg", "neumann", "neumann_series", "residual_norm"]


class LinearSolver(NamedTuple):
  """A linear solve ``solve(matvec, b, x0=None) -> x`` and its budget."""
  solve: Callable[..., PyTree]
  max_matvecs: int


def _working_dtype(tree: PyTree):
  """The common dtype of ``tree``'s leaves, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(*jax.tree.leaves(tree)),
                           jnp.float32)


def _casts(b: PyTree):
  """``(to_working, to_b)``: casts of a pytree shaped like ``b``.

  ``to_working`` casts every leaf to :func:`_working_dtype` of ``b``;
  ``to_b`` casts every leaf back to the dtype of the matching leaf of ``b``.
  Both are identities (no conversion is traced) when every leaf of ``b``
  already has the working dtype.
  """
  working = _working_dtype(b)
  leaves, treedef = jax.tree.flatten(b)
  dtypes = [jnp.result_type(leaf) for leaf in leaves]

  def to_working(tree):
    return jax.tree.map(lambda leaf: jnp.asarray(leaf).astype(working), tree)

  def to_b(tree):
    return treedef.unflatten([jnp.asarray(leaf).astype(dtype) for leaf, dtype
                              in zip(treedef.flatten_up_to(tree), dtypes)])

  return to_working, to_b


def cg(*, tol: float = 1e-10, atol: float = 0.0, maxiter: int = 100
       ) -> LinearSolver:
  r"""Conjugate gradients for a symmetric positive definite operator.

  Stops when :math:`\|H v - b\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})`
  or after ``maxiter`` iterations (one matvec each). Warm-started from ``x0``
  when given (zero otherwise). Runs ``jax.scipy.sparse.linalg.cg``, which works
  on pytrees.

  The recurrences run in the working dtype of the module docstring (at least
  float32): ``jax.scipy.sparse.linalg.cg`` takes its step lengths in the
  common dtype of all the leaves, so on a pytree mixing dtypes it would
  promote the narrower leaves and fail to trace, and in bfloat16 its
  iterate would stop moving once the corrections fall below half a unit in
  the last place (8 significant bits). ``matvec`` is called on the iterate
  cast to ``b``'s dtypes, so the products keep their precision and cost.

  Args:
    tol: relative tolerance on the residual.
    atol: absolute tolerance on the residual.
    maxiter: maximum number of iterations.

  References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", J. Res. Nat. Bur. Standards, 1952.
  """
  check_positive("cg tol", tol, allow_zero=True)
  check_positive("cg atol", atol, allow_zero=True)
  check_positive_int("cg maxiter", maxiter)

  def solve(matvec, b, x0=None):
    to_working, to_b = _casts(b)
    x, _ = jax.scipy.sparse.linalg.cg(
        lambda u: to_working(matvec(to_b(u))), to_working(b),
        x0=None if x0 is None else to_working(x0), tol=tol, atol=atol,
        maxiter=maxiter)
    return to_b(x)

  return LinearSolver(solve, maxiter)


def neumann_series(matvec: Callable[..., PyTree], b: PyTree, *,
                   step_size: float, num_terms: int, x0: PyTree | None = None,
                   operands: PyTree | None = None) -> PyTree:
  r"""Truncated Neumann series (Richardson iteration) for :math:`H v = b`.

  Iterates :math:`v_{k+1} = v_k - \eta (H_k v_k - b)` for ``num_terms`` steps
  from :math:`v_0 = \eta b` (or ``x0``). From the default start this is the
  Neumann partial sum

  .. math:: v_K = \eta \sum_{j=0}^{K} (I - \eta H)^j b
     \;\to\; H^{-1} b \quad (K \to \infty),

  which converges when :math:`0 < \eta < 2 / \lambda_{\max}(H)`.

  The iterate accumulates in the working dtype of the module docstring (at
  least float32; ``matvec`` gets it cast to ``b``'s dtypes): in bfloat16 the
  corrections :math:`\eta (H v - b)` would be lost to rounding as soon as
  they fall below half a unit in the last place of ``v``.

  Args:
    matvec: ``matvec(v) -> H v``, or ``matvec(v, operand) -> H_k v`` when
      ``operands`` is given.
    b: right-hand side, a pytree shaped like ``v``.
    step_size: :math:`\eta`.
    num_terms: :math:`K`, the number of matvecs.
    x0: optional warm start (replaces :math:`\eta b`).
    operands: optional pytree with a leading axis of length ``num_terms``;
      step ``k`` passes its slice ``k`` to ``matvec``. Stochastic methods
      (StocBiO, TTSA) pass one fresh minibatch per term this way.

  Returns:
    :math:`v_K`, in the dtypes of ``b``.

  References:
    Ghadimi & Wang, "Approximation methods for bilevel programming", 2018;
    Ji, Yang & Liang, "Bilevel optimization: convergence analysis and enhanced
    design" (StocBiO), ICML 2021.
  """
  to_working, to_b = _casts(b)
  b_working = to_working(b)
  v0 = (optax.tree.scale(step_size, b_working) if x0 is None
        else to_working(x0))

  def body(v, operand):
    u = to_b(v)
    hv = to_working(matvec(u) if operands is None else matvec(u, operand))
    return optax.tree.add_scale(v, -step_size,
                                optax.tree.sub(hv, b_working)), None

  v, _ = jax.lax.scan(body, v0, operands, length=num_terms)
  return to_b(v)


def neumann(*, step_size: float, num_terms: int) -> LinearSolver:
  """Neumann series as a :class:`LinearSolver`; see :func:`neumann_series`."""
  check_positive("neumann step_size", step_size)
  check_positive_int("neumann num_terms", num_terms)

  def solve(matvec, b, x0=None):
    return neumann_series(matvec, b, step_size=step_size,
                          num_terms=num_terms, x0=x0)

  return LinearSolver(solve, num_terms)


def residual_norm(hv: PyTree, b: PyTree) -> jax.Array:
  """``||H v - b||`` given ``H v``."""
  return optax.tree.norm(optax.tree.sub(hv, b))
