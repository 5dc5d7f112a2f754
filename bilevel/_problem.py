"""The bilevel problem and its validation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
Objective = Callable[[PyTree, PyTree, Any], jax.Array]
Projection = Callable[[PyTree], PyTree]
Constraint = Callable[[PyTree, PyTree], PyTree]
JointProjection = Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]

# Fields of a Problem that constrain the lower level jointly in (x, y).
LOWER_CONSTRAINT_FIELDS = ("lower_constraints", "lower_equality_constraints",
                           "project_xy")


def _identity(tree: PyTree) -> PyTree:
  return tree


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  r"""A bilevel problem.

  .. math::

     \min_{x \in X} \Phi(x) = f(x, y^*(x)), \qquad
     y^*(x) = \arg\min_{y \in Y} g(x, y).

  With data, ``f`` and ``g`` are expectations over samples; a solver calls
  them on minibatches ``f(x, y, upper_batch)`` and ``g(x, y, lower_batch)``
  drawn from ``Data.upper`` and ``Data.lower``. Without data they receive
  ``batch=None``.

  The problem holds only functions: it is static configuration, compared and
  hashed by identity. Anything that should be differentiated, vmapped or traced
  belongs in ``x``, ``y`` or the data.

  Attributes:
    upper: the upper objective ``f(x, y, batch) -> scalar``.
    lower: the lower objective ``g(x, y, batch) -> scalar``. Implicit methods
      assume it is strongly convex in ``y`` near ``y*(x)``.
    project_x: Euclidean projection onto the convex set ``X`` (identity: none).
      ``optax.projections`` has the usual ones (box, simplex, balls).
    project_y: Euclidean projection onto the convex set ``Y``.
    lower_constraints: inequality constraints of the lower level, a callable
      ``(x, y) -> pytree of float arrays``; ``y`` is feasible for ``x`` where
      every entry is ``<= 0``. They may couple ``x`` and ``y``.
    lower_equality_constraints: equality constraints of the lower level,
      ``(x, y) -> pytree of float arrays``, feasible where every entry is
      ``== 0``.
    project_xy: Euclidean projection onto a joint convex set of ``(x, y)``,
      ``(x, y) -> (x, y)`` (structures and shapes unchanged).

  The last three fields describe a lower level constrained jointly in
  ``(x, y)``. Only :func:`bilevel.solvers.lvhba` uses them; every other
  solver refuses such a problem at construction rather than ignore them
  (see :attr:`has_lower_constraints`), and
  :func:`bilevel.constraints.penalize` turns the constraints into a
  penalty in ``g`` that they accept. :mod:`bilevel.projections` builds
  ``project_xy`` for affine sets and polyhedra.
  """

  upper: Objective
  lower: Objective
  project_x: Projection | None = None
  project_y: Projection | None = None
  lower_constraints: Constraint | None = None
  lower_equality_constraints: Constraint | None = None
  project_xy: JointProjection | None = None

  def __post_init__(self):
    for name in ("upper", "lower"):
      if not callable(getattr(self, name)):
        letter = "f" if name == "upper" else "g"
        raise TypeError(
            f"Problem.{name} must be a callable objective {letter}(x, y, "
            f"batch) -> scalar; got {type(getattr(self, name)).__name__}.")
    signatures = {
        "project_x": "x -> x", "project_y": "y -> y",
        "lower_constraints": "(x, y) -> pytree of arrays",
        "lower_equality_constraints": "(x, y) -> pytree of arrays",
        "project_xy": "(x, y) -> (x, y)"}
    for name, signature in signatures.items():
      value = getattr(self, name)
      if value is not None and not callable(value):
        raise TypeError(f"Problem.{name} must be None or a callable "
                        f"{signature}; got {type(value).__name__}.")

  @property
  def has_lower_constraints(self) -> bool:
    """Whether any of :data:`LOWER_CONSTRAINT_FIELDS` is set."""
    return bool(self.lower_constraint_fields)

  @property
  def lower_constraint_fields(self) -> tuple[str, ...]:
    """The names of the lower-constraint fields that are set."""
    return tuple(name for name in LOWER_CONSTRAINT_FIELDS
                 if getattr(self, name) is not None)

  def projected_x(self, x: PyTree) -> PyTree:
    """``x`` projected onto ``X`` (unchanged without ``project_x``)."""
    return x if self.project_x is None else self.project_x(x)

  def projected_y(self, y: PyTree) -> PyTree:
    """``y`` projected onto ``Y`` (unchanged without ``project_y``)."""
    return y if self.project_y is None else self.project_y(y)


def _describe_leaf(leaf: Any) -> str:
  if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
    dtype = getattr(leaf.dtype, "name", str(leaf.dtype))
    return f"{dtype}{list(leaf.shape)}"
  return type(leaf).__name__


def _describe(tree: PyTree) -> str:
  """The dtypes and shapes of ``tree``'s leaves, in its structure."""
  return str(jax.tree.map(_describe_leaf, tree))


