"""Datasets for the two levels and the minibatch sampler used inside steps.

A :class:`Data` holds the upper (e.g. validation) and the lower (e.g. training)
datasets as pytrees of device arrays with a common leading sample axis. It is
a pytree: the arrays are traced arguments of the compiled step, never constants
baked into the program; the batch sizes are static metadata.

Sampling happens inside the jitted step. Each level has its own stream of
sample indices, the concatenation of independent random permutations of
``0..n-1``: batch ``k`` takes stream positions ``[k b, (k + 1) b)``. Every
epoch (``n`` consecutive positions starting at a multiple of ``n``) therefore
visits every sample exactly once, also when ``b`` does not divide ``n`` (a
batch may straddle two epochs). The state is two permutations, a position and
a key, so sampling is pure and its position is part of the solver state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Data:
  """Upper and lower datasets with their minibatch sizes.

  Attributes:
    upper: pytree of arrays with a common leading axis (samples) for ``f``;
      ``None`` if ``f`` takes no data (it then receives ``batch=None``).
    lower: same for ``g``.
    upper_batch_size: samples per upper minibatch; ``None`` passes the whole
      upper dataset as the batch (deterministic).
    lower_batch_size: same for the lower level.
  """

  upper: PyTree = None
  lower: PyTree = None
  upper_batch_size: int | None = None
  lower_batch_size: int | None = None


jax.tree_util.register_dataclass(
    Data, data_fields=["upper", "lower"],
    meta_fields=["upper_batch_size", "lower_batch_size"])


def num_samples(arrays: PyTree, label: str = "dataset") -> int:
  """The common leading size of the leaves of ``arrays``."""
  leaves = jax.tree.leaves(arrays)
  if not leaves:
    raise ValueError(f"The {label} has no arrays.")
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes:
    raise ValueError(f"Every array of the {label} needs a leading sample "
                     "axis; found a scalar.")
  if len(sizes) != 1:
    shapes = jax.tree.map(jnp.shape, arrays)
    raise ValueError(f"The arrays of the {label} disagree in length (leading "
                     f"axis): {shapes}.")
  return sizes.pop()


def validate_data(data: Data | None) -> None:
  """Raises ``ValueError``/``TypeError`` on inconsistent data."""
  if data is None:
    return
  if not isinstance(data, Data):
    raise TypeError("data must be a bilevel.Data (or None for full-batch "
                    f"problems); got {type(data).__name__}.")
  for level in ("upper", "lower"):
    arrays = getattr(data, level)
    batch_size = getattr(data, f"{level}_batch_size")
    if arrays is None:
      if batch_size is not None:
        raise ValueError(f"Data.{level}_batch_size is set but Data.{level} is "
                         "None.")
      continue
    n = num_samples(arrays, f"{level} dataset (Data.{level})")
    if batch_size is None:
      continue
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
      raise TypeError(f"Data.{level}_batch_size must be an int or None; got "
                      f"{batch_size!r}.")
    if batch_size <= 0:
      raise ValueError(f"Data.{level}_batch_size must be positive; got "
                       f"{batch_size}.")
    if batch_size > n:
      raise ValueError(f"Data.{level}_batch_size={batch_size} is larger than "
                       f"the {level} dataset ({n} samples).")


def batch_spec(arrays: PyTree, batch_size: int | None) -> PyTree:
  """Shapes and dtypes of one batch drawn from ``arrays``."""
  if arrays is None:
    return None
  def spec(leaf):
    shape = jnp.shape(leaf)
    if batch_size is not None:
      shape = (batch_size,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(leaf))
  return jax.tree.map(spec, arrays)


class StreamState(NamedTuple):
  """Position in one level's stream of shuffled sample indices."""
  order: jax.Array        # current epoch's permutation, (n,)
  next_order: jax.Array   # the next epoch's permutation, (n,)
  position: jax.Array     # int32 in [0, n): next index to read in `order`
  key: jax.Array          # key for the permutation after `next_order`
  epoch: jax.Array        # int32, epochs completed


class SamplerState(NamedTuple):
  """Sampler states of the two levels (``None`` for full-batch levels)."""
  upper: StreamState | None
  lower: StreamState | None


def _init_stream(n: int, key: jax.Array) -> StreamState:
  key, first, second = jax.random.split(key, 3)
  return StreamState(
      order=jax.random.permutation(first, n),
      next_order=jax.random.permutation(second, n),
      position=jnp.zeros((), jnp.int32), key=key,
      epoch=jnp.zeros((), jnp.int32))


def init_sampler(data: Data | None, key: jax.Array | None) -> SamplerState:
  """Sampler state for ``data``; ``key`` may be ``None`` if nothing is random."""
  if data is None:
    return SamplerState(None, None)
  streams = []
  for level in ("upper", "lower"):
    arrays = getattr(data, level)
    if arrays is None or getattr(data, f"{level}_batch_size") is None:
      streams.append(None)
      continue
    if key is None:
      raise ValueError("A key is needed to shuffle minibatches: pass "
                       "key=jax.random.key(seed) to init (or to bilevel.run).")
    key, subkey = jax.random.split(key)
    streams.append(_init_stream(num_samples(arrays), subkey))
  return SamplerState(*streams)


def _draw(stream: StreamState, arrays: PyTree, batch_size: int):
  n = stream.order.shape[0]
  positions = stream.position + jnp.arange(batch_size)
  indices = jnp.where(positions < n, stream.order[positions % n],
                      stream.next_order[positions % n])
  batch = jax.tree.map(lambda leaf: jnp.take(leaf, indices, axis=0), arrays)
  position = stream.position + batch_size
  wrapped = position >= n

  def next_epoch(s):
    key, subkey = jax.random.split(s.key)
    return StreamState(s.next_order, jax.random.permutation(subkey, n),
                       position - n, key, s.epoch + 1)

  def same_epoch(s):
    return s._replace(position=position)

  return batch, jax.lax.cond(wrapped, next_epoch, same_epoch, stream)


def sample(sampler: SamplerState, data: Data | None, level: str):
  """Draws the next minibatch of ``level`` ("upper" or "lower").

  Returns:
    ``(batch, sampler)``: the batch (the whole dataset for a full-batch level,
    ``None`` without data) and the advanced sampler state.
  """
  if data is None:
    return None, sampler
  arrays = getattr(data, level)
  stream = getattr(sampler, level)
  if stream is None:
    return arrays, sampler
  batch, stream = _draw(stream, arrays, getattr(data, f"{level}_batch_size"))
  return batch, sampler._replace(**{level: stream})


def sample_many(sampler: SamplerState, data: Data | None, level: str,
                num: int):
  """``num`` consecutive minibatches of ``level`` stacked on a leading axis.

  Meant for stochastic levels (see :func:`is_stochastic`): a full-batch level
  would be copied ``num`` times, so callers pass its single batch instead.
  """
  def body(s, _):
    batch, s = sample(s, data, level)
    return s, batch
  sampler, batches = jax.lax.scan(body, sampler, None, length=num)
  return batches, sampler


def is_stochastic(data: Data | None, level: str) -> bool:
  """Whether ``level`` draws minibatches (as opposed to the full dataset)."""
  return (data is not None and getattr(data, level) is not None
          and getattr(data, f"{level}_batch_size") is not None)
