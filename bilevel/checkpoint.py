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

The fingerprint ties a directory to one run. It is a dict of digests, one per
part of the run (:func:`fingerprint`), compared field by field when a run
resumes: a checkpoint of a run that differs in any of them raises
``ValueError`` naming what differs, instead of silently continuing someone
else's run. The parts, each a SHA-256 of its contents
(:func:`bilevel._identity.digest`, stable across processes):

* ``"solver"``: the factory's name (``"aid"``; ``"unrecorded"`` for a
  solver assembled by hand, without :attr:`bilevel.BilevelSolver.spec`);
* ``"hyperparameter <name>"``, one per argument of the factory other than
  the problem, defaults applied: numbers by value, optax optimizers and
  schedules by their kind and their own hyperparameters (``optax.sgd(0.05)``
  is not ``optax.sgd(0.5)``, nor ``optax.adam(0.05)``), linear solvers, etc.;
* ``"problem"``: the problem's functions (``f``, ``g``, projections,
  constraints) by their code, the values they close over and the
  module-level values they read; for an unrecorded solver, ``solver.init``
  and ``solver.step`` as functions instead (whatever they close over);
* ``"init and step"``, only when a recorded solver's ``init`` or ``step``
  was replaced after it was built (``solver._replace(step=...)``): those
  functions;
* ``"data"``: the data's structure, batch sizes, shapes, dtypes and
  contents (a SHA-256 of every array's bytes);
* ``"x0"``, ``"y0"``: the initial state's ``x`` and ``y``;
* ``"key"``: the run's PRNG key;
* ``"initial state"``: the rest of the initial state (optimizer states,
  sampler seeds, auxiliary variables), values included.

Not fingerprinted: ``num_steps``, ``steps_per_chunk``, the callback and the
other arguments of :func:`bilevel.run` that do not change the steps; a
function's behaviour that depends on state outside its code, closure and
module-level numbers and functions (a global dict or object it reads, a
module attribute, JAX configuration such as
``jax_default_matmul_precision``, files), the code of functions reached
through a module attribute (``jnp.sum``, ``mylib.loss``: only the names),
``jax.jit`` options, library versions and the solvers' own code (a
hyperparameter left at its default is fingerprinted as the default the
factory's signature gives, e.g. ``linear_solver=None``, not as what the
factory builds from it) (:mod:`bilevel._identity` lists the rules).

Cost: the data is copied to host memory and hashed once per
:class:`RunCheckpointer` (about 2 s per GB: 0.74 s measured for 400 MB of
float32 on CPU), as are the initial state and any arrays the solver's
hyperparameters or the problem's functions close over (the copy needs
arrays addressable from this process, as for the state).

Most users only pass ``checkpoint_dir`` to :func:`bilevel.run`;
:func:`latest_step` and :func:`restore_state` read a directory directly (e.g.
to evaluate a run that is still going).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from typing import Any, Callable, NamedTuple

import jax

from bilevel import _identity
from bilevel._base import SolverSpec

PyTree = Any

# 1: a single SHA-256 of the initial state and the data's shapes.
# 2: a dict of digests, one per part of the run (fingerprint()).
_FORMAT = 2

__all__ = ["Restored", "RunCheckpointer", "differences", "fingerprint",
           "latest_step",
           "restore_state"]


def _ocp():
  """orbax.checkpoint, imported on first use (it takes a second to import)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _treedef_text(treedef) -> str:
  """``str(treedef)`` without memory addresses (of functions in aux data)."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef))


def _path_text(path) -> str:
  return jax.tree_util.keystr(path)


def _tree_digest(tree: PyTree, tracers: list | None) -> str:
  """Digest of a pytree: structure, then each leaf's path, dtype, shape and
  contents (arrays by a SHA-256 of their bytes)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return _identity.digest(
      (_treedef_text(treedef),
       [(_path_text(path), leaf) for path, leaf in flat]), tracers=tracers)


def _head(path) -> str | None:
  """The name of a path's first entry (``"x"`` for ``state.x[0]``)."""
  if not path:
    return None
  entry = path[0]
  for attribute in ("name", "key"):
    name = getattr(entry, attribute, None)
    if isinstance(name, str):
      return name
  return None