def _check_float_tree(name: str, label: str, tree: PyTree) -> None:
  """Checks that ``tree`` is a non-empty pytree of floating-point arrays.

  Args:
    name: the variable's name, the root of leaf paths (``x`` or ``y``).
    label: how messages call it, e.g. ``x (the upper variable)``.
    tree: the pytree.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise TypeError(f"{label} is an empty pytree ({tree!r}): a solver needs "
                    "at least one array to optimise. None and empty "
                    "containers hold no arrays; pass e.g. jnp.zeros(n).")
  for path, leaf in leaves:
    where = name + jax.tree_util.keystr(path)
    if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
      hint = (" A Python list or tuple of numbers is a pytree of scalars, "
              "not a vector: pass jnp.asarray([...]) instead."
              if isinstance(leaf, (int, float, complex)) else "")
      raise TypeError(f"{label} must be a pytree of arrays; found a "
                      f"{type(leaf).__name__} at {where}.{hint}")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{label} must hold floating-point arrays; found dtype "
          f"{_describe_leaf(leaf)} at {where} in {_describe(tree)}. Cast "
          "it, e.g. with jnp.asarray(..., dtype=float).")


def _failure(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _check_objective(label: str, fun: Objective, x, y, batch) -> None:
  try:
    out = jax.eval_shape(fun, x, y, batch)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(
        f"Calling the {label}(x, y, batch) failed with x of structure "
        f"{_describe(x)}, y of structure {_describe(y)} and a batch of "
        f"structure {_describe(batch)}: {type(error).__name__}: {error}"
    ) from error
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    raise ValueError(
        f"The {label}(x, y, batch) must return a scalar; it returned "
        f"{_describe(out)}. Reduce it (e.g. with jnp.mean) over the batch.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f"The {label}(x, y, batch) must return a floating-point scalar; it "
        f"returned dtype {out.dtype.name}. Compute it in floating point, "
        "e.g. with .astype(float).")


def _same_layout(out: PyTree, tree: PyTree) -> bool:
  """Whether ``out`` has the structure and leaf shapes of ``tree``."""
  if jax.tree.structure(out) != jax.tree.structure(tree):
    return False
  return all(jnp.shape(a) == jnp.shape(b) for a, b in
             zip(jax.tree.leaves(out), jax.tree.leaves(tree)))


def _check_projection(label: str, fun: Projection | None, tree: PyTree):
  if fun is None:
    return
  try:
    out = jax.eval_shape(fun, tree)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(f"Calling {label} on {_describe(tree)} failed: "
                    f"{type(error).__name__}: {error}") from error
  if not _same_layout(out, jax.eval_shape(lambda t: t, tree)):
    raise ValueError(f"{label} must return a pytree of the structure and "
                     f"shapes of its input {_describe(tree)}; it returned "
                     f"{_describe(out)}.")


def _check_constraint(name: str, fun: Constraint | None, x, y,
                      feasible: str) -> None:
  """Checks that ``fun(x, y)`` returns a non-empty pytree of float arrays."""
  if fun is None:
    return
  label = f"Problem.{name}(x, y)"
  try:
    out = jax.eval_shape(fun, x, y)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(f"Calling {label} failed with x of structure "
                    f"{_describe(x)} and y of structure {_describe(y)}: "
                    f"{_failure(error)}") from error
  leaves = jax.tree.leaves(out)
  if not leaves:
    raise ValueError(f"{label} returned no arrays ({out!r}). Return the "
                     f"constraint values (feasible where {feasible}), or "
                     f"leave Problem.{name} as None.")
  for leaf in leaves:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"{label} must return a pytree of floating-point arrays (feasible "
          f"where {feasible}); it returned {_describe(out)}. Return "
          "constraint values such as jnp.sum(y) - 1.0, not booleans or "
          "integers.")


def _check_joint_projection(fun: JointProjection | None, x, y) -> None:
  """Checks that ``fun(x, y)`` returns ``(x, y)`` of the same layouts."""
  if fun is None:
    return
  try:
    out = jax.eval_shape(fun, x, y)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(f"Calling Problem.project_xy(x, y) failed with x of "
                    f"structure {_describe(x)} and y of structure "
                    f"{_describe(y)}: {_failure(error)}") from error
  expected = jax.eval_shape(lambda a, b: (a, b), x, y)
  if not (isinstance(out, (tuple, list)) and len(out) == 2 and
          _same_layout(out[0], expected[0]) and
          _same_layout(out[1], expected[1])):
    raise ValueError(
        "Problem.project_xy(x, y) must return a pair (x, y) of the "
        f"structures and shapes of its inputs ({_describe(x)}, "
        f"{_describe(y)}); it returned {_describe(out)}.")


def validate(problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
             lower_batch=None) -> None:
  """Checks that ``problem`` can be evaluated at ``(x, y)``.

  Runs only abstract evaluations (``jax.eval_shape``), so it costs no FLOPs
  and works on tracers. ``upper_batch``/``lower_batch`` may be
  ``jax.ShapeDtypeStruct`` pytrees. Solvers' ``init`` also checks that the
  initial point and the objectives there are finite (see
  ``docs/errors.md``); this function does not evaluate anything.

  Raises:
    TypeError: if ``problem`` is not a :class:`Problem`, if ``x`` or ``y`` are
      not pytrees of floating-point arrays, or if an objective, projection or
      constraint cannot be called with them (the message names it and the
      structures).
    ValueError: if an objective does not return a floating-point scalar, a
      projection changes the structure of its input, or a constraint does
      not return floating-point arrays.
  """
  if not isinstance(problem, Problem):
    raise TypeError("Expected a bilevel.Problem; got "
                    f"{type(problem).__name__}. Build one with "
                    "bilevel.Problem(upper=f, lower=g).")
  _check_float_tree("x", "x (the upper variable)", x)
  _check_float_tree("y", "y (the lower variable)", y)
  _check_objective("upper objective f", problem.upper, x, y, upper_batch)
  _check_objective("lower objective g", problem.lower, x, y, lower_batch)
  _check_projection("Problem.project_x", problem.project_x, x)
  _check_projection("Problem.project_y", problem.project_y, y)
  _check_constraint("lower_constraints", problem.lower_constraints, x, y,
                    "every entry is <= 0")
  _check_constraint("lower_equality_constraints",
                    problem.lower_equality_constraints, x, y,
                    "every entry is == 0")
  _check_joint_projection(problem.project_xy, x, y)
