"""Datasets for the two levels and the minibatch sampler used inside steps.

A :class:`Data` holds the upper (e.g. validation) and the lower (e.g. training)
datasets as pytrees of device arrays with a common leading sample axis. It is
a pytree: the arrays are traced arguments of the compiled step, never constants
baked into the program; the batch sizes are static metadata.

Sampling happens inside the jitted step. Each level has its own stream of
sample indices, the concatenation of pseudo-random permutations of
``0..n-1``, a new one each epoch: batch ``k`` takes stream positions
``[k b, (k + 1) b)``. Every epoch (``n`` consecutive positions starting at a
multiple of ``n``) therefore visits every sample exactly once, also when
``b`` does not divide ``n`` (a batch may straddle two epochs). The state is a
32-bit seed pair, a position and an epoch count, so sampling is pure, its
position is part of the solver state, and a batch costs ``O(b)`` (see
:func:`index_shuffle`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

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
    batch_sharding: for data parallelism, a
      ``jax.sharding.NamedSharding`` whose partition spec names the mesh
      axis of the batch, e.g. ``NamedSharding(mesh, P("data"))``; every
      minibatch drawn inside a step is constrained to be split along its
      sample axis over that mesh axis (:mod:`bilevel.sharding` builds it).
      ``None``: no constraint (XLA decides).
  """

  upper: PyTree = None
  lower: PyTree = None
  upper_batch_size: int | None = None
  lower_batch_size: int | None = None
  batch_sharding: Any = None


jax.tree_util.register_dataclass(
    Data, data_fields=["upper", "lower"],
    meta_fields=["upper_batch_size", "lower_batch_size", "batch_sharding"])


def _batch_axis(data: Data) -> str | tuple | None:
  """The mesh axis (or axes) of the sample axis of a batch, if any."""
  sharding = data.batch_sharding
  if sharding is None:
    return None
  spec = sharding.spec
  return spec[0] if len(spec) else None


def constrain_batch(data: Data | None, batch: PyTree, *,
                    num_leading: int = 0) -> PyTree:
  """``batch`` constrained to ``data.batch_sharding`` along its sample axis.

  Args:
    data: the data (``None`` or without ``batch_sharding``: unchanged).
    batch: a pytree of arrays whose axis ``num_leading`` is the sample axis.
    num_leading: axes before the sample axis (1 for stacked batches).
  """
  if data is None or data.batch_sharding is None:
    return batch
  axis = _batch_axis(data)
  mesh = data.batch_sharding.mesh

  def constrain(leaf):
    spec = (None,) * num_leading + (axis,) + (None,) * (
        leaf.ndim - num_leading - 1)
    return jax.lax.with_sharding_constraint(
        leaf, NamedSharding(mesh, PartitionSpec(*spec)))
  return jax.tree.map(constrain, batch)


def _child(node: Any, key: Any) -> Any:
  """The child of ``node`` at one pytree path entry (``None`` if unknown)."""
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  return None


def _number_leaf_message(arrays: PyTree, label: str, root: str, path: tuple,
                         leaf: Any) -> str:
  """Why a Python number in a dataset is not a sample array, and the fix.

  Args:
    arrays: the dataset.
    label: how messages call it, e.g. ``upper dataset (Data.upper)``.
    root: the name leaf paths start from, e.g. ``Data.upper``.
    path: the path of the first leaf that is not an array.
    leaf: that leaf (a Python number or another non-array).

  Returns:
    The message: for a number inside a list or tuple (at any depth), that
    the container is a pytree whose leaves are the numbers; otherwise that
    the leaf is not an array.
  """
  kind = type(leaf).__name__
  where = root + jax.tree_util.keystr(path)
  depth = next((i for i, key in enumerate(path)
                if isinstance(key, jax.tree_util.SequenceKey)), None)
  if depth is None:
    place = (f"is a Python {kind} ({leaf!r})" if not path else
             f"holds {'an' if kind[:1] in 'aeiou' else 'a'} {kind} at {where}")
    return (f"The {label} {place}, not an array. Every leaf of a dataset must "
            "be an array whose leading axis indexes the samples: pass e.g. "
            "jnp.asarray(...) of shape (num_samples, ...).")
  container = arrays
  for key in path[:depth]:
    container = None if container is None else _child(container, key)
  name = (type(container).__name__ if isinstance(container, (list, tuple))
          else "list or tuple")
  at = root + jax.tree_util.keystr(path[:depth])
  place = (f"is a Python {name} of numbers" if depth == 0 else
           f"holds a Python {name} of numbers at {at}")
  return (f"The {label} {place} (a {kind} at {where}), not an "
          f"array: a Python {name} is a pytree whose leaves are the numbers "
          "themselves, scalars without a sample axis. Pass an array with a "
          "leading sample axis instead, e.g. jnp.asarray([[...], ...]) of "
          "shape (num_samples, ...), one row per sample.")


