"""The solver protocol and the pieces every solver shares."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import _data, derivatives, linear_solve
from bilevel._problem import Problem, check_lower_depends_on_y, validate
from bilevel._validation import check_positive_int, describe_value
from bilevel.hypergradient import lower_descent

PyTree = Any


class OracleCalls(NamedTuple):
  """Oracle calls of one solver step (upper bounds where a solve may stop).

  Attributes:
    upper_grads: gradients of ``f`` (one backward pass gives both
      ``grad_x f`` and ``grad_y f``).
    lower_grads: gradients ``grad_y g``.
    hvps: Hessian-vector products ``H v``.
    cross_products: cross products ``J v``.
  """
  upper_grads: int
  lower_grads: int
  hvps: int
  cross_products: int

  def __str__(self) -> str:
    return (f"{self.upper_grads} Gf + {self.lower_grads} Gg + {self.hvps} HVP "
            f"+ {self.cross_products} JVP")


class BilevelSolver(NamedTuple):
  """A bilevel solver: pure ``init`` and ``step`` functions.

  Attributes:
    init: ``init(x, y, *, key=None, data=None) -> state``. Validates the
      problem at ``(x, y)`` (abstractly with ``jax.eval_shape``, plus one
      compiled forward pass of ``f`` and ``g`` on a first batch to refuse a
      non-finite start when the inputs are concrete) and builds the state.
      A solver may do real work here, once (BO-REP's initialization
      refinement).
    step: ``step(state, data=None) -> (state, info)``. Pure and jittable;
      ``data`` is a :class:`bilevel.Data` (or ``None``) and is an argument, so
      new data of the same shapes does not recompile.
    oracle_calls: the :class:`OracleCalls` of one step.
    spec: how the solver was built, a :class:`SolverSpec` (the factory's
      name, the problem and every other argument of the factory, defaults
      included), set by the factories of :mod:`bilevel.solvers`; ``None``
      for a solver assembled by hand. :func:`bilevel.run` fingerprints it
      to tell whether a checkpoint belongs to the run
      (:mod:`bilevel.checkpoint`). Compared and hashed by identity, like
      ``init`` and ``step``.
  """
  init: Callable[..., Any]
  step: Callable[..., tuple[Any, Any]]
  oracle_calls: OracleCalls
  spec: Any = None


class SolverSpec:
  """How a solver was built: its factory's name and arguments.

  Compared and hashed by identity (``BilevelSolver`` is a static argument of
  ``jax.jit``, hashed on every call; its hyperparameters may be arrays or
  tracers).

  Attributes:
    name: the factory's name in :mod:`bilevel.solvers` (``"aid"``).
    problem: the :class:`bilevel.Problem` given to the factory.
    hyperparameters: every other argument of the factory by name, defaults
      applied (``{"upper_optimizer": 1.0, "lower_optimizer": 0.5, ...}``), as
      given (a step size stays a number, an optax optimizer an optimizer).
    init, step: the functions the factory built; a solver whose ``init`` or
      ``step`` is not these (``solver._replace(step=...)``) was changed
      after it was built.
  """

  def __init__(self, name: str, problem: Any, hyperparameters: dict,
               init: Callable[..., Any], step: Callable[..., Any]):
    self.name = name
    self.problem = problem
    self.hyperparameters = hyperparameters
    self.init = init
    self.step = step

  def __repr__(self) -> str:
    return (f"SolverSpec({self.name!r}, hyperparameters="
            f"{sorted(self.hyperparameters)})")


def recorded(factory: Callable[..., BilevelSolver]
             ) -> Callable[..., BilevelSolver]:
  """``factory`` whose solvers carry a :class:`SolverSpec` of their build.

  The returned function has ``factory``'s name, docstring and signature
  (``functools.wraps``). Its first parameter is the problem; every other
  argument, defaults applied, is a hyperparameter.
  """
  signature = inspect.signature(factory)
  problem_name = next(iter(signature.parameters))

  @functools.wraps(factory)
  def build(*args, **kwargs) -> BilevelSolver:
    solver = factory(*args, **kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    hyperparameters = {}
    for name, value in bound.arguments.items():
      kind = signature.parameters[name].kind
      if name == problem_name:
        continue
      if kind is inspect.Parameter.VAR_KEYWORD:
        hyperparameters.update(value)
      else:
        hyperparameters[name] = value
    spec = SolverSpec(factory.__name__, bound.arguments.get(problem_name),
                      hyperparameters, solver.init, solver.step)
    return solver._replace(spec=spec)

  return build


class HypergradientInfo(NamedTuple):
  """Diagnostics of one step of a hypergradient-based solver.

  Attributes:
    upper_loss: ``f`` at the point where the hypergradient was estimated, on
      that step's upper batch.
    lower_grad_norm: ``||grad_y g||`` before the last lower update of the
      step, on its lower batch.
    hypergradient_norm: norm of the hypergradient estimate used for ``x``.
    linear_residual_norm: ``||H v - grad_y f||`` of the linear-system
      variable used in the estimate (0 for estimators without one).
  """
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  linear_residual_norm: jax.Array


def require_unconstrained(problem: Problem, solver_name: str) -> None:
  """Refuses, at solver construction, a problem with lower constraints.

  Args:
    problem: the problem given to the solver factory.
    solver_name: the factory's name in ``bilevel.solvers``.

  Raises:
    TypeError: if ``problem`` is not a :class:`bilevel.Problem`.
    ValueError: if ``problem`` sets any of ``lower_constraints``,
      ``lower_equality_constraints`` or ``project_xy``, which the solver
      would otherwise silently ignore.
  """
  if not isinstance(problem, Problem):
    raise TypeError(
        f"bilevel.solvers.{solver_name} expects a bilevel.Problem as its "
        f"first argument; got {type(problem).__name__}. Build one with "
        "bilevel.Problem(upper=f, lower=g).")
  if not problem.has_lower_constraints:
    return
  fields = ", ".join(f"Problem.{name}"
                     for name in problem.lower_constraint_fields)
  raise ValueError(
      f"bilevel.solvers.{solver_name} cannot handle lower-level constraints "
      f"({fields}): it would silently ignore them. Use "
      "bilevel.solvers.lvhba, which handles constraints that couple x and "
      "y; or turn them into a penalty in g with "
      "bilevel.constraints.penalize(problem, rho) (biased by O(1/rho)); or "
      "use project_x/project_y when the set is a product of a set of x and "
      "a set of y.")


def check_linear_solver(name: str, value: Any) -> None:
  """Checks that ``value`` is a :class:`bilevel.linear_solve.LinearSolver`.

  Raises:
    TypeError: otherwise (e.g. the factory ``bilevel.linear_solve.cg``
      itself, or a bare function).
  """
  if isinstance(value, linear_solve.LinearSolver):
    check_positive_int(f"{name}.max_matvecs", value.max_matvecs,
                       allow_zero=True)
    if callable(value.solve):
      return
  raise TypeError(
      f"{name} must be a bilevel.linear_solve.LinearSolver, e.g. "
      "bilevel.linear_solve.cg(maxiter=10) or "
      "bilevel.linear_solve.neumann(step_size=0.5, num_terms=10); got "
      f"{describe_value(value)}.")


def _first_batch(data: _data.Data | None, level: str) -> PyTree:
  """A batch like those ``level``'s objective sees, without sampling.

  Returns:
    The first ``batch_size`` samples of the level's data, all of it without
    a batch size, or ``None`` when the level has no data.
  """
  arrays = None if data is None else getattr(data, level)
  if arrays is None:
    return None
  size = getattr(data, f"{level}_batch_size")
  if size is None:
    return arrays
  return jax.tree.map(lambda leaf: leaf[:size], arrays)


@functools.partial(jax.jit, static_argnums=0)
def _initial_values(problem: Problem, x: PyTree, y: PyTree, data):
  """Finiteness of each leaf of ``x`` and ``y``, and ``f``, ``g`` there.

  One compiled program (cached per problem and shapes) with one forward
  pass of each objective, on the first minibatch of each level.
  """
  def finite(tree):
    return jnp.stack([jnp.all(jnp.isfinite(leaf))
                      for leaf in jax.tree.leaves(tree)])

  return (finite(x), finite(y),
          problem.upper(x, y, _first_batch(data, "upper")),
          problem.lower(x, y, _first_batch(data, "lower")))


def _is_concrete(tree: PyTree) -> bool:
  return all(isinstance(leaf, (np.ndarray, np.generic)) or
             (isinstance(leaf, jax.Array) and
              not isinstance(leaf, jax.core.Tracer))
             for leaf in jax.tree.leaves(tree))


def _nonfinite_leaf_message(name: str, label: str, tree: PyTree,
                            flags) -> str:
  """The message for the first leaf of ``tree`` whose flag is false."""
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  index = int(np.argmin(flags))
  path, leaf = paths_and_leaves[index]
  leaf = np.asarray(leaf)
  bad = ~np.asarray(np.isfinite(leaf))
  first = np.unravel_index(int(np.argmax(bad)), leaf.shape)
  where = f" at index {tuple(int(i) for i in first)}" if leaf.ndim else ""
  return (f"{name}{jax.tree_util.keystr(path)} ({label}) is not finite: "
          f"{int(bad.sum())} of {leaf.size} entries are NaN or infinite "
          f"(the first is {leaf[first]}{where}). A solver cannot start from "
          f"a non-finite point: check how {name} was computed (e.g. the log "
          "of a non-positive number or a division by zero) and pass finite "
          "values.")


def _batch_description(data: _data.Data | None, level: str) -> str:
  arrays = None if data is None else getattr(data, level)
  if arrays is None:
    return "with batch=None"
  size = getattr(data, f"{level}_batch_size")
  if size is None:
    return f"on the whole of Data.{level}"
  return f"on its first batch (the first {size} samples of Data.{level})"


def check_initial_point(problem: Problem, x: PyTree, y: PyTree,
                        data: _data.Data | None) -> None:
  """Checks that ``x``, ``y`` and the objectives there are finite.

  Costs one forward pass of ``f`` and of ``g`` on one batch each, compiled
  once per problem and shapes. Skipped when any input is abstract (``init``
  under ``jax.jit``, ``jax.vmap`` or ``jax.eval_shape``).

  Raises:
    ValueError: naming the first non-finite leaf of ``x`` or ``y`` (by its
      path), or the objective that is not finite, with its value; or, from
      :func:`bilevel._problem.check_lower_depends_on_y`, when ``g`` does not depend
      on ``y`` or is affine in an unconstrained ``y`` (swapped arguments).
  """
  if not _is_concrete((x, y, data)):
    return
  values = _initial_values(problem, x, y, data)
  if any(isinstance(value, jax.core.Tracer)
         for value in jax.tree.leaves(values)):
    return  # called inside an outer transformation of closed-over arrays
  x_finite, y_finite, f0, g0 = jax.device_get(values)
  if not x_finite.all():
    raise ValueError(_nonfinite_leaf_message(
        "x0", "the initial upper variable", x, x_finite))
  if not y_finite.all():
    raise ValueError(_nonfinite_leaf_message(
        "y0", "the initial lower variable", y, y_finite))
  for label, value, level in (("upper objective f", f0, "upper"),
                              ("lower objective g", g0, "lower")):
    if not np.isfinite(value):
      raise ValueError(
          f"The {label} is {value} at the initial point (x0, y0), evaluated "
          f"{_batch_description(data, level)}. Typical causes: the log of a "
          "non-positive number, a division by zero or the square root of a "
          "negative number at the initial point, or an overflow. Start from "
          "another point, or guard the expression (e.g. "
          "jnp.log(jnp.maximum(z, 1e-12))).")
  check_lower_depends_on_y(problem, x, y, _first_batch(data, "lower"))


def check_projection_differentiable(problem: Problem, y: PyTree) -> None:
  """Refuses a ``project_y`` that JAX cannot differentiate (abstractly).

  Solvers that differentiate through the lower solution (implicit and
  unrolled hypergradients) need the projection's Jacobian where ``y*`` lies
  on the boundary of ``Y`` (:mod:`bilevel.derivatives`).

  Raises:
    ValueError: naming the failure and the solvers that do not need it.
  """
  if problem.project_y is None:
    return
  jax.eval_shape(lambda y_: derivatives.lower_tangent(
      problem, y_, optax.tree.zeros_like(y_))(y_), y)


def prepare(problem: Problem, x: PyTree, y: PyTree, data, key, *,
            differentiates_projection: bool = False):
  """Validates the inputs of ``init`` and returns the sampler state.

  Checks the data, the problem at ``(x, y)`` (abstractly), the key, and,
  when the inputs are concrete, that the initial point and the objectives
  there are finite (:func:`check_initial_point`). With
  ``differentiates_projection`` (solvers that differentiate through
  ``y*``), also that JAX can differentiate ``project_y``
  (:func:`check_projection_differentiable`).
  """
  _data.validate_data(data)
  upper_spec = None if data is None else _data.batch_spec(
      data.upper, data.upper_batch_size)
  lower_spec = None if data is None else _data.batch_spec(
      data.lower, data.lower_batch_size)
  validate(problem, x, y, upper_spec, lower_spec)
  if differentiates_projection:
    check_projection_differentiable(problem, y)
  sampler = _data.init_sampler(data, key)
  check_initial_point(problem, x, y, data)
  return sampler


def check_step_data(sampler: _data.SamplerState, data) -> None:
  """Fails at trace time if ``step`` gets data unlike what ``init`` got."""
  stochastic = (sampler.upper is not None, sampler.lower is not None)
  given = (_data.is_stochastic(data, "upper"), _data.is_stochastic(data, "lower"))
  if stochastic != given:
    raise ValueError(
        "step() received data whose minibatch setting differs from the data "
        "given to init() (stochastic upper/lower: init "
        f"{stochastic}, step {given}). Pass the same bilevel.Data to both.")


def update_x(problem: Problem, optimizer: optax.GradientTransformation,
             hypergradient: PyTree, opt_state, x: PyTree):
  """One (projected) upper optimizer step along ``hypergradient``."""
  updates, opt_state = optimizer.update(hypergradient, opt_state, x)
  return problem.projected_x(optax.apply_updates(x, updates)), opt_state


def upper_step(problem: Problem, optimizer: optax.GradientTransformation,
               hypergradient: PyTree, opt_state, x: PyTree, *, upper_loss,
               lower_grad_norm, linear_residual_norm):
  """:func:`update_x` and the step's :class:`HypergradientInfo`.

  Returns:
    ``(x, opt_state, info)``.
  """
  x, opt_state = update_x(problem, optimizer, hypergradient, opt_state, x)
  info = HypergradientInfo(
      upper_loss=upper_loss, lower_grad_norm=lower_grad_norm,
      hypergradient_norm=optax.tree.norm(hypergradient),
      linear_residual_norm=linear_residual_norm)
  return x, opt_state, info


def lower_loop(problem: Problem, optimizer: optax.GradientTransformation,
               x: PyTree, y: PyTree, opt_state, sampler, data,
               num_steps: int):
  """``num_steps`` lower optimizer steps, each on a fresh lower minibatch.

  The minibatches are drawn before the loop and scanned over (drawing inside
  the loop body costs more on CPU).

  Returns:
    ``(y, opt_state, sampler, lower_grad_norm)`` with the gradient norm of
    the last step (before it).
  """
  fixed_batch, batches, sampler = lower_batches(sampler, data, num_steps)

  def body(carry, batch):
    y_, opt_state_, _ = carry
    batch = fixed_batch if batches is None else batch
    return lower_descent(problem, optimizer, x, y_, opt_state_, batch), None

  init = (y, opt_state, optax.tree.norm(y) * 0.0)
  (y, opt_state, grad_norm), _ = jax.lax.scan(body, init, batches,
                                              length=num_steps)
  return y, opt_state, sampler, grad_norm


def level_batches(sampler, data, level: str, num: int):
  """``num`` batches of ``level`` for per-term operands, or the full batch.

  Returns:
    ``(fixed_batch, stacked_batches, sampler)``: for a stochastic level
    ``stacked_batches`` has a leading axis ``num`` and ``fixed_batch`` is
    ``None``; otherwise ``stacked_batches`` is ``None`` and every term uses
    ``fixed_batch``.
  """
  if _data.is_stochastic(data, level):
    stacked, sampler = _data.sample_many(sampler, data, level, num)
    return None, stacked, sampler
  batch, sampler = _data.sample(sampler, data, level)
  return batch, None, sampler


def first_batch(fixed_batch, stacked_batches):
  """The first of :func:`level_batches`' batches (the fixed one if any)."""
  if stacked_batches is None:
    return fixed_batch
  return jax.tree.map(lambda leaf: leaf[0], stacked_batches)


def tangent_grads(problem: Problem) -> int:
  """Lower gradients a step spends on the projection's Jacobian ``D``.

  One with ``project_y`` (:func:`bilevel.derivatives.implicit_tangent`),
  none without.
  """
  return 0 if problem.project_y is None else 1


def lower_batches(sampler, data, num: int):
  """:func:`level_batches` of the lower level."""
  return level_batches(sampler, data, "lower", num)
