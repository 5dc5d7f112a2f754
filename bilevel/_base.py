"""The solver protocol and the pieces every solver shares."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from bilevel import _data
from bilevel._problem import Problem, validate
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
      problem at ``(x, y)`` (abstractly, no FLOPs) and builds the state.
    step: ``step(state, data=None) -> (state, info)``. Pure and jittable;
      ``data`` is a :class:`bilevel.Data` (or ``None``) and is an argument, so
      new data of the same shapes does not recompile.
    oracle_calls: the :class:`OracleCalls` of one step.
  """
  init: Callable[..., Any]
  step: Callable[..., tuple[Any, Any]]
  oracle_calls: OracleCalls


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


def prepare(problem: Problem, x: PyTree, y: PyTree, data, key):
  """Validates the inputs of ``init`` and returns the sampler state."""
  _data.validate_data(data)
  upper_spec = None if data is None else _data.batch_spec(
      data.upper, data.upper_batch_size)
  lower_spec = None if data is None else _data.batch_spec(
      data.lower, data.lower_batch_size)
  validate(problem, x, y, upper_spec, lower_spec)
  return _data.init_sampler(data, key)


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


def lower_batches(sampler, data, num: int):
  """``num`` lower batches for per-term operands (stacked), or the full batch.

  Returns:
    ``(fixed_batch, stacked_batches, sampler)``: for a stochastic lower
    level ``stacked_batches`` has a leading axis ``num`` and ``fixed_batch``
    is ``None``; otherwise ``stacked_batches`` is ``None`` and every term
    uses ``fixed_batch``.
  """
  if _data.is_stochastic(data, "lower"):
    stacked, sampler = _data.sample_many(sampler, data, "lower", num)
    return None, stacked, sampler
  batch, sampler = _data.sample(sampler, data, "lower")
  return batch, None, sampler
