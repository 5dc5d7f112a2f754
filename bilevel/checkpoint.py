"""Checkpoints of :func:`bilevel.run`: atomic, resumable, bit-exact.

A checkpoint holds everything a run needs to continue as if it had never
stopped: the full solver state (iterates, optimizer states, sampler seeds and
positions, any PRNG keys), the history of diagnostics so far, the callback
values (when JSON-serialisable) and a fingerprint of the run. Writing goes
through orbax's ``CheckpointManager``: each checkpoint is written to a
temporary directory and renamed once complete, so a process killed mid-write
leaves the previous checkpoint intact, and only the ``max_to_keep`` latest are
kept. Writes are asynchronous: the arrays are copied to host memory, then
written while the next chunk runs.

The fingerprint (a SHA-256 of the run's initial state and of the data's
shapes and batch sizes) ties a directory to one run: resuming with another
solver, other initial values, another key or other data shapes raises
``ValueError`` instead of silently continuing someone else's run.

Most users only pass ``checkpoint_dir`` to :func:`bilevel.run`;
:func:`latest_step` and :func:`restore_state` read a directory directly (e.g.
to evaluate a run that is still going).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_FORMAT = 1

__all__ = ["Restored", "RunCheckpointer", "fingerprint", "latest_step",
           "restore_state"]


def _ocp():
  """orbax.checkpoint, imported on first use (it takes a second to import)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _leaf_bytes(leaf) -> bytes:
  if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.ascontiguousarray(jax.device_get(leaf)).tobytes()


def fingerprint(initial_state: PyTree, data) -> str:
  """SHA-256 of a run's initial state (values included) and data shapes."""
  digest = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(initial_state)
  digest.update(str(treedef).encode())
  for leaf in leaves:
    digest.update(f"{jnp.result_type(leaf)}{jnp.shape(leaf)}".encode())
    digest.update(_leaf_bytes(leaf))
  if data is not None:
    leaves, treedef = jax.tree.flatten(data)
    digest.update(str(treedef).encode())
    for leaf in leaves:
      digest.update(f"{jnp.result_type(leaf)}{jnp.shape(leaf)}".encode())
  return digest.hexdigest()


def _manager(directory: pathlib.Path, max_to_keep: int | None, *,
             create: bool):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=create)
  return ocp.CheckpointManager(directory, options=options)


def _directory(directory: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(directory).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ValueError(f"checkpoint_dir {str(path)!r} exists and is not a "
                     "directory.")
  return path


def _to_json(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class Restored(NamedTuple):
  """A checkpoint read back: the run as it was after ``step`` steps."""
  step: int
  state: PyTree
  history: PyTree
  evaluations: list


class RunCheckpointer:
  """The checkpoints of one run, in one directory (used by ``bilevel.run``).

  Args:
    directory: where the checkpoints live (created if needed).
    initial_state: the run's state before its first step: the fingerprint
      and the restore target (restored arrays take its dtypes, shapes and
      shardings).
    data: the run's data (only shapes and batch sizes are fingerprinted).
    max_to_keep: checkpoints kept.
  """

  def __init__(self, directory: str | os.PathLike, initial_state: PyTree,
               data, *, max_to_keep: int = 2):
    self.directory = _directory(directory)
    self._like = initial_state
    self._fingerprint = fingerprint(initial_state, data)
    self._manager = _manager(self.directory, max_to_keep, create=True)
    self._warned = False

  def restore_latest(self, info_like: Callable[[PyTree], PyTree]
                     ) -> Restored | None:
    """The latest checkpoint, or ``None`` if the directory has none.

    Args:
      info_like: maps the state to the shapes of one step's ``info`` (e.g.
        ``jax.eval_shape`` of ``solver.step``), to restore the history.

    Raises:
      ValueError: if the checkpoint belongs to another run.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    ocp = _ocp()
    meta = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("fingerprint") != self._fingerprint:
      raise ValueError(
          f"The checkpoint in {str(self.directory)!r} (step {step}) belongs "
          "to another run: its initial state, key, solver or data shapes "
          "differ from this one's. Use another checkpoint_dir, or delete "
          "this one to start afresh.")
    info = info_like(self._like)
    history_like = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct((step,) + tuple(leaf.shape),
                                          leaf.dtype), info)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._like),
        history=ocp.args.StandardRestore(history_like)))
    evaluations = [tuple(pair) for pair in meta.get("evaluations") or []]
    return Restored(step, restored.state, restored.history, evaluations)

  def save(self, step: int, state: PyTree, history: PyTree,
           evaluations: list) -> None:
    """Starts writing the checkpoint of ``step`` (returns once on the host)."""
    try:
      evaluations_json = json.loads(json.dumps(evaluations, default=_to_json))
    except (TypeError, ValueError):
      evaluations_json = None
      if not self._warned:
        self._warned = True
        warnings.warn("The callback's values are not JSON-serialisable: "
                      "checkpoints do not keep them, and a resumed run "
                      "returns only the values computed after resuming.",
                      RuntimeWarning, stacklevel=3)
    meta = {"format": _FORMAT, "step": step, "fingerprint": self._fingerprint,
            "evaluations": evaluations_json}
    ocp = _ocp()
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        history=ocp.args.StandardSave(history),
        meta=ocp.args.JsonSave(meta)))

  def close(self) -> None:
    """Waits for pending writes and releases the directory."""
    self._manager.wait_until_finished()
    self._manager.close()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The step of the latest complete checkpoint in ``directory`` (or None)."""
  path = _directory(directory)
  if not path.exists():
    return None
  # Another process may be writing to the directory and deleting its old
  # checkpoints while this one reads it: a step listed then gone is retried.
  for attempt in range(10):
    try:
      manager = _manager(path, None, create=False)
      try:
        return manager.latest_step()
      finally:
        manager.close()
    except FileNotFoundError:
      if attempt == 9:
        raise
  return None  # pragma: no cover - unreachable


def restore_state(directory: str | os.PathLike, like: PyTree, *,
                  step: int | None = None) -> PyTree:
  """The solver state saved in ``directory`` (the latest, or that of ``step``).

  Args:
    directory: a ``checkpoint_dir`` of :func:`bilevel.run`.
    like: a state of the same solver and shapes, e.g.
      ``solver.init(x0, y0, key=key, data=data)``; the restored arrays take
      its dtypes and shardings.
    step: which checkpoint; the latest by default.

  Raises:
    FileNotFoundError: if there is no such checkpoint.
  """
  path = _directory(directory)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint directory {str(path)!r}.")
  manager = _manager(path, None, create=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"No checkpoint of step {step} in "
                              f"{str(path)!r}; it has {manager.all_steps()}.")
    ocp = _ocp()
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(like))).state
  finally:
    manager.close()
