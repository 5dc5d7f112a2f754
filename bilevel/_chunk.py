"""One chunk of a run: ``length`` solver steps as one ``lax.scan``.

Each step checks its outcome for divergence (:mod:`bilevel._divergence`)
inside the compiled scan; the host (or the caller's trace) reads the result
once per chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bilevel import _divergence
from bilevel._base import BilevelSolver

PyTree = Any


class Health(NamedTuple):
  """What a run carries from step to step to judge divergence.

  Attributes:
    first_bad: index (from 0, from the start of the run) of the first
      diverging step, ``-1`` if none yet.
    state_scales: starting magnitudes of the state's iterates.
    info_scales: starting magnitudes of the diagnostics, in the slots of
      :data:`bilevel._divergence.INFO_SLOTS` (NaN before the first step).
  """
  first_bad: jax.Array
  state_scales: jax.Array
  info_scales: jax.Array


def start_health(state) -> Health:
  """The health of a run that starts from ``state``."""
  return Health(jnp.asarray(-1, jnp.int32),
                _divergence.magnitudes(
                    _divergence.state_growth_leaves(state)),
                _divergence.unknown_info_scales())


def resumed_health(initial_state, first_info, first_bad: int) -> Health:
  """The health of a run resumed from a checkpoint.

  Args:
    initial_state: the state the run started from (not the restored one):
      the scales are those of the uninterrupted run.
    first_info: the ``info`` of the run's first step (from its history).
    first_bad: the restored index of the first bad step (``-1``: none).
  """
  health = Health(jnp.asarray(first_bad, jnp.int32),
                  _divergence.magnitudes(
                      _divergence.state_growth_leaves(initial_state)),
                  _divergence.info_scales_of(_divergence.magnitudes(
                      _divergence.info_growth_leaves(first_info))))
  return uncommitted(health)


def uncommitted(health: Health) -> Health:
  """``health`` through the host, as uncommitted arrays.

  The run keeps the health uncommitted from chunk to chunk (34 numbers),
  like :func:`start_health`'s: the compiled chunk's dispatch cache then sees
  one signature whether the state is committed (restored from a checkpoint,
  or placed on devices) or not.
  """
  return Health(*(jnp.asarray(jax.device_get(leaf)) for leaf in health))


class StateShardings:
  """A pytree of shardings as a hashable static argument of the chunk."""

  def __init__(self, shardings: PyTree):
    leaves, self.treedef = jax.tree.flatten(shardings)
    self.leaves = tuple(leaves)

  def tree(self) -> PyTree:
    return jax.tree.unflatten(self.treedef, self.leaves)

  def __hash__(self):
    return hash((self.treedef, self.leaves))

  def __eq__(self, other):
    return (isinstance(other, StateShardings) and
            (self.treedef, self.leaves) == (other.treedef, other.leaves))


def scan_steps(solver: BilevelSolver, state, data, health: Health,
               start, num_steps, length: int,
               limits: _divergence.Limits | None,
               stop_at_divergence: bool = True, freeze_counters: bool = True,
               state_shardings: StateShardings | None = None):
  """``length`` steps of ``solver``, steps ``start..start + length - 1``.

  Steps with an index ``>= num_steps`` leave ``state`` unchanged: the padding
  keeps one compiled chunk for every chunk of a run, the last one included,
  and ``step`` is traced exactly once per compilation. A padded step is
  computed and discarded (a select, not a branch, so the step is not traced
  twice).

  With ``limits`` (``None``: no check, no cost), every step checks its new
  state and diagnostics for NaN, infinities and blow-ups (one reduction per
  leaf, fused by XLA), and ``health.first_bad`` records the first bad step.
  With ``stop_at_divergence``, the state stops changing at the last good
  step (per member under ``vmap``); otherwise the run goes on. With
  ``freeze_counters=False`` (runs under a JAX transformation) only the
  floating-point leaves stop; integer leaves keep counting. With
  ``state_shardings``, the state after every step is constrained to them.

  Returns:
    ``((state, health), (infos, flags, magnitudes))``: per step, ``flags``
    holds one bool per name of :func:`bilevel._divergence.names` (True:
    healthy) and ``magnitudes`` those of the growth leaves; both are
    ``None`` without ``limits``.
  """
  def body(carry, index):
    state_, health_ = carry
    stepped, info = solver.step(state_, data)
    active = index < num_steps
    keep = active
    flags = magnitudes = None
    if limits is not None:
      flags, magnitudes, info_scales = _divergence.flags(
          stepped, info, health_.state_scales, health_.info_scales, limits)
      info_scales = jnp.where(active, info_scales, health_.info_scales)
      good = jnp.all(flags)
      healthy = health_.first_bad < 0
      health_ = health_._replace(
          first_bad=jnp.where(active & healthy & ~good, index,
                              health_.first_bad),
          info_scales=info_scales)
      if stop_at_divergence:
        keep = active & healthy & good

    def select(new, old):
      # Only floating-point leaves stop at the last good step when
      # `freeze_counters` is off: counters (step counts, sampler positions)
      # then depend on the step index alone and stay unbatched under vmap,
      # so a solver's `lax.cond` on its step count remains a real branch.
      inexact = jnp.issubdtype(jnp.result_type(new), jnp.inexact)
      return jnp.where(keep if inexact or freeze_counters else active,
                       new, old)

    state_ = jax.tree.map(select, stepped, state_)
    if state_shardings is not None:
      state_ = jax.lax.with_sharding_constraint(state_, state_shardings.tree())
    return (state_, health_), (info, flags, magnitudes)

  indices = start + jnp.arange(length, dtype=jnp.int32)
  return jax.lax.scan(body, (state, health), indices)


compiled_scan_steps = jax.jit(
    scan_steps, static_argnames=("solver", "length", "limits",
                                 "stop_at_divergence", "state_shardings"))
