"""The bilevel problem and its validation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def _article(word: str) -> str:
  return ("an " if word[:1] in "aeiou" else "a ") + word


def _number_hint(path: tuple, leaf: Any) -> str:
  """How to turn a Python number found inside a variable into an array.

  Args:
    path: the leaf's path in the variable (not empty).
    leaf: the leaf, not an array.

  Returns:
    A sentence starting with a space, or ``""`` when ``leaf`` is not a
    Python number.
  """
  if isinstance(leaf, complex):
    return (" The variables must be real floating-point arrays; a complex "
            "number cannot be optimised.")
  if not isinstance(leaf, (int, float)):
    return ""
  if isinstance(path[-1], jax.tree_util.SequenceKey):
    return (" A Python list or tuple of numbers is a pytree of scalars, "
            "not a vector: pass jnp.asarray([...]) instead.")
  return (f" A Python {type(leaf).__name__} is not an array: pass "
          f"jnp.asarray({float(leaf)!r}) there.")


def _check_not_a_number(label: str, tree: PyTree) -> None:
  """Refuses a variable that is a bare Python number, with the fix.

  Args:
    label: how messages call the variable, e.g. ``x (the upper variable)``.
    tree: the variable.

  Raises:
    TypeError: if ``tree`` is a Python ``bool``, ``int``, ``float`` or
      ``complex`` rather than an array.
  """
  if isinstance(tree, np.generic):
    return  # a NumPy scalar is a 0-d array
  if isinstance(tree, complex):
    raise TypeError(f"{label} is a Python complex ({tree!r}), not an array; "
                    "the variables must be real floating-point arrays.")
  if not isinstance(tree, (int, float)):
    return
  value = float(tree)
  raise TypeError(
      f"{label} is a Python {type(tree).__name__} ({tree!r}), not an array. "
      f"For a scalar variable pass jnp.asarray({value!r}); for a vector, an "
      f"array such as jnp.asarray([...]) or jnp.full(n, {value!r}).")


def _check_float_tree(name: str, label: str, tree: PyTree) -> None:
  """Checks that ``tree`` is a non-empty pytree of floating-point arrays.

  Args:
    name: the variable's name, the root of leaf paths (``x`` or ``y``).
    label: how messages call it, e.g. ``x (the upper variable)``.
    tree: the pytree.
  """
  _check_not_a_number(label, tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise TypeError(f"{label} is an empty pytree ({tree!r}): a solver needs "
                    "at least one array to optimise. None and empty "
                    "containers hold no arrays; pass e.g. jnp.zeros(n).")
  for path, leaf in leaves:
    where = name + jax.tree_util.keystr(path)
    if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
      raise TypeError(f"{label} must be a pytree of arrays; found "
                      f"{_article(type(leaf).__name__)} at {where}."
                      f"{_number_hint(path, leaf)}")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{label} must hold floating-point arrays; found dtype "
          f"{_describe_leaf(leaf)} at {where} in {_describe(tree)}. Cast "
          "it, e.g. with jnp.asarray(..., dtype=float).")


def _failure(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _scalar_leaves(name: str, tree: PyTree) -> list[str]:
  """The paths of the 0-d leaves of ``tree``, rooted at ``name``."""
  return [name + jax.tree_util.keystr(path) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.ndim(leaf) == 0]


def _scalar_hint(x: PyTree, y: PyTree) -> str:
  """A hint for a failed call when a variable holds 0-d arrays.

  A NumPy scalar such as ``np.float64(1.0)`` or ``jnp.asarray(1.0)`` is a
  valid variable of shape ``()``; an objective written for vectors then
  fails, and the hint says so.

  Returns:
    A sentence starting with a space, or ``""`` without 0-d leaves.
  """
  paths = _scalar_leaves("x", x) + _scalar_leaves("y", y)
  if not paths:
    return ""
  return (f" Note: {', '.join(paths)} {'is a' if len(paths) == 1 else 'are'}"
          f" 0-d array{'' if len(paths) == 1 else 's'} (shape ()); if the "
          "objective expects a vector, pass an array of that length, e.g. "
          "jnp.full(n, value) or jnp.asarray([...]).")


def _check_objective(label: str, fun: Objective, x, y, batch) -> None:
  try:
    out = jax.eval_shape(fun, x, y, batch)
  except Exception as error:  # pylint: disable=broad-except
    message = (
        f"Calling the {label}(x, y, batch) failed with x of structure "
        f"{_describe(x)}, y of structure {_describe(y)} and a batch of "
        f"structure {_describe(batch)}: {type(error).__name__}: {error}")
    hint = _scalar_hint(x, y)
    if hint:
      message = message.rstrip().rstrip(".") + "." + hint
    raise TypeError(message) from error
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


def _unit_directions(rng: np.random.Generator, tree: PyTree) -> PyTree:
  """A random direction of norm 1 shaped like ``tree`` (leaf dtypes kept).

  Drawn with NumPy on the host: ``jax.random`` would compile one sampler
  per leaf shape, which costs more than the check itself.
  """
  leaves, treedef = jax.tree.flatten(tree)
  draws = [rng.standard_normal(np.shape(leaf)) for leaf in leaves]
  norm = np.sqrt(sum(np.sum(np.square(d)) for d in draws))
  return jax.tree.unflatten(treedef, [
      np.asarray(d / norm, dtype=jnp.result_type(leaf))
      for d, leaf in zip(draws, leaves)])


def _norm(tree: PyTree) -> jax.Array:
  """The Euclidean norm of a pytree, in float32 or wider."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(leaf, jnp.promote_types(
      jnp.result_type(leaf), jnp.float32)))) for leaf in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnums=0)
