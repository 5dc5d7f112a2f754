"""Divergence checks of :func:`bilevel.run`: non-finite values and blow-ups.

Two checks run inside every compiled step, one reduction per leaf (XLA fuses
them):

* **Non-finite values.** Every floating-point leaf of the new state and of
  the step's diagnostics is finite.
* **Finite blow-ups.** The iterates (the state's ``x``, ``y`` and, where a
  solver has one, ``y_penalized``) and the diagnostics stay within

  .. math::

     \\max |a_k| \\le \\min\\bigl(\\text{max\\_growth} \\cdot
         \\max(\\max |a_0|, 1),\\ \\text{max\\_magnitude}\\bigr)

  where :math:`a_0` is the leaf at the start of the run (for a diagnostic,
  its value at the first step). The floor of 1 keeps a leaf that starts at
  zero (a zero initial ``x``, a gap that is 0 at the first step) from
  alarming as soon as it moves. With the default ``max_growth = 1e8``, an
  iterate of order 1 must pass :math:`10^8` to alarm: on the problems of
  the suite, the notebooks and the paper reproductions, nothing grows past
  :math:`10^6` times its start (``tests/test_run.py`` checks a margin of
  100 below the default). Optimizer states (second moments grow with the
  square of the gradient), step counters and multipliers are not checked
  for growth, only for finiteness.

A run of a problem whose optimum is genuinely far from the start (beyond
``max_growth`` times its magnitude) needs a larger ``max_growth``, or
``max_growth=math.inf``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

ON_DIVERGENCE = ("raise", "warn", "ignore")
DEFAULT_MAX_GROWTH = 1e8
GROWTH_FIELDS = ("x", "y", "y_penalized")
# The starting magnitudes of the diagnostics live in a vector of fixed size,
# so that the run knows its shape before tracing a step (a step is traced
# once per compilation): diagnostic leaf i has slot min(i, INFO_SLOTS - 1),
# and the leaves past the last slot share it (their largest start).
INFO_SLOTS = 32


class Limits(NamedTuple):
  """The blow-up bounds of a run (hashable: a static argument of a chunk).

  Attributes:
    max_growth: largest ``max |a_k| / max(max |a_0|, 1)``.
    max_magnitude: largest ``max |a_k|`` (``inf``: no absolute bound).
  """
  max_growth: float
  max_magnitude: float


def check_limits(max_growth: float, max_magnitude: float | None) -> Limits:
  """Validates the bounds given to :func:`bilevel.run`."""
  for name, value in (("max_growth", max_growth),
                      ("max_magnitude", max_magnitude)):
    if value is None and name == "max_magnitude":
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or
        math.isnan(value) or value <= 0):
      raise ValueError(f"{name} must be a positive number (math.inf to turn "
                       f"the bound off); got {value!r}.")
  if max_growth <= 1:
    raise ValueError("max_growth must be greater than 1 (a factor of the "
                     f"starting magnitude); got {max_growth!r}.")
  return Limits(float(max_growth),
                math.inf if max_magnitude is None else float(max_magnitude))


class DivergenceError(FloatingPointError):
  """A step of :func:`bilevel.run` diverged.

  Either a NaN or an infinity appeared, or an iterate or a diagnostic grew
  past its bound (``max_growth`` times its starting magnitude, or
  ``max_magnitude``).

  Attributes:
    step: the first bad step, counted from 1 from the start of the run.
    variables: paths of the bad leaves at that step, e.g.
      ``["state.v", "info.hypergradient_norm"]``.
    magnitudes: ``{path: (max |value|, bound)}`` of the leaves that grew
      past their bound (empty when the step only had non-finite values).
    last_good_info: ``{name: value}`` of the diagnostics of the step
      before (``None`` if the first step of the run was bad).
    result: a :class:`bilevel.RunResult` whose ``state`` is the last good
      state (after step ``step - 1``) and whose ``history`` ends with the
      bad step; resume from ``result.state`` (e.g. with smaller step sizes).
  """

  def __init__(self, message: str, *, step: int, variables: list[str],
               last_good_info: dict[str, float] | None, result: Any,
               magnitudes: dict[str, tuple[float, float]] | None = None):
    super().__init__(message)
    self.step = step
    self.variables = variables
    self.magnitudes = dict(magnitudes or {})
    self.last_good_info = last_good_info
    self.result = result

  @property
  def last_finite_info(self) -> dict[str, float] | None:
    """Former name of :attr:`last_good_info`."""
    return self.last_good_info


def _inexact(tree: PyTree, prefix: str) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of the inexact leaves of ``tree``, paths from prefix."""
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
      leaves.append((prefix + jax.tree_util.keystr(path), leaf))
  return leaves


def _iterates(state) -> dict[str, PyTree]:
  fields = getattr(state, "_fields", ())
  return {name: getattr(state, name) for name in GROWTH_FIELDS
          if name in fields}


def finite_leaves(state, info) -> list[tuple[str, Any]]:
  """The leaves checked for NaN and infinities: all inexact ones."""
  return _inexact(state, "state") + _inexact(info, "info")


