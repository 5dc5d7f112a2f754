"""Checkpointed runs inside a JAX transformation: sweeps under ``jax.vmap``.

Under ``jax.vmap`` (a sweep over keys, initial values or hyperparameters,
the solver built inside the mapped function), :func:`bilevel.run` cannot
stop between chunks: the run is traced into the caller's program. Its
checkpoints go through host callbacks instead (``io_callback``, which a
``vmap`` calls once per member):

* the run is traced as a loop over groups of ``checkpoint_every`` chunks;
  after each group (and at the end) every member writes its state, its
  history so far and its divergence record to
  ``<checkpoint_dir>/member-<id>/step-<n>.npz`` (written to a temporary
  file, then renamed: a kill leaves the previous file intact), where
  ``<id>`` is a SHA-256 of the member's own values (initial state, key,
  traced hyperparameters and data); only the ``max_checkpoints`` latest
  files of a member are kept;
* ``<checkpoint_dir>/sweep.json`` holds the fingerprint of what all
  members share (:func:`bilevel.checkpoint.fingerprint` with the traced
  values seen by their shapes only); a directory of another sweep is
  refused when the run is traced;
* when the run is traced, the directory is read: the sweep resumes from
  the latest step that every member has written, each member from its own
  file. A member that has none (the values of the sweep changed) raises
  ``ValueError`` from its callback; JAX reports it as a
  ``JaxRuntimeError`` that carries the message.

Each member's steps are those of an uninterrupted run, so a resumed sweep
is bit-identical to one that never stopped. Each member stops at its own
divergence (its floating-point state freezes at its last good step) and
the others go on. The directory is read when the run is traced: under
``jax.jit``, call the jitted function again only after re-tracing (a new
``jax.jit`` object, or ``jax.vmap`` alone, which traces at every call).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from bilevel import _chunk, _divergence, _identity
from bilevel import checkpoint as checkpoint_lib

PyTree = Any

_FORMAT = 1
_STEP_FILE = re.compile(r"step-(\d+)\.npz$")


def _is_key(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)


def _raw(tree: PyTree) -> PyTree:
  """``tree`` with PRNG keys as their raw data (callbacks take no keys)."""
  return jax.tree.map(
      lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf,
      tree)


def _cooked(raw: PyTree, like: PyTree) -> PyTree:
  """Inverse of :func:`_raw`, with ``like``'s key implementations."""
  return jax.tree.map(
      lambda leaf, model: jax.random.wrap_key_data(
          leaf, impl=jax.random.key_impl(model)) if _is_key(model) else leaf,
      raw, like)


def _shapes(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a),
                                                      jnp.result_type(a)),
                      tree)


class _Directory:
  """The files of one checkpointed sweep (host side, numpy only)."""

  def __init__(self, directory, shared: dict[str, str], max_to_keep: int):
    self.path = pathlib.Path(directory).expanduser().absolute()
    if self.path.exists() and not self.path.is_dir():
      raise ValueError(f"checkpoint_dir {str(self.path)!r} exists and is "
                       "not a directory.")
    self.max_to_keep = max_to_keep
    self.path.mkdir(parents=True, exist_ok=True)
    manifest = self.path / "sweep.json"
    if manifest.exists():
      saved = json.loads(manifest.read_text())
      if saved.get("format") != _FORMAT or "fingerprint" not in saved:
        raise ValueError(
            f"{str(self.path)!r} does not hold the checkpoints of a sweep "
            "(a run under jax.vmap/jax.jit) written by this version of "
            "bilevel. Use another checkpoint_dir, or delete this one.")
      differ = checkpoint_lib.differences(saved["fingerprint"], shared)
      if differ:
        raise ValueError(
            f"The checkpoints in {str(self.path)!r} belong to another sweep: "
            f"its {', '.join(differ)} differ from this one's. Use another "
            "checkpoint_dir, or delete this one to start afresh.")
    elif any(self.path.iterdir()):
      raise ValueError(
          f"checkpoint_dir {str(self.path)!r} is not empty and holds no "
          "sweep: under jax.vmap/jax.jit, give run() a directory of its "
          "own.")
    else:
      temporary = manifest.with_suffix(".tmp")
      temporary.write_text(json.dumps({"format": _FORMAT,
                                       "fingerprint": shared}))
      os.replace(temporary, manifest)

  def _members(self) -> list[pathlib.Path]:
    return sorted(p for p in self.path.glob("member-*") if p.is_dir())

  @staticmethod
  def _steps(member: pathlib.Path) -> list[int]:
    return sorted(int(m.group(1)) for m in
                  (_STEP_FILE.match(p.name) for p in member.iterdir()) if m)

  def resume_step(self) -> int:
    """The latest step every member has written (0 if none)."""
    latest = [steps[-1] for steps in map(self._steps, self._members())
              if steps]
    return min(latest) if latest else 0

  def member_file(self, member: np.ndarray, step: int) -> pathlib.Path:
    name = "member-" + bytes(np.asarray(member, np.uint8)).hex()[:32]
    return self.path / name / f"step-{int(step):012d}.npz"

  def save(self, member, done, state, history, first_bad, info_scales):
    """Writes one member's checkpoint of step ``done`` (an io_callback)."""
    done = int(done)
    target = self.member_file(member, done)
    target.parent.mkdir(exist_ok=True)
    arrays = {"first_bad": np.asarray(first_bad),
              "info_scales": np.asarray(info_scales)}
    for index, leaf in enumerate(jax.tree.leaves(state)):
      arrays[f"state_{index}"] = np.asarray(leaf)
    for index, leaf in enumerate(jax.tree.leaves(history)):
      arrays[f"history_{index}"] = np.asarray(leaf)[:done]
    temporary = target.with_suffix(".tmp")
    with open(temporary, "wb") as stream:
      np.savez(stream, **arrays)
    os.replace(temporary, target)
    for step in self._steps(target.parent)[:-self.max_to_keep]:
      (target.parent / f"step-{step:012d}.npz").unlink(missing_ok=True)
    return np.int32(0)

  def restore(self, member, step: int, like):
    """One member's checkpoint of ``step``, shaped like ``like``."""
    source = self.member_file(member, step)
    if not source.exists():
      raise ValueError(
          f"A member of this sweep has no checkpoint of step {step} in "
          f"{str(self.path)!r}: its values (key, initial values or traced "
          "hyperparameters) differ from those of the sweep that wrote the "
          "directory. Use another checkpoint_dir, or delete this one to "
          "start afresh.")
    with np.load(source) as stored:
      state_like, history_like, _, _ = like
      state = [stored[f"state_{i}"] for i in
               range(len(jax.tree.leaves(state_like)))]
      history = [stored[f"history_{i}"] for i in
                 range(len(jax.tree.leaves(history_like)))]
      restored = (jax.tree.unflatten(jax.tree.structure(state_like), state),
                  jax.tree.unflatten(jax.tree.structure(history_like),
                                     history),
                  stored["first_bad"], stored["info_scales"])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
      if got.shape != tuple(want.shape) or got.dtype != want.dtype:
        raise ValueError(f"The checkpoint {str(source)!r} does not match "
                         "this run's shapes.")
    return restored


