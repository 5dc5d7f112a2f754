r"""Running any solver on several devices, with ``jax.sharding``.

Two kinds of parallelism, both expressed as shardings that XLA's SPMD
partitioner (GSPMD) turns into one program per device with the collectives
it needs; no solver code changes:

- **Data parallel.** Each minibatch drawn inside a step is split along its
  sample axis over a mesh axis (``Data.batch_sharding``, set by
  :func:`shard_data`): every device computes the losses and gradients of its
  share, and the gradients are summed across devices by the partitioner.
- **FSDP** (fully sharded data parallel, ZeRO-3 style). Every large array
  of the solver state (both models of ScaleBiO, their optimizer moments, the
  upper variable) is split along one of its dimensions over the same mesh
  axis (:func:`state_shardings`): each device stores ``1 / D`` of the state,
  and the partitioner gathers parameters where a computation needs them.
  :func:`bilevel.run` keeps the state on these shardings for the whole run
  (``state_sharding=``).

The numbers are those of one device up to the order of floating-point sums
(the per-device partial sums of a gradient are added in another order):
about ``1e-15`` relative in float64.

**Several hosts.** The same code runs on a multi-host cluster (e.g. a TPU pod
or several GPU nodes): call ``jax.distributed.initialize()`` first on every
host (with ``coordinator_address``, ``num_processes`` and ``process_id`` off a
managed cluster), then build the mesh over ``jax.devices()``, which then lists
the devices of every host. Each host must hold the same full ``Data`` arrays
(as here, datasets that fit in host memory) or pass the global arrays built
with ``jax.make_array_from_process_local_data``; every host runs the same
program (``bilevel.run`` with the same arguments) and the partitioner handles
communication across hosts.

Example:
  >>> import jax, bilevel
  >>> mesh = bilevel.sharding.make_mesh()              # all devices, axis "data"
  >>> data = bilevel.sharding.shard_data(data, mesh)  # batches split
  >>> result = bilevel.run(solver, x0, y0, data, num_steps=1000, key=key,
  ...                      state_sharding=bilevel.sharding.fsdp(mesh))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bilevel import _data

PyTree = Any

#: Arrays with fewer elements are replicated by :func:`state_shardings`:
#: splitting them saves nothing and costs a collective.
MIN_SHARDED_SIZE = 1024


def make_mesh(devices: Sequence[jax.Device] | None = None,
         axis_name: str = "data") -> Mesh:
  """A one-dimensional mesh over ``devices`` (default: ``jax.devices()``)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("mesh needs at least one device.")
  return Mesh(np.array(devices), (axis_name,))


def _axis_size(mesh: Mesh, axis: str) -> int:
  if axis not in mesh.shape:
    raise ValueError(f"The mesh has axes {tuple(mesh.shape)}; there is no "
                     f"axis {axis!r}.")
  return mesh.shape[axis]


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def leaf_sharding(leaf: Any, mesh: Mesh, axis: str = "data", *,
                  min_size: int = MIN_SHARDED_SIZE) -> NamedSharding:
  """The FSDP sharding of one array.

  Splits the largest dimension divisible by the number of devices of
  ``axis`` (the first of equal ones); replicates arrays smaller than
  ``min_size`` elements, scalars, non-floating arrays (counters, keys,
  sampler state) and arrays with no divisible dimension.
  """
  size = _axis_size(mesh, axis)
  shape = tuple(jnp.shape(leaf))
  dtype = jnp.result_type(leaf)
  if (size == 1 or not shape or math.prod(shape) < min_size
      or not jnp.issubdtype(dtype, jnp.floating)):
    return replicated(mesh)
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
  if not candidates:
    return replicated(mesh)
  dim = max(candidates, key=lambda d: (shape[d], -d))
  spec = [None] * len(shape)
  spec[dim] = axis
  return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(state: PyTree, mesh: Mesh, axis: str = "data", *,
                    min_size: int = MIN_SHARDED_SIZE) -> PyTree:
  """FSDP shardings of every leaf of ``state`` (see :func:`leaf_sharding`).

  Leaves of one shape get the same sharding, so a parameter and its
  optimizer moments live on the same devices and updates need no
  communication.
  """
  return jax.tree.map(
      lambda leaf: leaf_sharding(leaf, mesh, axis, min_size=min_size),
      state)


def fsdp(mesh: Mesh, axis: str = "data", *,
         min_size: int = MIN_SHARDED_SIZE) -> Callable[[PyTree], PyTree]:
  """``state -> shardings`` for :func:`bilevel.run`'s ``state_sharding``."""
  _axis_size(mesh, axis)
  return lambda state: state_shardings(state, mesh, axis, min_size=min_size)


def replicate(mesh: Mesh) -> Callable[[PyTree], PyTree]:
  """``state -> shardings`` that replicate the whole state (pure data
  parallel: every device holds the full models)."""
  return lambda state: jax.tree.map(lambda _: replicated(mesh), state)


def shard_data(data: _data.Data, mesh: Mesh, axis: str = "data", *,
               split_datasets: bool = False) -> _data.Data:
  """``data`` placed on ``mesh``, with its minibatches split over ``axis``.

  Args:
    data: a :class:`bilevel.Data`.
    mesh: the device mesh.
    axis: the mesh axis the batches are split over.
    split_datasets: also store each dataset split along its sample axis
      (``1 / D`` of it per device; drawing a batch then gathers across
      devices). Default: a full copy on every device, which makes drawing a
      batch local.

  Returns:
    A :class:`bilevel.Data` with the same arrays (placed) and
    ``batch_sharding = NamedSharding(mesh, P(axis))``. Batch sizes must be
    multiples of the axis size (``ValueError`` otherwise).
  """
  if not isinstance(data, _data.Data):
    raise TypeError(f"shard_data expects a bilevel.Data; got "
                    f"{type(data).__name__}.")
  size = _axis_size(mesh, axis)

  def place(leaf):
    if split_datasets and jnp.shape(leaf)[0] % size == 0:
      spec = PartitionSpec(axis, *([None] * (jnp.ndim(leaf) - 1)))
      return jax.device_put(leaf, NamedSharding(mesh, spec))
    return jax.device_put(leaf, replicated(mesh))

  placed = dataclasses.replace(
      data, upper=jax.tree.map(place, data.upper),
      lower=jax.tree.map(place, data.lower),
      batch_sharding=NamedSharding(mesh, PartitionSpec(axis)))
  _data.validate_data(placed)
  return placed


def bytes_per_device(tree: PyTree) -> dict[str, int]:
  """Bytes of ``tree``'s arrays stored on each device (by device id).

  Counts the addressable shards of every committed array, so a replicated
  array counts in full on every device and a split one by its shard.
  """
  totals: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      key = str(shard.device.id)
      totals[key] = totals.get(key, 0) + shard.data.nbytes
  return totals


__all__ = ["MIN_SHARDED_SIZE", "bytes_per_device", "fsdp", "leaf_sharding",
           "make_mesh", "replicate", "replicated", "shard_data", "state_shardings"]
