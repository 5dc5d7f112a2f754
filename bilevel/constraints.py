r"""Lower-level constraints that may couple ``x`` and ``y``.

A :class:`bilevel.Problem` describes a constrained lower level

.. math::

   y^*(x) \in \arg\min_{y \in Y} \{\, g(x, y) :
       c(x, y) \le 0,\; e(x, y) = 0 \,\}

with ``lower_constraints`` :math:`c` and ``lower_equality_constraints``
:math:`e` (pytree-valued) and, optionally, ``project_xy``, the projection onto
a joint convex set of :math:`(x, y)`. This module holds what solvers share
about them: their values, their violation, the multiplier box, a quadratic
penalty that turns the problem into one any unconstrained solver accepts, and
the reading of affine constraints as matrices (:func:`linear_form`), from
which :func:`feasible_set_projection` builds ``project_xy``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bilevel import projections
from bilevel._problem import Problem
from bilevel._validation import check_bool, check_positive

PyTree = Any


def values(problem: Problem, x: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
  """The constraint values ``(c(x, y), e(x, y))``; ``()`` for an absent one."""
  inequality = (() if problem.lower_constraints is None
                else problem.lower_constraints(x, y))
  equality = (() if problem.lower_equality_constraints is None
              else problem.lower_equality_constraints(x, y))
  return inequality, equality


def violation(problem: Problem, x: PyTree, y: PyTree) -> jax.Array:
  r"""The largest constraint violation at ``(x, y)``.

  .. math:: \max\bigl(\max_i [c_i(x, y)]_+,\ \max_j |e_j(x, y)|\bigr)

  Returns:
    A scalar, ``0`` when ``y`` is feasible for ``x`` or the problem has no
    constraints.
  """
  inequality, equality = values(problem, x, y)
  parts = [jnp.max(jnp.maximum(leaf, 0.0)) for leaf in
           jax.tree.leaves(inequality) if jnp.size(leaf)]
  parts += [jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(equality)
            if jnp.size(leaf)]
  if not parts:
    return jnp.zeros((), jax.tree.leaves(y)[0].dtype)
  return jnp.max(jnp.stack(parts))


def project_multipliers(multipliers: tuple[PyTree, PyTree],
                        bound: float) -> tuple[PyTree, PyTree]:
  """Clips multipliers of ``(c, e)`` to ``[0, bound]`` and ``[-bound, bound]``.

  Inequality multipliers are nonnegative; equality multipliers have either
  sign. ``bound`` may be ``inf``.
  """
  inequality, equality = multipliers
  return (jax.tree.map(lambda m: jnp.clip(m, 0.0, bound), inequality),
          jax.tree.map(lambda m: jnp.clip(m, -bound, bound), equality))


def penalize(problem: Problem, weight: float, *,
             drop_joint_projection: bool = False) -> Problem:
  r"""The problem with its lower constraints moved into ``g`` as a penalty.

  .. math::

     g_\rho(x, y) = g(x, y) + \frac{\rho}{2} \sum_i [c_i(x, y)]_+^2
         + \frac{\rho}{2} \sum_j e_j(x, y)^2

  The returned problem has no constraint fields, so every solver accepts it;
  its lower solutions violate the constraints by :math:`O(1/\rho)` (the
  multiplier over :math:`\rho`). On a lower level that is not strongly convex
  (e.g. linear in part of ``y``) use a solver that allows non-unique lower
  solutions, such as :func:`bilevel.solvers.penalty`. This is the baseline
  against which :func:`bilevel.solvers.lvhba` is compared.

  Args:
    problem: a problem with lower constraints.
    weight: :math:`\rho > 0`.
    drop_joint_projection: ``project_xy`` cannot be kept (the unconstrained
      solvers project ``x`` and ``y`` separately). When it only re-imposes
      the lower constraints, as in the problems of :mod:`problems.constrained`,
      pass ``True`` to drop it; it is an error to leave it set otherwise.

  Returns:
    A :class:`bilevel.Problem` with ``lower`` replaced by :math:`g_\rho`,
    the same ``upper``, ``project_x`` and ``project_y``, and no constraints.

  Raises:
    ValueError: if ``weight`` is not positive, or if ``problem`` has
      ``project_xy`` and ``drop_joint_projection`` is false.
  """
  if not isinstance(problem, Problem):
    raise TypeError("penalize expects a bilevel.Problem; got "
                    f"{type(problem).__name__}.")
  check_positive("weight", weight)
  check_bool("drop_joint_projection", drop_joint_projection)
  if problem.project_xy is not None and not drop_joint_projection:
    raise ValueError(
        "The problem has Problem.project_xy, which the penalized problem "
        "cannot keep: unconstrained solvers project x and y separately. If "
        "the joint set only re-imposes the lower constraints, pass "
        "drop_joint_projection=True; otherwise express it with project_x "
        "and project_y.")

  def lower(x, y, batch):
    inequality, equality = values(problem, x, y)
    squares = optax.tree.sum(jax.tree.map(
        lambda c: jnp.sum(jnp.maximum(c, 0.0) ** 2), inequality))
    squares = squares + optax.tree.sum(jax.tree.map(
        lambda e: jnp.sum(e ** 2), equality))
    return problem.lower(x, y, batch) + 0.5 * weight * squares

  return dataclasses.replace(problem, lower=lower, lower_constraints=None,
                             lower_equality_constraints=None,
                             project_xy=None)


# ---------------------------------------------------------------------------
# Affine constraints as matrices.

# Dense constraint matrices larger than this (entries) are not formed.
MAX_MATRIX_ENTRIES = 20_000_000


class LinearForm(NamedTuple):
  r"""Affine lower constraints written on the flat vector of ``(x, y)``.

  With :math:`v` = ``jax.flatten_util.ravel_pytree((x, y))[0]`` (the leaves
  of ``x``, then those of ``y``, each raveled in C order; the layout
  :func:`bilevel.projections.joint` uses), the feasible set is

  .. math:: \{v : G v \le h,\ M v = r\}.

  Attributes:
    inequality_matrix: :math:`G`, shape ``(p, n)`` (``p`` may be 0).
    inequality_bound: :math:`h`, shape ``(p,)``.
    equality_matrix: :math:`M`, shape ``(m, n)`` (``m`` may be 0).
    equality_bound: :math:`r`, shape ``(m,)``.
    num_x: the first ``num_x`` columns belong to ``x``, the others to ``y``.
  """
  inequality_matrix: np.ndarray
  inequality_bound: np.ndarray
  equality_matrix: np.ndarray
  equality_bound: np.ndarray
  num_x: int


def _template(tree: PyTree) -> PyTree:
  """Concrete zeros shaped like ``tree`` (whose leaves may be tracers)."""
  return jax.tree.map(lambda leaf: np.zeros(jnp.shape(leaf),
                                            jnp.result_type(leaf)), tree)


def flat_layout(x: PyTree, y: PyTree):
  """The flat layout of ``(x, y)``: ``(num_x, n, dtype, unravel)``.

  ``unravel`` maps a flat vector of length ``n`` back to ``(x, y)``; the
  first ``num_x`` entries are those of ``x``. Only shapes and dtypes of
  ``x`` and ``y`` are read, so they may be tracers.
  """
  with jax.ensure_compile_time_eval():
    flat_x, _ = ravel_pytree(_template(x))
    flat, unravel = ravel_pytree((_template(x), _template(y)))
  return flat_x.size, flat.size, flat.dtype, unravel


def _affine_tolerance(dtype) -> float:
  return float(np.finfo(np.dtype(dtype)).eps ** (1.0 / 3.0))


def affine_coefficients(fun: Callable[[PyTree, PyTree], PyTree], x: PyTree,
                        y: PyTree, *, seed: int = 0):
  r"""The matrix and offset of ``fun`` if it is affine in ``(x, y)``.

  How it is decided, with :math:`F(v)` = ``fun`` on the flat vector
  :math:`v` of ``(x, y)`` (see :class:`LinearForm`) and its output raveled:
  three points are drawn, :math:`v_0 \sim N(0, I)`,
  :math:`v_1 \sim N(0, 3^2 I)` and :math:`v_2 \sim N(\mathbf 1, 10^2 I)`
  (NumPy, fixed ``seed``), and a direction :math:`d \sim N(0, I)`. ``fun``
  is taken as affine when, entry by entry and to a relative tolerance
  :math:`\epsilon^{1/3}` of the output dtype (6e-6 in float64, 5e-3 in
  float32) of the magnitudes compared (plus 1% of the largest output, for
  entries that cancel),

  * the linearisation at :math:`v_0` predicts the values at the other two
    points: :math:`F(v_i) = F(v_0) + F'(v_0)(v_i - v_0)`, :math:`i = 1, 2`
    (one Jacobian-vector product each);
  * the derivative along :math:`d` is the same at :math:`v_1` and
    :math:`v_2`.

  A function that is not affine fails these tests except on a set of
  points of measure zero, unless it is affine on a region that contains
  all three points (e.g. ``jnp.maximum(y, -100.0)``): such a function would
  be read as affine there. The matrix is then formed with ``jax.jacrev``
  (or ``jax.jacfwd`` when it has more rows than columns) at :math:`v_0`.

  Args:
    fun: ``(x, y) -> pytree of arrays``.
    x: the upper variable (only its structure, shapes and dtypes are read).
    y: the lower variable (likewise).
    seed: seed of the NumPy generator of the test points.

  Returns:
    ``(matrix, offset)`` as float64 NumPy arrays, with
    ``ravel(fun(x, y)) = matrix @ v + offset``, or ``None`` if ``fun`` is
    not affine (or returns non-finite values at the test points).

  Raises:
    ValueError: if ``fun`` is affine but its matrix would have more than
      :data:`MAX_MATRIX_ENTRIES` entries.
  """
  _, n, dtype, unravel = flat_layout(x, y)
  rng = np.random.default_rng(seed)
  points = [rng.standard_normal(n), 3.0 * rng.standard_normal(n),
            1.0 + 10.0 * rng.standard_normal(n)]
  direction = rng.standard_normal(n)

  def flat_fun(v):
    return ravel_pytree(fun(*unravel(v)))[0]

  with jax.ensure_compile_time_eval():
    points = [jnp.asarray(p, dtype) for p in points]
    direction = jnp.asarray(direction, dtype)
    jvp = jax.jit(lambda v, d: jax.jvp(flat_fun, (v,), (d,)))
    values, slopes = [], []
    for i, point in enumerate(points):
      tangent = direction if i else points[1] - points[0]
      value, slope = jvp(point, tangent)
      values.append(np.asarray(value, np.float64))
      slopes.append(np.asarray(slope, np.float64))
    _, slope_02 = jvp(points[0], points[2] - points[0])
    slope_02 = np.asarray(slope_02, np.float64)
    if not all(np.all(np.isfinite(a)) for a in values + slopes + [slope_02]):
      return None
    rtol = _affine_tolerance(jnp.result_type(*jax.tree.leaves(
        jax.eval_shape(flat_fun, points[0]))))
    # Entry by entry, against the magnitudes involved, with a floor of 1% of
    # the largest of them (for entries that cancel to near zero).
    floor = 0.01 * max(np.abs(a).max(initial=0.0)
                       for a in values + slopes + [slope_02])

    def close(a, b, *magnitudes):
      scale = sum(np.abs(m) for m in magnitudes) + floor
      return bool(np.all(np.abs(a - b) <= rtol * scale))

    if not (close(values[1] - values[0], slopes[0], values[1], values[0],
                  slopes[0]) and
            close(values[2] - values[0], slope_02, values[2], values[0],
                  slope_02) and
            close(slopes[1], slopes[2], slopes[1], slopes[2])):
      return None
    rows = values[0].size
    if rows * n > MAX_MATRIX_ENTRIES:
      raise ValueError(
          f"The constraints are affine, but their matrix would have {rows} x "
          f"{n} = {rows * n} entries (more than {MAX_MATRIX_ENTRIES}); pass "
          "Problem.project_xy, an exact projection onto the feasible set.")
    jacobian = (jax.jacrev if rows < n else jax.jacfwd)(flat_fun)
    matrix = np.asarray(jax.jit(jacobian)(points[0]), np.float64).reshape(
        rows, n)
  offset = values[0] - matrix @ np.asarray(points[0], np.float64)
  return matrix, offset


def _merge_opposite_rows(matrix, bound, tol):
  """Splits rows of ``G v <= h`` into inequalities and equalities.

  A pair of rows ``g v <= b`` and ``-g v <= -b`` (up to positive scaling)
  is the hyperplane ``g v = b``; every such pair becomes one equality row.

  Returns:
    ``(G, h, M, r)`` with the pairs removed from ``(G, h)`` and placed in
    ``(M, r)``.
  """
  norms = np.linalg.norm(matrix, axis=1)
  unit = matrix / norms[:, None]
  unit_bound = bound / norms
  cosines = unit @ unit.T
  used = np.zeros(len(bound), bool)
  equality = []
  for i in range(len(bound)):
    if used[i]:
      continue
    for j in np.nonzero(cosines[i] < -1.0 + tol)[0]:
      if j > i and not used[j] and abs(unit_bound[i] + unit_bound[j]) <= tol * (
          1.0 + abs(unit_bound[i])):
        used[i] = used[j] = True
        equality.append(i)
        break
  keep = ~used
  return (matrix[keep], bound[keep], matrix[equality], bound[equality])


def linear_form(problem: Problem, x: PyTree, y: PyTree) -> LinearForm | None:
  r"""The lower constraints as :math:`G v \le h,\ M v = r` if affine.

  Reads ``lower_constraints`` :math:`c` and ``lower_equality_constraints``
  :math:`e` with :func:`affine_coefficients` (``c(v) = A v + a`` gives
  :math:`G = A`, :math:`h = -a`), then simplifies: rows ``g v <= b`` and
  ``-g v <= -b`` (the usual way of writing an equality as two inequalities)
  become one equality row, and rows with a zero gradient (constants) are
  dropped when they hold.

  Args:
    problem: a problem with ``lower_constraints`` or
      ``lower_equality_constraints``.
    x: the upper variable (structure, shapes and dtypes are read).
    y: the lower variable (likewise).

  Returns:
    A :class:`LinearForm`, or ``None`` if a constraint field is not affine.

  Raises:
    ValueError: if the constraints are affine but no point satisfies them
      (a violated constant row, or inconsistent equalities), or if the
      matrices would be too large to form.
  """
  num_x, n, dtype, _ = flat_layout(x, y)
  parts = []
  for fun in (problem.lower_constraints, problem.lower_equality_constraints):
    if fun is None:
      parts.append((np.zeros((0, n)), np.zeros(0)))
      continue
    coefficients = affine_coefficients(fun, x, y)
    if coefficients is None:
      return None
    matrix, offset = coefficients
    parts.append((matrix, -offset))
  (g, h), (m, r) = parts
  tol = _affine_tolerance(dtype)
  scale = 1.0 + max([np.abs(a).max(initial=0.0) for a in (g, h, m, r)])
  constant = np.linalg.norm(g, axis=1) <= tol * scale
  if np.any(h[constant] < -tol * scale):
    raise ValueError(
        "Problem.lower_constraints has an entry that does not depend on "
        "(x, y) and is positive: no point is feasible.")
  g, h = g[~constant], h[~constant]
  constant = np.linalg.norm(m, axis=1) <= tol * scale
  if np.any(np.abs(r[constant]) > tol * scale):
    raise ValueError(
        "Problem.lower_equality_constraints has an entry that does not "
        "depend on (x, y) and is not zero: no point is feasible.")
  m, r = m[~constant], r[~constant]
  if 0 < len(h) <= 5000:
    g, h, m_pairs, r_pairs = _merge_opposite_rows(g, h, tol)
    m, r = np.concatenate([m, m_pairs]), np.concatenate([r, r_pairs])
  if len(r):
    residual = m @ (np.linalg.pinv(m) @ r) - r
    if np.linalg.norm(residual) > tol * (1.0 + np.linalg.norm(r)):
      raise ValueError(
          "The lower equality constraints are affine and inconsistent (no "
          "(x, y) satisfies all of them: residual "
          f"{np.linalg.norm(residual):.3g}).")
  return LinearForm(g, h, m, r, num_x)


def feasible_set_projection(form: LinearForm, *, tol: float = 1e-8,
                            maxiter: int = 10_000):
  r"""``project_xy`` onto the polyhedron of a :class:`LinearForm`.

  Exact when it can be: equalities only, :func:`bilevel.projections.affine`;
  inequality rows orthogonal to each other and to the equality rows (one
  halfspace, a box, separate sums), :func:`bilevel.projections.
  orthogonal_halfspaces`. Otherwise :func:`bilevel.projections.polyhedron`,
  a QP solved by ADMM inside the compiled step, feasible to about ``tol``
  and far slower: for sets with structure write an exact projection.

  Returns:
    ``(x, y) -> (x, y)``, for ``Problem.project_xy``.
  """
  g, h = form.inequality_matrix, form.inequality_bound
  m, r = form.equality_matrix, form.equality_bound
  equality = (m, r) if len(r) else (None, None)
  if not len(h):
    flat = projections.affine(m, r)
  else:
    try:
      flat = projections.orthogonal_halfspaces(g, h, *equality)
    except ValueError:
      flat = projections.polyhedron(g, h, *equality, tol=tol,
                                    maxiter=maxiter)
  return projections.joint(flat)