def _member_id(values) -> np.ndarray:
  """SHA-256 of one member's values (an io_callback)."""
  return np.frombuffer(bytes.fromhex(_identity.digest(values)), np.uint8)


def run(solver, state, data, *, num_steps: int, key, directory,
        steps_per_chunk: int, checkpoint_every: int, max_checkpoints: int,
        limits: _divergence.Limits | None, stop_at_divergence: bool):
  """A checkpointed run traced into the caller's program.

  Returns:
    ``(state, health, history)`` as a traced run without checkpoints would.
  """
  tracers = []
  shared = checkpoint_lib.fingerprint(state, data, solver=solver, key=key,
                                      tracers=tracers)
  files = _Directory(directory, shared, max_checkpoints)
  start = files.resume_step()
  if start > num_steps:
    raise ValueError(f"The checkpoints in {str(files.path)!r} are at step "
                     f"{start}, beyond num_steps={num_steps}.")
  info_like = jax.eval_shape(solver.step, state, data)[1]
  length = min(steps_per_chunk, num_steps)
  num_chunks = math.ceil((num_steps - start) / length)
  rows = start + num_chunks * length
  history = jax.tree.map(
      lambda leaf: jnp.zeros((rows,) + tuple(leaf.shape), leaf.dtype),
      info_like)
  health = _chunk.start_health(state)
  initial_raw = _raw(state)
  member = io_callback(_member_id, jax.ShapeDtypeStruct((32,), jnp.uint8),
                       (initial_raw, [_raw(t) for t in tracers]))

  if start:
    history_like = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct((start,) + tuple(leaf.shape),
                                          leaf.dtype), info_like)
    like = (_shapes(initial_raw), history_like,
            jax.ShapeDtypeStruct((), jnp.int32),
            _shapes(health.info_scales))
    raw_state, past, first_bad, info_scales = io_callback(
        lambda m: files.restore(m, start, like), like, member)
    state = _cooked(raw_state, state)
    history = jax.tree.map(
        lambda buffer, part: jax.lax.dynamic_update_slice_in_dim(
            buffer, part, 0, 0), history, past)
    health = health._replace(first_bad=first_bad, info_scales=info_scales)

  def chunk(index, carry):
    state_, health_, history_ = carry
    begin = start + index * length
    (state_, health_), (infos, _, _) = _chunk.scan_steps(
        solver, state_, data, health_, begin, num_steps, length, limits,
        stop_at_divergence=stop_at_divergence, freeze_counters=False)
    history_ = jax.tree.map(
        lambda buffer, part: jax.lax.dynamic_update_slice_in_dim(
            buffer, part, begin, 0), history_, infos)
    return state_, health_, history_

  def save(carry, done):
    state_, health_, history_ = carry
    io_callback(files.save, jax.ShapeDtypeStruct((), jnp.int32), member,
                done, _raw(state_), history_, health_.first_bad,
                health_.info_scales)

  def group(index, carry):
    first = index * checkpoint_every
    carry = jax.lax.fori_loop(first, first + checkpoint_every, chunk, carry)
    save(carry, jnp.minimum(start + (first + checkpoint_every) * length,
                            num_steps))
    return carry

  carry = (state, health, history)
  num_groups, remainder = divmod(num_chunks, checkpoint_every)
  carry = jax.lax.fori_loop(0, num_groups, group, carry)
  if remainder:
    first = num_groups * checkpoint_every
    carry = jax.lax.fori_loop(first, num_chunks, chunk, carry)
    save(carry, num_steps)
  state, health, history = carry
  return state, health, jax.tree.map(lambda a: a[:num_steps], history)