def _state_digests(state: PyTree, tracers: list | None) -> dict[str, str]:
  """Digests of the state's ``x``, ``y`` and of the rest of it."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  parts = {"x": [], "y": [], "rest": []}
  for path, leaf in flat:
    head = _head(path)
    parts[head if head in ("x", "y") else "rest"].append(
        (_path_text(path), leaf))
  return {
      "x0": _identity.digest(parts["x"], tracers=tracers),
      "y0": _identity.digest(parts["y"], tracers=tracers),
      "initial state": _identity.digest(
          (_treedef_text(treedef), parts["rest"]), tracers=tracers),
  }


def fingerprint(initial_state: PyTree, data, *, solver=None, key=None,
                tracers: list | None = None) -> dict[str, str]:
  """The fingerprint of a run, field by field (the module docstring).

  Args:
    initial_state: the run's state before its first step.
    data: the run's data (a :class:`bilevel.Data`, any pytree, or ``None``);
      its arrays are copied to host memory and hashed.
    solver: the :class:`bilevel.BilevelSolver`; with a
      :attr:`~bilevel.BilevelSolver.spec` its name, hyperparameters and
      problem are fingerprinted, without one its ``init`` and ``step``
      functions. ``None``: the solver is not fingerprinted.
    key: the run's PRNG key (or ``None``).
    tracers: under a JAX transformation, a list that collects the tracers
      found (their shapes and dtypes are fingerprinted, not their values;
      :func:`bilevel._identity.digest`). ``None``: a tracer raises
      ``TypeError``.

  Returns:
    ``{"solver": name, "hyperparameter <name>": digest, ..., "problem":
    digest, "data": ..., "x0": ..., "y0": ..., "key": ..., "initial state":
    ...}``: the solver's name, then hexadecimal SHA-256 digests.
  """
  entries: dict[str, str] = {}
  spec = getattr(solver, "spec", None)
  if isinstance(spec, SolverSpec):
    entries["solver"] = spec.name
    for name, value in spec.hyperparameters.items():
      entries[f"hyperparameter {name}"] = _identity.digest(value,
                                                           tracers=tracers)
    entries["problem"] = _identity.digest(spec.problem, tracers=tracers)
    if solver.init is not spec.init or solver.step is not spec.step:
      entries["init and step"] = _identity.digest((solver.init, solver.step),
                                                  tracers=tracers)
  else:
    entries["solver"] = "unrecorded"
    if solver is not None:
      entries["problem"] = _identity.digest((solver.init, solver.step),
                                            tracers=tracers)
  entries["data"] = _tree_digest(data, tracers)
  state = _state_digests(initial_state, tracers)
  entries["x0"] = state["x0"]
  entries["y0"] = state["y0"]
  entries["key"] = _identity.digest(key, tracers=tracers)
  entries["initial state"] = state["initial state"]
  return entries


def differences(saved: dict, current: dict) -> list[str]:
  """Names of the fields of ``saved`` and ``current`` that differ."""
  names = list(current) + [name for name in saved if name not in current]
  differ = [name for name in names if saved.get(name) != current.get(name)]
  if "solver" in differ:
    # Other solvers have other hyperparameters: naming them adds nothing.
    differ = [name for name in differ
              if not name.startswith("hyperparameter ")]
    if "unrecorded" in (saved.get("solver"), current.get("solver")):
      # "problem" digests the problem of one and the functions of the other.
      differ = [name for name in differ
                if name not in ("problem", "init and step")]
  return differ


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

  The run is identified by :func:`fingerprint` (the module docstring says
  what it sees and what it does not): a checkpoint whose fingerprint differs
  is refused with a ``ValueError`` naming the parts that differ.

  Args:
    directory: where the checkpoints live (created if needed).
    initial_state: the run's state before its first step: fingerprinted
      (``x``, ``y`` and the rest, values included) and the restore target
      (restored arrays take its dtypes, shapes and shardings).
    data: the run's data: its structure, shapes, dtypes and contents are
      fingerprinted (its arrays copied to host memory and hashed once, here).
    max_to_keep: checkpoints kept.
    solver: the run's :class:`bilevel.BilevelSolver`: its name,
      hyperparameters and problem are fingerprinted (``None``: not
      fingerprinted).
    key: the run's PRNG key (``None``: the run has none).

  Raises:
    TypeError: if the run holds JAX tracers (the state, data, key or the
      solver's hyperparameters or problem, under ``jax.jit``/``jax.vmap``).
  """

  def __init__(self, directory: str | os.PathLike, initial_state: PyTree,
               data, *, max_to_keep: int = 2, solver=None, key=None):
    self.directory = _directory(directory)
    self._like = initial_state
    tracers = []
    self._fingerprint = fingerprint(initial_state, data, solver=solver,
                                    key=key, tracers=tracers)
    if tracers:
      raise TypeError(
          "RunCheckpointer: the run holds JAX tracers (values of a jit/vmap "
          "being traced, e.g. a solver built inside jax.vmap from a traced "
          f"step size; {len(tracers)} found): its checkpoints cannot be "
          "written between chunks. Under a transformation, bilevel.run "
          "checkpoints through host callbacks instead (bilevel._sweep).")
    self._manager = _manager(self.directory, max_to_keep, create=True)
    self._warned = False

  @property
  def fingerprint(self) -> dict[str, str]:
    """This run's :func:`fingerprint` (a copy)."""
    return dict(self._fingerprint)

  def _check(self, step: int, meta: dict) -> None:
    """Raises ``ValueError`` if ``meta`` is not that of this run."""
    saved = meta.get("fingerprint")
    written = meta.get("format")
    if written != _FORMAT or not isinstance(saved, dict):
      if isinstance(written, int) and written > _FORMAT:
        version = "a later version of bilevel"
      else:
        version = "an earlier version of bilevel"
      raise ValueError(
          f"The checkpoint in {str(self.directory)!r} (step {step}) was "
          f"written by {version} (checkpoint format {written}; this "
          f"version writes format {_FORMAT}), which identifies runs "
          "differently: it cannot tell whether the checkpoint belongs to "
          "this run. Use another checkpoint_dir, or delete this one to start "
          "afresh.")
    differ = differences(saved, self._fingerprint)
    if differ:
      detail = ""
      if "solver" in differ:
        detail = (f" (solver {saved.get('solver')!r} in the checkpoint, "
                  f"{self._fingerprint.get('solver')!r} in this run)")
      verb = ("differs" if len(differ) == 1 and differ[0] != "init and step"
              else "differ")
      raise ValueError(
          f"The checkpoint in {str(self.directory)!r} (step {step}) belongs "
          f"to another run: its {', '.join(differ)} {verb} from this "
          f"run's{detail}. Use another checkpoint_dir, or delete this one "
          "to start afresh.")

  def restore_latest(self, info_like: Callable[[PyTree], PyTree]
                     ) -> Restored | None:
    """The latest checkpoint, or ``None`` if the directory has none.

    Args:
      info_like: maps the state to the shapes of one step's ``info`` (e.g.
        ``jax.eval_shape`` of ``solver.step``), to restore the history.

    Raises:
      ValueError: if the checkpoint belongs to another run (the message
        names the parts of the fingerprint that differ), or was written by
        another version of the checkpoint format.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    ocp = _ocp()
    meta = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    self._check(step, meta)
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