def state_growth_leaves(state) -> list[tuple[str, Any]]:
  """The state's leaves checked for growth: its iterates."""
  return [item for name, tree in _iterates(state).items()
          for item in _inexact(tree, f"state.{name}")]


def info_growth_leaves(info) -> list[tuple[str, Any]]:
  """The diagnostics' leaves checked for growth: all inexact ones."""
  return _inexact(info, "info")


def magnitudes(leaves: list[tuple[str, Any]]) -> jax.Array:
  """``max |leaf|`` of each leaf, as one float32 vector (0 for empty ones)."""
  values = [jnp.max(jnp.abs(leaf), initial=0.0).astype(jnp.float32)
            for _, leaf in leaves]
  return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def names(state, info) -> list[str]:
  """The names of the flags of :func:`flags`, in order."""
  return ([name for name, _ in finite_leaves(state, info)] +
          [name for name, _ in state_growth_leaves(state)] +
          [name for name, _ in info_growth_leaves(info)])


def unknown_info_scales() -> jax.Array:
  """The diagnostics' starting magnitudes before the first step: NaN."""
  return jnp.full((INFO_SLOTS,), jnp.nan, jnp.float32)


def _slots(num_leaves: int) -> jax.Array:
  return jnp.minimum(jnp.arange(num_leaves), INFO_SLOTS - 1)


def info_scales_of(info_magnitudes: jax.Array) -> jax.Array:
  """The slot vector of the starting magnitudes of the diagnostics."""
  return jax.ops.segment_max(info_magnitudes,
                             _slots(info_magnitudes.shape[0]),
                             num_segments=INFO_SLOTS)


def leaf_scales(state_scales: jax.Array, info_scales: jax.Array,
                num_info_leaves: int) -> jax.Array:
  """The starting magnitude of every growth leaf, state's then info's."""
  return jnp.concatenate([state_scales,
                          info_scales[_slots(num_info_leaves)]])


def bounds(scales: jax.Array, limits: Limits) -> jax.Array:
  """The bound of each growth leaf, from its starting magnitude."""
  return jnp.minimum(limits.max_growth * jnp.maximum(scales, 1.0),
                     limits.max_magnitude)


def flags(state, info, state_scales: jax.Array, info_scales: jax.Array,
          limits: Limits) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The health of one step.

  Args:
    state: the state after the step.
    info: the step's diagnostics.
    state_scales: starting magnitudes of :func:`state_growth_leaves`.
    info_scales: the slot vector (:data:`INFO_SLOTS`) of the starting
      magnitudes of :func:`info_growth_leaves`, NaN before the first step of
      a run: the step's own magnitudes then become the start.

  Returns:
    ``(flags, magnitudes, info_scales)``: one bool per name of :func:`names`
    (True: healthy), the magnitudes of the growth leaves (state's then
    info's) and the updated ``info_scales``.
  """
  finite = [jnp.all(jnp.isfinite(leaf))
            for _, leaf in finite_leaves(state, info)]
  info_magnitudes = magnitudes(info_growth_leaves(info))
  info_scales = jnp.where(jnp.isnan(info_scales),
                          info_scales_of(info_magnitudes), info_scales)
  grown = jnp.concatenate([magnitudes(state_growth_leaves(state)),
                           info_magnitudes])
  scales = leaf_scales(state_scales, info_scales,
                       info_magnitudes.shape[0])
  within = ~(grown > bounds(scales, limits))
  healthy = jnp.concatenate([jnp.stack(finite) if finite else
                             jnp.ones((0,), bool), within])
  return healthy, grown, info_scales


def message(step: int, num_steps: int, variables: list[str],
            grown: dict[str, tuple[float, float]],
            last_info: dict[str, float] | None, on_divergence: str) -> str:
  """The text of a :class:`DivergenceError` (or of its warning)."""
  nonfinite = [name for name in variables if name not in grown]
  parts = []
  if nonfinite:
    parts.append(f"non-finite values (NaN or inf) in {', '.join(nonfinite)}")
  if grown:
    values = ", ".join(f"{name} reached {value:.3g} (bound {bound:.3g})"
                       for name, (value, bound) in grown.items())
    parts.append("values grew past max_growth times their start (or "
                 f"max_magnitude): {values}")
  if last_info is None:
    before = "There was no good step before it in this run."
  else:
    values = ", ".join(f"{name}={value:.6g}" for name, value in
                       last_info.items())
    before = f"Diagnostics of the last good step ({step - 1}): {values}."
  if on_divergence == "raise":
    then = (f"The run stopped; error.result.state is the state after step "
            f"{step - 1}. Smaller step sizes usually help; pass "
            "on_divergence='warn' to keep going")
    then += (", or a larger max_growth if this growth is expected." if grown
             else ".")
  else:
    then = "The run goes on (on_divergence='warn')."
  return (f"bilevel.run: divergence at step {step} of {num_steps}: "
          f"{'; '.join(parts)}. {before} {then}")