def num_samples(arrays: PyTree, label: str = "dataset",
                root: str = "data") -> int:
  """The common leading size of the leaves of ``arrays``.

  Args:
    arrays: a dataset, a pytree of arrays with a leading sample axis.
    label: how messages call it, e.g. ``upper dataset (Data.upper)``.
    root: the name paths to its leaves start from, e.g. ``Data.upper``.

  Raises:
    ValueError: if ``arrays`` holds no arrays, a leaf that is not an array
      (e.g. a Python list of numbers), a scalar, or arrays whose leading
      sizes differ.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(arrays)[0]
  if not with_paths:
    raise ValueError(f"The {label} has no arrays.")
  for path, leaf in with_paths:
    if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
      raise ValueError(_number_leaf_message(arrays, label, root, path, leaf))
  for path, leaf in with_paths:
    if not jnp.ndim(leaf):
      raise ValueError(f"Every array of the {label} needs a leading sample "
                       "axis; found a scalar (shape ()) at "
                       f"{root}{jax.tree_util.keystr(path)}.")
  leaves = [leaf for _, leaf in with_paths]
  sizes = {jnp.shape(leaf)[0] for leaf in leaves}
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
    n = num_samples(arrays, f"{level} dataset (Data.{level})",
                    f"Data.{level}")
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
    _check_batch_sharding(data, level, batch_size)


def _check_batch_sharding(data: Data, level: str, batch_size: int) -> None:
  """The batch size must split evenly over the batch's mesh axis."""
  sharding = data.batch_sharding
  if sharding is None:
    return
  if not hasattr(sharding, "mesh") or not hasattr(sharding, "spec"):
    raise TypeError("Data.batch_sharding must be a "
                    "jax.sharding.NamedSharding (e.g. NamedSharding(mesh, "
                    f"P('data'))); got {type(sharding).__name__}.")
  axis = _batch_axis(data)
  names = axis if isinstance(axis, tuple) else (axis,)
  devices = math.prod(sharding.mesh.shape[name] for name in names
                      if name is not None)
  if batch_size % devices:
    raise ValueError(
        f"Data.{level}_batch_size={batch_size} does not split evenly over "
        f"the {devices} devices of the mesh axis {axis!r} of "
        "Data.batch_sharding: use a multiple of it.")


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
  """Position in one level's stream of shuffled sample indices.

  The permutation of epoch ``e`` is a Feistel permutation (see
  :func:`index_shuffle`) whose round keys hash ``(seed, e)``: nothing of size
  ``n`` is stored or re-sorted.
  """
  seed: jax.Array      # uint32[2], drawn from the key given to init
  position: jax.Array  # int32 in [0, n): next position in the current epoch
  epoch: jax.Array     # int32, epochs completed


class SamplerState(NamedTuple):
  """Sampler states of the two levels (``None`` for full-batch levels)."""
  upper: StreamState | None
  lower: StreamState | None


_NUM_ROUNDS = 8


def _mix32(value: jax.Array) -> jax.Array:
  """A 32-bit integer hash with good avalanche (xor-shift-multiply)."""
  value = value ^ (value >> 16)
  value = value * jnp.uint32(0x7FEB352D)
  value = value ^ (value >> 15)
  value = value * jnp.uint32(0x846CA68B)
  return value ^ (value >> 16)