def _lower_gradient_in_y(problem: Problem, x: PyTree, y: PyTree,
                         batch) -> PyTree:
  """``grad_y g(x, y, batch)``, compiled once per problem and shapes."""
  return jax.grad(problem.lower, argnums=1)(x, y, batch)


@jax.jit
def _differ(a: PyTree, b: PyTree) -> jax.Array:
  """Whether two pytrees of the same layout differ anywhere (NaN differs)."""
  same = [jnp.all(u == w) for u, w in zip(jax.tree.leaves(a),
                                          jax.tree.leaves(b))]
  return ~jnp.all(jnp.stack(same))


def _gradient_in_y_moves(problem: Problem, x: PyTree, y: PyTree, batch,
                         v: PyTree) -> jax.Array:
  """Whether ``grad_y g`` differs between ``y`` and ``y + v`` (or is NaN).

  An affine ``g`` in ``y`` has the same gradient at both points, bit for
  bit, since autodiff of a term linear in ``y`` does not involve ``y``'s
  value. The gradient is compiled once (per problem and shapes) and called
  twice.
  """
  before = _lower_gradient_in_y(problem, x, y, batch)
  after = _lower_gradient_in_y(problem, x, jax.tree.map(jnp.add, y, v),
                               batch)
  return _differ(before, after)


@functools.partial(jax.jit, static_argnums=0)
def _lower_derivatives(problem: Problem, x: PyTree, y: PyTree, batch,
                       u: PyTree, v: PyTree) -> dict[str, jax.Array]:
  """Norms of the first and second derivatives of ``g`` at ``(x, y)``.

  Two Hessian-vector products of ``g`` in ``(x, y)``: along ``(u, 0)``
  (giving ``H_xx u`` and ``H_yx u``) and along ``(0, v)`` (``H_xy v`` and
  ``H_yy v``); the gradients come with them. Compiled once per problem and
  shapes.
  """
  def gradient(x_, y_):
    return jax.grad(problem.lower, argnums=(0, 1))(x_, y_, batch)

  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  (grad_x, grad_y), (hxx_u, hyx_u) = jax.jvp(gradient, (x, y), (u, zeros(y)))
  _, (hxy_v, hyy_v) = jax.jvp(gradient, (x, y), (zeros(x), v))
  return {"grad_x": _norm(grad_x), "grad_y": _norm(grad_y),
          "hxx": _norm(hxx_u), "hyy": _norm(hyy_v),
          "cross": _norm(hyx_u) + _norm(hxy_v)}


def _constrains_y(problem: Problem) -> bool:
  """Whether the lower level restricts ``y`` to a set (so ``Y`` != R^n)."""
  return problem.project_y is not None or problem.has_lower_constraints


