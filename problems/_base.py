"""What every problem builder returns, and exact references by dense algebra."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import bilevel

PyTree = Any


class Instance(NamedTuple):
  """A bilevel problem with its data, a starting point and known answers.

  Attributes:
    name: short identifier.
    problem: the :class:`bilevel.Problem`.
    data: its :class:`bilevel.Data`, or ``None`` for full-batch objectives.
    x0: initial upper variable.
    y0: initial lower variable.
    lower_solution: ``x -> y*(x)`` on the full data (closed form, or a
      Newton solve to float64 accuracy), or ``None``.
    hypergradient: ``x -> grad Phi(x)`` exact on the full data, or ``None``.
    value: ``x -> Phi(x) = f(x, y*(x))`` on the full data, or ``None``.
    x_star: the minimiser of ``Phi`` where known, else ``None``.
    evaluate: ``(x, y) -> dict`` of held-out metrics (e.g. test accuracy), or
      ``None``.
  """
  name: str
  problem: bilevel.Problem
  data: bilevel.Data | None
  x0: PyTree
  y0: PyTree
  lower_solution: Callable[[PyTree], PyTree] | None = None
  hypergradient: Callable[[PyTree], PyTree] | None = None
  value: Callable[[PyTree], jax.Array] | None = None
  x_star: PyTree | None = None
  evaluate: Callable[[PyTree, PyTree], dict] | None = None


def numpy_seed(key: jax.Array) -> np.random.SeedSequence:
  """NumPy seeds from a JAX key (the same in float32 and float64)."""
  return np.random.SeedSequence(np.asarray(jax.random.bits(key, (4,),
                                                           jnp.uint32)))


def split_rows(rng: np.random.Generator, total: int, num_train: int,
               num_val: int, *, min_train: int = 1):
  """A random split of ``total`` rows into train, validation and test rows.

  Raises:
    ValueError: unless ``num_train >= min_train``, ``num_val >= 1`` and at
      least one row is left for the test set.
  """
  if num_train < min_train or num_val < 1 or num_train + num_val >= total:
    raise ValueError(
        f"Need num_train >= {min_train}, num_val >= 1 and num_train + "
        f"num_val < {total} (the rest is the test set); got "
        f"num_train={num_train}, num_val={num_val}.")
  return np.split(rng.permutation(total), [num_train, num_train + num_val])


def full_batches(data: bilevel.Data | None):
  """The full upper and lower datasets (what the expectation is taken over)."""
  if data is None:
    return None, None
  return data.upper, data.lower


def newton_lower_solution(problem: bilevel.Problem, data, y_init: PyTree,
                          num_iterations: int = 30) -> Callable:
  """``x -> y*(x)`` by damped-free Newton on the full lower objective.

  Dense Hessians: meant for references on small ``y`` (a few thousand
  coordinates at most) and objectives that are strongly convex and smooth
  enough for pure Newton from ``y_init`` (e.g. L2-regularised logistic
  losses).
  """
  _, lower_batch = full_batches(data)
  flat_init, unravel = ravel_pytree(y_init)

  def flat_lower(x, flat_y):
    return problem.lower(x, unravel(flat_y), lower_batch)

  @jax.jit
  def solve(x):
    def body(flat_y, _):
      grad = jax.grad(flat_lower, 1)(x, flat_y)
      hess = jax.hessian(flat_lower, 1)(x, flat_y)
      return flat_y - jnp.linalg.solve(hess, grad), None
    flat_y, _ = jax.lax.scan(body, flat_init, None, length=num_iterations)
    return unravel(flat_y)

  return solve


def dense_hypergradient(problem: bilevel.Problem, data,
                        lower_solution: Callable) -> Callable:
  """``x -> grad Phi(x)`` with a dense Hessian solve at ``y*(x)``."""
  upper_batch, lower_batch = full_batches(data)

  @jax.jit
  def hypergradient(x):
    y = lower_solution(x)
    flat_y, unravel = ravel_pytree(y)
    grad_x_f, grad_y_f = jax.grad(problem.upper, (0, 1))(x, y, upper_batch)
    flat_grad_y_f, _ = ravel_pytree(grad_y_f)

    def flat_lower(x_, fy):
      return problem.lower(x_, unravel(fy), lower_batch)

    hess = jax.hessian(flat_lower, 1)(x, flat_y)
    v = jnp.linalg.solve(hess, flat_grad_y_f)
    cross = jax.grad(lambda x_: jnp.vdot(
        jax.grad(flat_lower, 1)(x_, flat_y), v))(x)
    return jax.tree.map(jnp.subtract, grad_x_f, cross)

  return hypergradient


def value_function(problem: bilevel.Problem, data,
                   lower_solution: Callable) -> Callable:
  """``x -> f(x, y*(x))`` on the full upper data."""
  upper_batch, _ = full_batches(data)
  return jax.jit(lambda x: problem.upper(x, lower_solution(x), upper_batch))
