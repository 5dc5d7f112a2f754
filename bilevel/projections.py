r"""Euclidean projections onto the convex sets of constrained bilevel problems.

``optax.projections`` has the product sets (boxes, balls, simplices) that
``Problem.project_x`` and ``Problem.project_y`` need. This module adds the
sets that couple coordinates, for ``Problem.project_xy`` and for the problem
builders:

* :func:`affine`: :math:`\{v : M v = r\}`, exact, one matrix-vector product
  (the pseudo-inverse is formed once, at construction);
* :func:`orthogonal_halfspaces`: :math:`\{v : G v \le h,\ M v = r\}` when
  the rows of :math:`G` are orthogonal to each other and to those of
  :math:`M`, exact;
* :func:`polyhedron`: :math:`\{v : G v \le h,\ M v = r\}`, a quadratic
  program solved inside JAX by ADMM (jaxopt's ``BoxOSQP``): it compiles into
  the solver's step, runs on any device and under ``vmap``, and never calls
  a CPU solver;
* :func:`joint`: lifts a projection of a flat vector to one of a pair
  ``(x, y)`` of pytrees, the signature of ``Problem.project_xy``.

Exact projections onto sets with structure (e.g. the SVM margin polyhedron in
:mod:`problems.constrained`) are cheaper than :func:`polyhedron`; use it for
a general polyhedron.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel._validation import check_positive, check_positive_int

PyTree = Any
FlatProjection = Callable[[jax.Array], jax.Array]


def _matrix(name: str, matrix) -> np.ndarray:
  matrix = np.asarray(matrix)
  if matrix.ndim != 2 or 0 in matrix.shape:
    raise ValueError(f"{name} must be a non-empty 2-D array; got shape "
                     f"{matrix.shape}.")
  if not np.all(np.isfinite(matrix)):
    raise ValueError(f"{name} must be finite.")
  return matrix


def _equality_matrix(matrix, columns: int) -> np.ndarray:
  """``equality_matrix`` as a 2-D array acting on vectors of ``columns``."""
  m = _matrix("equality_matrix", matrix)
  if m.shape[1] != columns:
    raise ValueError(f"equality_matrix has {m.shape[1]} columns and "
                     f"inequality_matrix {columns}: both act on the same "
                     "vector.")
  return m


def _vector(name: str, vector, rows: int, matrix_name: str) -> np.ndarray:
  vector = np.asarray(vector)
  if vector.shape != (rows,):
    raise ValueError(f"{name} must have shape ({rows},), one entry per row "
                     f"of {matrix_name}; got shape {vector.shape}.")
  return vector


def affine(matrix, offset=None) -> FlatProjection:
  r"""The projection onto the affine set :math:`\{v : M v = r\}`.

  .. math:: \Pi(v) = v - M^+ (M v - r)

  Args:
    matrix: :math:`M`, shape ``(m, n)``; rank-deficient is allowed (the set
      is then the least-squares solutions' set, and empty sets are not
      detected: :math:`r` must be in the range of :math:`M`).
    offset: :math:`r`, shape ``(m,)`` (default zeros).

  Returns:
    ``v -> Pi(v)`` for ``v`` of shape ``(n,)``.
  """
  matrix = _matrix("matrix", matrix)
  offset = (np.zeros(matrix.shape[0]) if offset is None else
            _vector("offset", offset, matrix.shape[0], "matrix"))
  pinv = np.linalg.pinv(matrix)

  def project(v):
    m = jnp.asarray(matrix, v.dtype)
    return v - jnp.asarray(pinv, v.dtype) @ (m @ v - jnp.asarray(offset,
                                                                 v.dtype))

  return project


def orthogonal_halfspaces(inequality_matrix, inequality_bound,
                          equality_matrix=None, equality_bound=None, *,
                          rtol: float = 1e-10) -> FlatProjection:
  r"""The exact projection onto halfspaces with orthogonal normals.

  For :math:`\{v : G v \le h,\ M v = r\}` whose rows :math:`g_i` of
  :math:`G` are orthogonal to each other and to the rows of :math:`M`:

  .. math:: \Pi(v) = w - \sum_i \frac{[g_i^\top w - h_i]_+}{\|g_i\|^2}\, g_i,
     \qquad w = v - M^+ (M v - r).

  Each correction moves along one :math:`g_i`, which changes neither
  :math:`M v` nor :math:`g_j^\top v` for :math:`j \ne i`, and the result
  satisfies the projection's optimality conditions (multipliers
  :math:`[g_i^\top w - h_i]_+ / \|g_i\|^2 \ge 0`). A single halfspace is
  the case :math:`G \in \mathbb R^{1 \times n}` without :math:`M`.

  Args:
    inequality_matrix: :math:`G`, shape ``(p, n)``, orthogonal rows.
    inequality_bound: :math:`h`, shape ``(p,)``.
    equality_matrix: :math:`M`, shape ``(m, n)``, or ``None``.
    equality_bound: :math:`r`, shape ``(m,)`` (default zeros).
    rtol: the largest :math:`|g_i^\top g_j| / (\|g_i\| \|g_j\|)`
      (:math:`i \ne j`, and likewise against :math:`M`'s rows) accepted as
      orthogonal.

  Returns:
    ``v -> Pi(v)`` for ``v`` of shape ``(n,)``.

  Raises:
    ValueError: if the rows are not orthogonal (use :func:`polyhedron`).
  """
  g = _matrix("inequality_matrix", inequality_matrix)
  h = _vector("inequality_bound", inequality_bound, g.shape[0],
              "inequality_matrix")
  norms = np.linalg.norm(g, axis=1)
  if np.any(norms == 0.0):
    raise ValueError("inequality_matrix has a zero row.")
  unit = g / norms[:, None]
  gram = unit @ unit.T - np.eye(len(h))
  affine_part = None
  if equality_matrix is not None:
    m = _equality_matrix(equality_matrix, g.shape[1])
    m_unit = m / np.maximum(np.linalg.norm(m, axis=1), 1e-300)[:, None]
    gram = np.concatenate([gram, unit @ m_unit.T], 1)
    affine_part = affine(m, equality_bound)
  if np.abs(gram).max(initial=0.0) > rtol:
    raise ValueError(
        "The rows of inequality_matrix are not orthogonal to each other and "
        "to those of equality_matrix; use bilevel.projections.polyhedron.")
  scaled = g / (norms ** 2)[:, None]

  def project(v):
    w = v if affine_part is None else affine_part(v)
    excess = jnp.maximum(jnp.asarray(g, v.dtype) @ w
                         - jnp.asarray(h, v.dtype), 0.0)
    return w - excess @ jnp.asarray(scaled, v.dtype)

  return project


def polyhedron(inequality_matrix, inequality_bound, equality_matrix=None,
               equality_bound=None, *, tol: float = 1e-6,
               maxiter: int = 10_000) -> FlatProjection:
  r"""The projection onto :math:`\{v : G v \le h,\ M v = r\}` by ADMM.

  Solves the quadratic program

  .. math:: \min_u \tfrac12 \|u - v\|^2 \quad \text{s.t.} \quad
     G u \le h,\ M u = r

  with jaxopt's ``BoxOSQP`` (OSQP's ADMM, written in JAX). The solve is
  traced into the caller: under ``jax.jit`` it compiles with the solver's
  step; no host callback, no CPU QP. Each call starts from ``u = v`` (a
  cold start: projections have no state).

  The result is feasible to about ``tol`` (ADMM's primal residual) and
  optimal to about ``tol``; for a solve to machine precision use an exact
  projection when the set has structure.

  Args:
    inequality_matrix: :math:`G`, shape ``(p, n)``.
    inequality_bound: :math:`h`, shape ``(p,)``.
    equality_matrix: :math:`M`, shape ``(m, n)``, or ``None``.
    equality_bound: :math:`r`, shape ``(m,)`` (required with ``M``).
    tol: ADMM's stopping tolerance on the primal and dual residuals.
    maxiter: ADMM iterations at most.

  Returns:
    ``v -> Pi(v)`` for ``v`` of shape ``(n,)``.
  """
  from jaxopt import BoxOSQP  # pylint: disable=import-outside-toplevel

  check_positive("tol", tol)
  check_positive_int("maxiter", maxiter)
  g = _matrix("inequality_matrix", inequality_matrix)
  h = _vector("inequality_bound", inequality_bound, g.shape[0],
              "inequality_matrix")
  rows, lows, highs = [g], [np.full(g.shape[0], -np.inf)], [h]
  if (equality_matrix is None) != (equality_bound is None):
    raise ValueError("Pass equality_matrix and equality_bound together.")
  if equality_matrix is not None:
    m = _equality_matrix(equality_matrix, g.shape[1])
    r = _vector("equality_bound", equality_bound, m.shape[0],
                "equality_matrix")
    rows, lows, highs = rows + [m], lows + [r], highs + [r]
  constraint_matrix = np.concatenate(rows)
  low, high = np.concatenate(lows), np.concatenate(highs)
  solver = BoxOSQP(matvec_Q=lambda _, u: u, tol=tol, maxiter=maxiter,
                   eq_qp_solve="cg", jit=True, implicit_diff=False)

  def project(v):
    a = jnp.asarray(constraint_matrix, v.dtype)
    bounds = (jnp.asarray(low, v.dtype), jnp.asarray(high, v.dtype))
    init = solver.init_params(v, (None, -v), a, bounds)
    solution = solver.run(init, params_obj=(None, -v), params_eq=a,
                          params_ineq=bounds).params
    return solution.primal[0]

  return project


def joint(projection: FlatProjection) -> Callable[[PyTree, PyTree],
                                                  tuple[PyTree, PyTree]]:
  """Lifts a projection of flat vectors to pairs ``(x, y)`` of pytrees.

  The flat vector is ``jax.flatten_util.ravel_pytree((x, y))``: the leaves
  of ``x`` then those of ``y``, each raveled in C order. Matrices given to
  :func:`affine` or :func:`polyhedron` index their columns that way.

  Returns:
    ``(x, y) -> (x, y)``, a ``Problem.project_xy``.
  """

  def project_xy(x, y):
    flat, unravel = ravel_pytree((x, y))
    return unravel(projection(flat))

  return project_xy
