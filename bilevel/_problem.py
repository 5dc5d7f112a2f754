"""The bilevel problem and its validation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
Objective = Callable[[PyTree, PyTree, Any], jax.Array]
Projection = Callable[[PyTree], PyTree]


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
  """

  upper: Objective
  lower: Objective
  project_x: Projection | None = None
  project_y: Projection | None = None

  def __post_init__(self):
    for name in ("upper", "lower"):
      if not callable(getattr(self, name)):
        letter = "f" if name == "upper" else "g"
        raise TypeError(
            f"Problem.{name} must be a callable objective {letter}(x, y, "
            f"batch) -> scalar; got {type(getattr(self, name)).__name__}.")
    for name in ("project_x", "project_y"):
      value = getattr(self, name)
      if value is not None and not callable(value):
        raise TypeError(f"Problem.{name} must be None or a callable; got "
                        f"{type(value).__name__}.")

  def projected_x(self, x: PyTree) -> PyTree:
    """``x`` projected onto ``X`` (unchanged without ``project_x``)."""
    return x if self.project_x is None else self.project_x(x)

  def projected_y(self, y: PyTree) -> PyTree:
    """``y`` projected onto ``Y`` (unchanged without ``project_y``)."""
    return y if self.project_y is None else self.project_y(y)


def _describe(tree: PyTree) -> str:
  shapes = jax.tree.map(
      lambda leaf: f"{jnp.result_type(leaf).name}{list(jnp.shape(leaf))}",
      tree)
  return str(shapes)


def _check_float_tree(name: str, tree: PyTree) -> None:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise TypeError(f"{name} is an empty pytree: a solver needs at least one "
                    "array to optimise.")
  for leaf in leaves:
    try:
      dtype = jnp.result_type(leaf)
    except TypeError as error:
      raise TypeError(f"{name} must be a pytree of arrays; found a leaf of "
                      f"type {type(leaf).__name__}.") from error
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{name} must hold floating-point arrays; found "
                      f"dtype {dtype.name} in {_describe(tree)}. Cast it, "
                      "e.g. with jnp.asarray(..., dtype=float).")


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
        f"returned dtype {out.dtype.name}.")


def _check_projection(label: str, fun: Projection | None, tree: PyTree):
  if fun is None:
    return
  try:
    out = jax.eval_shape(fun, tree)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(f"Calling {label} on {_describe(tree)} failed: "
                    f"{type(error).__name__}: {error}") from error
  expected = jax.eval_shape(lambda t: t, tree)
  if (jax.tree.structure(out) != jax.tree.structure(expected) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(out),
                                         jax.tree.leaves(expected)))):
    raise ValueError(f"{label} must return a pytree of the structure and "
                     f"shapes of its input {_describe(tree)}; it returned "
                     f"{_describe(out)}.")


def validate(problem: Problem, x: PyTree, y: PyTree, upper_batch=None,
             lower_batch=None) -> None:
  """Checks that ``problem`` can be evaluated at ``(x, y)``.

  Runs only abstract evaluations (``jax.eval_shape``), so it costs no FLOPs
  and works on tracers. ``upper_batch``/``lower_batch`` may be
  ``jax.ShapeDtypeStruct`` pytrees.

  Raises:
    TypeError: if ``problem`` is not a :class:`Problem`, if ``x`` or ``y`` are
      not pytrees of floating-point arrays, or if an objective cannot be called
      with them (the message names the objective and the structures).
    ValueError: if an objective does not return a floating-point scalar or a
      projection changes the structure of its input.
  """
  if not isinstance(problem, Problem):
    raise TypeError("Expected a bilevel.Problem; got "
                    f"{type(problem).__name__}.")
  _check_float_tree("x (the upper variable)", x)
  _check_float_tree("y (the lower variable)", y)
  _check_objective("upper objective f", problem.upper, x, y, upper_batch)
  _check_objective("lower objective g", problem.lower, x, y, lower_batch)
  _check_projection("Problem.project_x", problem.project_x, x)
  _check_projection("Problem.project_y", problem.project_y, y)