def check_lower_depends_on_y(problem: Problem, x: PyTree, y: PyTree,
                             batch=None, *, seed: int = 0) -> None:
  """Refuses a lower objective that cannot have a minimiser in ``y``.

  The lower problem is ``min_y g(x, y, batch)``, with ``x`` the upper
  variable. Objectives written in the wrong argument order (``g(y, x,
  batch)``) typically leave ``g`` with no curvature in ``y`` and all of
  it in ``x``; every solver then drives ``y`` off to infinity and the run
  ends in a ``DivergenceError``. In the usual case this check costs two
  gradients ``grad_y g``, at ``y`` and at ``y + v`` for a random unit
  ``v`` (one compiled gradient, called twice), which differ: ``g`` is
  curved in ``y`` and passes. Only when they are equal bit for bit does it
  measure, with Hessian-vector products along random unit directions
  ``u`` (in ``x``) and ``v`` (in ``y``), ``grad_y g``, ``H_yy v``, the
  cross terms ``H_yx u``, ``H_xy v`` and ``H_xx u`` at ``(x, y)``, and
  repeat them at a random point near it when ``H_yy v`` is zero there, so
  that a ``g`` flat in ``y`` at one point only passes. It raises:

  - when ``g`` does not depend on ``y`` at both points (gradient in ``y``,
    ``H_yy v`` and the cross terms all zero): every ``y`` minimises it, a
    degenerate lower level for every solver;
  - when ``g`` has no curvature in ``y`` at both points but has some in
    ``x``, and ``y`` is unconstrained (no ``project_y``, no lower
    constraints): ``g`` is then affine in ``y`` with a slope, unbounded
    below on ``R^n``, the signature of swapped arguments.

  A ``g`` linear in ``y`` on a constrained set (an LP-like lower level with
  ``project_y`` or lower constraints) passes, and so does any ``g`` with
  non-zero, however small, curvature in ``y``, or non-finite derivatives.
  So does a ``g`` with no curvature in ``x`` either (``-x @ y`` alone):
  unbounded below too, it looks to two points like a piecewise-linear
  ``g`` (``sum(abs(y - x))``) that has minimisers.
  Skipped when an input is abstract (under ``jax.jit``, ``jax.vmap`` or
  ``jax.eval_shape``).

  Args:
    problem: the problem.
    x: the initial upper variable (concrete).
    y: the initial lower variable (concrete).
    batch: a lower batch as ``g`` receives it (``None`` without data).
    seed: the seed of the random directions and perturbation.

  Raises:
    ValueError: in the two cases above, saying what was measured and that
      the objectives are called ``f(x, y, batch)`` and ``g(x, y, batch)``.
  """
  leaves = jax.tree.leaves((x, y, batch))
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return
  rng = np.random.default_rng(seed)
  u = _unit_directions(rng, x)
  v = _unit_directions(rng, y)
  moves = _gradient_in_y_moves(problem, x, y, batch, v)
  if isinstance(moves, jax.core.Tracer) or bool(moves):
    return  # curved in y, non-finite, or under an outer transformation
  first = jax.device_get(_lower_derivatives(problem, x, y, batch, u, v))
  if not first["hyy"] == 0.0:
    return
  x_moved = jax.tree.map(jnp.add, x, _unit_directions(rng, x))
  y_moved = jax.tree.map(jnp.add, y, _unit_directions(rng, y))
  second = jax.device_get(_lower_derivatives(problem, x_moved, y_moved,
                                             batch, u, v))
  if not second["hyy"] == 0.0:
    return
  points = (first, second)
  calling = ("The objectives are called f(x, y, batch) and g(x, y, batch), "
             "x the upper variable and y the lower one: were the arguments "
             "swapped (g(y, x, batch))?")
  depends_on_y = any(point["grad_y"] != 0.0 or point["cross"] != 0.0
                     for point in points)
  curved_in_x = max(point["hxx"] for point in points)
  if not depends_on_y:
    on_x = ("while it does depend on x" if curved_in_x != 0.0 or any(
        point["grad_x"] != 0.0 for point in points) else "nor on x")
    raise ValueError(
        "The lower objective g(x, y, batch) does not depend on y "
        f"{on_x}: its gradient in y and its Hessian in y and across (x, y) "
        "are zero at the initial point and at a random point near it, so "
        f"every y minimises it and no solver can find y*(x). {calling}")
  if curved_in_x != 0.0 and not _constrains_y(problem):
    raise ValueError(
        "The lower objective g(x, y, batch) has no curvature in y (its "
        "Hessian in y is zero at the initial point and at a random point "
        "near it) but has curvature in x (|H_xx u| = "
        f"{curved_in_x:.3g} for a unit u), and y is unconstrained (no "
        "Problem.project_y): g is affine in y with a non-zero slope, "
        "unbounded below, and the lower iterates would run off to "
        f"infinity. {calling} If g is meant to be linear in y, constrain y "
        "(Problem.project_y, or lower constraints with "
        "bilevel.solvers.lvhba).")