def _round_keys(seed: jax.Array, epoch: jax.Array) -> jax.Array:
  """The Feistel round keys of ``epoch``, hashed from the stream's seed.

  Shaped ``(_NUM_ROUNDS,) + epoch.shape``: one set of keys per element when
  ``epoch`` is an array of per-sample epochs.
  """
  epoch = jnp.asarray(epoch).astype(jnp.uint32)
  rounds = jnp.arange(_NUM_ROUNDS, dtype=jnp.uint32).reshape(
      (_NUM_ROUNDS,) + (1,) * epoch.ndim)
  return _mix32(seed[0] ^ _mix32(
      (seed[1] + epoch * jnp.uint32(0x9E3779B9)) ^ _mix32(
          rounds * jnp.uint32(0x632BE5AB) + jnp.uint32(1))))


def _feistel_shuffle(index: jax.Array, round_keys: jax.Array, n: int
                     ) -> jax.Array:
  """:func:`index_shuffle` with explicit round keys, shaped
  ``(_NUM_ROUNDS,) + index.shape`` or ``(_NUM_ROUNDS,)``."""
  if n == 1:
    return jnp.zeros(index.shape, jnp.int32)
  # A mixed-radix domain [0, rows * cols) with rows * cols - n < rows: fewer
  # than 1/sqrt(n) of the images fall outside [0, n) and need walking.
  rows = math.isqrt(n - 1) + 1
  cols = -(-n // rows)

  def keyed_offset(part, round_key, radix):
    # A keyed hash of `part` scaled to [0, radix) by a multiplication (an
    # integer modulo would cost a division per element and round).
    scaled = (_mix32(part ^ round_key) >> 8).astype(jnp.float32) * (
        radix / 2.0 ** 24)
    return jnp.minimum(scaled.astype(jnp.uint32), jnp.uint32(radix - 1))

  def add_mod(a, b, radix):
    total = a + b
    return jnp.where(total >= radix, total - jnp.uint32(radix), total)

  def permute(value):
    # Feistel rounds on (row, col) that alternately add a keyed hash of one
    # part to the other, modulo its radix: each round is a bijection.
    row, col = value // jnp.uint32(cols), value % jnp.uint32(cols)
    for r in range(_NUM_ROUNDS):
      if r % 2 == 0:
        row = add_mod(row, keyed_offset(col, round_keys[r], rows), rows)
      else:
        col = add_mod(col, keyed_offset(row, round_keys[r], cols), cols)
    return row * jnp.uint32(cols) + col

  def walk(value):
    # One cycle-walking step: values already in [0, n) stay where they are.
    return jnp.where(value >= n, permute(value), value)

  value = permute(index.astype(jnp.uint32))
  value = jax.lax.while_loop(lambda v: jnp.any(v >= n), walk, value)
  return value.astype(jnp.int32)


def index_shuffle(index: jax.Array, key: jax.Array, n: int) -> jax.Array:
  """Image of ``index`` under a key-dependent pseudo-random permutation.

  A Feistel network of :data:`_NUM_ROUNDS` rounds (eight: with four, the
  Luby-Rackoff count, or six, the images of small domains such as ``n = 10``
  fail chi-square tests of uniformity) permutes the mixed-radix domain
  ``[0, a c)`` with ``a = ceil(sqrt(n))``, ``c = ceil(n / a)``; cycle walking
  (re-applying it while the image is ``>= n``, which happens for fewer than
  ``1 / sqrt(n)`` of the indices) restricts it to a permutation of
  ``[0, n)``. Each index costs a
  few integer operations, so a minibatch of ``b`` indices costs ``O(b)``
  whatever ``n``, where shuffling a whole epoch (``jax.random.permutation``,
  a sort) costs ``O(n log n)`` at every epoch boundary.

  Args:
    index: int array of positions in ``[0, n)``.
    key: PRNG key choosing the permutation.
    n: size of the permuted range (static).

  Returns:
    int32 array of the same shape, a bijection of ``[0, n)`` for fixed
    ``key``.

  References:
    Luby & Rackoff, "How to construct pseudorandom permutations from
    pseudorandom functions", SIAM J. Comput., 1988. Black & Rogaway,
    "Ciphers with arbitrary finite domains" (cycle walking), CT-RSA 2002.
  """
  seed = jax.random.bits(key, (2,), dtype=jnp.uint32)
  return _feistel_shuffle(index, _round_keys(seed, 0), n)


def _init_stream(key: jax.Array) -> StreamState:
  return StreamState(seed=jax.random.bits(key, (2,), dtype=jnp.uint32),
                     position=jnp.zeros((), jnp.int32),
                     epoch=jnp.zeros((), jnp.int32))


def check_key(key: Any) -> None:
  """Checks that ``key`` is ``None`` or one JAX PRNG key.

  Accepts a typed key (``jax.random.key(seed)``, shape ``()``) and a legacy
  raw key (``jax.random.PRNGKey(seed)``: uint32 of shape ``(2,)``, or
  ``(4,)`` for the ``rbg`` implementations). Only dtypes and shapes are
  read, so tracers are checked too.

  Raises:
    TypeError: if ``key`` is anything else (an int seed, a float array).
    ValueError: if ``key`` is an array of several typed keys.
  """
  if key is None:
    return
  dtype = getattr(key, "dtype", None)
  shape = tuple(getattr(key, "shape", ()))
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return
    raise ValueError(
        f"key must be a single PRNG key; got an array of keys of shape "
        f"{shape}. Pass one key, e.g. key=jax.random.key(seed), or vmap "
        "init over the keys.")
  if dtype == jnp.uint32 and shape in ((2,), (4,)):
    return
  if dtype is None:
    received = f"{key!r} (type {type(key).__name__})"
  else:
    received = f"an array of dtype {jnp.dtype(dtype).name} and shape {shape}"
  raise TypeError(
      f"key must be a JAX PRNG key; got {received}. Pass "
      "key=jax.random.key(seed) (a legacy jax.random.PRNGKey(seed) also "
      "works), not the seed itself.")


def init_sampler(data: Data | None, key: jax.Array | None) -> SamplerState:
  """Sampler state for ``data``; ``key`` may be ``None`` if nothing is random.

  Raises:
    TypeError: if ``key`` is not a PRNG key (see :func:`check_key`).
    ValueError: if ``key`` is ``None`` but ``data`` draws minibatches.
  """
  check_key(key)
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
    streams.append(_init_stream(subkey))
  return SamplerState(*streams)


def _draw(stream: StreamState, arrays: PyTree, num: int):
  """The next ``num`` samples of the stream (any ``num``, epochs included)."""
  n = num_samples(arrays)
  positions = stream.position + jnp.arange(num, dtype=jnp.int32)
  # Each position is shuffled with the round keys of its own epoch; the
  # draw spans at most `num // n + 2` epochs, whose keys are hashed once.
  offsets = positions // n
  epoch_keys = _round_keys(
      stream.seed, stream.epoch + jnp.arange(num // n + 2, dtype=jnp.int32))
  round_keys = epoch_keys[:, offsets]
  indices = _feistel_shuffle(positions % n, round_keys, n)
  samples = jax.tree.map(lambda leaf: jnp.take(leaf, indices, axis=0), arrays)
  end = stream.position + num
  stream = StreamState(seed=stream.seed, position=end % n,
                       epoch=stream.epoch + end // n)
  return samples, stream


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
  return constrain_batch(data, batch), sampler._replace(**{level: stream})


def sample_many(sampler: SamplerState, data: Data | None, level: str,
                num: int):
  """``num`` consecutive minibatches of ``level`` stacked on a leading axis.

  The same batches as ``num`` calls of :func:`sample`, drawn in one
  vectorised pass. Meant for stochastic levels (see :func:`is_stochastic`):
  a full-batch level would be copied ``num`` times, so callers pass its
  single batch instead.
  """
  stream = getattr(sampler, level)
  batch_size = getattr(data, f"{level}_batch_size")
  samples, stream = _draw(stream, getattr(data, level), num * batch_size)
  batches = jax.tree.map(
      lambda leaf: leaf.reshape((num, batch_size) + leaf.shape[1:]), samples)
  return (constrain_batch(data, batches, num_leading=1),
          sampler._replace(**{level: stream}))


def is_stochastic(data: Data | None, level: str) -> bool:
  """Whether ``level`` draws minibatches (as opposed to the full dataset)."""
  return (data is not None and getattr(data, level) is not None
          and getattr(data, f"{level}_batch_size") is not None)
