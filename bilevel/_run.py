"""The run loop: chunks of steps compiled as one ``lax.scan`` each.

Between chunks, and only there, the host looks at the run: it reads one
integer that says whether a step produced non-finite values (checked inside
the compiled chunk, step by step), updates a progress bar, calls the user's
callback and writes checkpoints (:mod:`bilevel.checkpoint`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bilevel import checkpoint as checkpoint_lib
from bilevel._base import BilevelSolver
from bilevel._validation import check_positive_int

PyTree = Any

ON_NONFINITE = ("raise", "warn", "ignore")


class RunResult(NamedTuple):
  """What :func:`run` returns.

  Attributes:
    x: final upper variable.
    y: final lower variable.
    state: final solver state (resume with ``solver.step``).
    history: the ``info`` records of every step, stacked on a leading axis
      of length ``num_steps`` (with a checkpoint, the steps restored from it
      included).
    evaluations: ``(step, callback output)`` pairs, one per chunk end, when a
      callback was given (empty under a JAX transformation).
    seconds: wall time of the compiled chunks, compilation, callbacks and
      checkpoints excluded (``nan`` under a JAX transformation, or when every
      chunk compiled).
    compile_seconds: wall time of the chunk that compiled, if one did.
    num_timed_steps: steps covered by ``seconds``.
    nonfinite_step: the first step (counted from 1, from the start of the
      run) whose state or diagnostics held a NaN or an infinity; ``None`` if
      none did or the check was off. Under a JAX transformation, an integer
      array, ``-1`` for none.
    checkpoint_seconds: wall time spent writing checkpoints (``0.0``
      without).
  """
  x: PyTree
  y: PyTree
  state: Any
  history: Any
  evaluations: list
  seconds: float
  compile_seconds: float
  num_timed_steps: int
  nonfinite_step: Any = None
  checkpoint_seconds: float = 0.0

  @property
  def y_penalized(self) -> PyTree:
    """The penalised point of a penalty-type solver, or ``None``.

    ``y`` is always an iterate of the lower problem alone: a model of
    ``g(x, .)`` that never saw the upper data, the one to evaluate or deploy.
    Penalty-type solvers (``penalty``, ``penalty_momentum``, ``f2sa``,
    ``bome``, ``scalebio``) also carry the papers' ``y``, fitted to
    ``f / lambda + g``: it approaches the optimistic lower solution (the
    lower minimiser best for ``f``) as ``lambda`` grows, the one to report
    when lower solutions are not unique. It is ``state.y_penalized``.
    """
    return getattr(self.state, "y_penalized", None)

  @property
  def steps_per_second(self) -> float:
    """Steps per second, compilation excluded."""
    return self.num_timed_steps / self.seconds if self.seconds > 0 else math.nan


class DivergenceError(FloatingPointError):
  """A step of :func:`run` produced a NaN or an infinity.

  Attributes:
    step: the first bad step, counted from 1 from the start of the run.
    variables: paths of the non-finite leaves at that step, e.g.
      ``["state.v", "info.hypergradient_norm"]``.
    last_finite_info: ``{name: value}`` of the diagnostics of the step
      before (``None`` if the first step of the run was bad).
    result: a :class:`RunResult` whose ``state`` is the last finite state
      (after step ``step - 1``) and whose ``history`` ends with the bad
      step; resume from ``result.state`` (e.g. with smaller step sizes).
  """

  def __init__(self, message: str, *, step: int, variables: list[str],
               last_finite_info: dict[str, float] | None, result: RunResult):
    super().__init__(message)
    self.step = step
    self.variables = variables
    self.last_finite_info = last_finite_info
    self.result = result


def _checked_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of the inexact (floating or complex) leaves."""
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
      leaves.append((jax.tree_util.keystr(path), leaf))
  return leaves


def _finite_flags(state, info) -> jax.Array:
  """One flag per inexact leaf of ``(state, info)``: all its values finite."""
  flags = [jnp.all(jnp.isfinite(leaf))
           for _, leaf in _checked_leaves((state, info))]
  return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def _leaf_names(state, info) -> list[str]:
  """Names of the leaves flagged by :func:`_finite_flags`, in its order."""
  names = []
  for path, _ in _checked_leaves((state, info)):
    # keystr gives "[0].v" for the state's field v: show "state.v".
    for index, prefix in enumerate(("state", "info")):
      head = f"[{index}]"
      if path.startswith(head):
        path = prefix + path[len(head):]
        break
    names.append(path)
  return names


class _StateShardings:
  """A pytree of shardings as a hashable static argument of the chunk."""

  def __init__(self, shardings: PyTree):
    leaves, self.treedef = jax.tree.flatten(shardings)
    self.leaves = tuple(leaves)

  def tree(self) -> PyTree:
    return jax.tree.unflatten(self.treedef, self.leaves)

  def __hash__(self):
    return hash((self.treedef, self.leaves))

  def __eq__(self, other):
    return (isinstance(other, _StateShardings) and
            (self.treedef, self.leaves) == (other.treedef, other.leaves))


def _scan_steps(solver: BilevelSolver, state, data, num_active, length: int,
                on_nonfinite: str = "raise", freeze_counters: bool = True,
                state_shardings: _StateShardings | None = None):
  """``length`` steps of ``solver``; steps ``>= num_active`` leave ``state``.

  The padding keeps one compiled chunk for every chunk of a run, the last one
  included, and ``step`` is traced exactly once per compilation. A padded
  step is computed and discarded (a select, not a branch, so the step is not
  traced twice); only the last chunk of a run has padded steps.

  Unless ``on_nonfinite == "ignore"``, every step checks its new state and
  its diagnostics for NaN and infinities (one reduction per leaf, fused by
  XLA) and the carry keeps the index of the first bad step of the chunk. With
  ``"raise"``, the state stops changing at the last finite one; with
  ``"warn"`` the run goes on. With ``freeze_counters=False`` (runs under a
  JAX transformation) only the floating-point leaves stop; integer leaves
  keep counting. With ``state_shardings``, the state after every step is
  constrained to them (e.g. FSDP shardings that must not drift).

  Returns:
    ``((state, first_bad), (infos, flags))``: ``first_bad`` is the index in
    the chunk of the first active step with a non-finite value (``-1`` if
    none) and ``flags[i]`` holds one bool per inexact leaf of ``(state,
    info)`` after step ``i`` (all finite); ``flags`` is ``None`` when
    ``on_nonfinite == "ignore"``.
  """
  def body(carry, index):
    state_, first_bad = carry
    stepped, info = solver.step(state_, data)
    active = index < num_active
    keep = active
    flags = None
    if on_nonfinite != "ignore":
      flags = _finite_flags(stepped, info)
      finite = jnp.all(flags)
      healthy = first_bad < 0
      first_bad = jnp.where(active & healthy & ~finite, index, first_bad)
      if on_nonfinite == "raise":
        keep = active & healthy & finite

    def select(new, old):
      # Only floating-point leaves stop at the last finite step when
      # `freeze_counters` is off: counters (step counts, sampler positions)
      # then depend on the step index alone and stay unbatched under vmap,
      # so a solver's `lax.cond` on its step count remains a real branch.
      inexact = jnp.issubdtype(jnp.result_type(new), jnp.inexact)
      return jnp.where(keep if inexact or freeze_counters else active,
                       new, old)

    state_ = jax.tree.map(select, stepped, state_)
    if state_shardings is not None:
      state_ = jax.lax.with_sharding_constraint(state_, state_shardings.tree())
    return (state_, first_bad), (info, flags)

  carry = (state, jnp.asarray(-1, jnp.int32))
  return jax.lax.scan(body, carry, jnp.arange(length, dtype=jnp.int32))


_compiled_scan_steps = jax.jit(
    _scan_steps, static_argnames=("solver", "length", "on_nonfinite",
                                  "state_shardings"))


def _is_traced(tree: PyTree) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _progress_bar(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - tqdm is a dependency
    return None
  return tqdm(total=total, initial=initial, unit="step", leave=False)


def _concatenate(chunks: list) -> Any:
  if len(chunks) == 1:
    return chunks[0]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *chunks)


def _check_state(solver: BilevelSolver, state, data) -> None:
  """``ValueError`` unless ``state`` is a state of ``solver`` for ``data``."""
  try:
    x, y = state.x, state.y
  except AttributeError:
    raise TypeError("state must be a solver state (from solver.init, "
                    "solver.step or RunResult.state); got "
                    f"{type(state).__name__}.") from None
  expected = jax.eval_shape(
      lambda: solver.init(x, y, key=jax.random.key(0), data=data))

  def signature(tree):
    return (jax.tree.structure(tree),
            [(jnp.shape(leaf), jnp.result_type(leaf))
             for leaf in jax.tree.leaves(tree)])

  if signature(state) != signature(expected):
    raise ValueError(
        "state does not match this solver and data: expected a "
        f"{type(expected).__name__} shaped like "
        f"{jax.tree.map(lambda a: f'{a.dtype}{list(a.shape)}', expected)}; "
        f"got a {type(state).__name__} shaped like "
        f"{jax.tree.map(lambda a: f'{jnp.result_type(a)}{list(jnp.shape(a))}', state)}. "
        "Pass the state of a run of the same solver on data of the same "
        "shapes.")


def _scalars(info) -> dict[str, float]:
  """``{name: float}`` of the scalar diagnostics of one step."""
  # Leaf paths; a NamedTuple's fields by name ("upper_loss", and
  # "hyperparameters['l2']" inside a dict field).
  items = [(jax.tree_util.keystr(path).lstrip(".") if hasattr(
      info, "_asdict") else jax.tree_util.keystr(path), leaf)
           for path, leaf in jax.tree_util.tree_flatten_with_path(info)[0]]
  return {name: float(value) for name, value in items
          if jnp.ndim(value) == 0 and jnp.issubdtype(jnp.result_type(value),
                                                     jnp.number)}


def _divergence_message(step: int, num_steps: int, variables: list[str],
                        last_info: dict[str, float] | None,
                        on_nonfinite: str) -> str:
  where = ", ".join(variables)
  if last_info is None:
    before = "There was no finite step before it in this run."
  else:
    values = ", ".join(f"{name}={value:.6g}" for name, value in
                       last_info.items())
    before = f"Diagnostics of the last finite step ({step - 1}): {values}."
  if on_nonfinite == "raise":
    then = (f"The run stopped; error.result.state is the state after step "
            f"{step - 1}. Smaller step sizes usually help; pass "
            "on_nonfinite='warn' to keep going.")
  else:
    then = "The run goes on (on_nonfinite='warn')."
  return (f"bilevel.run: non-finite values (NaN or inf) at step {step} of "
          f"{num_steps}, in {where}. {before} {then}")


def _traced_run(solver, state, data, num_steps, on_nonfinite,
                checkpoint_dir) -> RunResult:
  """The run as one scan in the caller's trace (under ``jit``/``vmap``)."""
  if checkpoint_dir is not None:
    raise ValueError("checkpoint_dir cannot be used under a JAX "
                     "transformation (jit/vmap): call run() outside it.")
  (state, first_bad), (history, _) = _scan_steps(
      solver, state, data, num_steps, num_steps, on_nonfinite,
      freeze_counters=False)
  nonfinite = None if on_nonfinite == "ignore" else jnp.where(
      first_bad < 0, -1, first_bad + 1)
  return RunResult(state.x, state.y, state, history, [], math.nan, math.nan,
                   0, nonfinite)


def run(solver: BilevelSolver, x0: PyTree, y0: PyTree, data=None, *,
        num_steps: int, key: jax.Array | None = None,
        steps_per_chunk: int = 100, progress: bool = False,
        callback: Callable[[int, Any], Any] | None = None,
        state: Any = None, on_nonfinite: str = "raise",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1, max_checkpoints: int = 2,
        state_sharding: Any = None) -> RunResult:
  """Runs ``num_steps`` solver steps.

  Steps run in chunks of ``steps_per_chunk``, each one compiled ``lax.scan``
  (one compilation serves every chunk, the last one included, and a second
  call with the same solver and shapes compiles nothing). Between chunks, the
  host updates a progress bar and calls ``callback(step, state)``; neither is
  timed. Under ``jax.jit``/``jax.vmap`` (e.g. a vmap over seeds or over step
  sizes, the solver built inside the mapped function) the whole run is one
  scan inside the caller's trace, without progress bar, callback, errors or
  checkpoints.

  **Divergence.** Every step checks its new state and its diagnostics for NaN
  and infinities inside the compiled chunk; the host reads the outcome once
  per chunk. With ``on_nonfinite="raise"`` (default) the state stops at the
  last finite step and the run raises :class:`DivergenceError`, naming the
  first bad step, the non-finite variables and the last finite diagnostics.
  Under a JAX transformation nothing can be raised: the floating-point
  leaves of the state stop at their last finite values (integer counters
  such as step counts keep counting) and ``RunResult.nonfinite_step`` tells
  where (``-1``: nowhere), which suits a vmap over step sizes where some
  diverge.

  **Checkpoints.** With ``checkpoint_dir``, the full state (optimizer states,
  sampler positions and keys included), the history and the callback values
  (when JSON-serialisable) are written every ``checkpoint_every`` chunks and
  at the end, atomically (:mod:`bilevel.checkpoint`, with orbax). If the
  directory already holds a checkpoint of this run (same solver state
  structure, initial state, key and data shapes), the run resumes from its
  latest one and continues up to ``num_steps`` in total; the result is
  bit-identical to an uninterrupted run. A checkpoint of another run raises
  ``ValueError``.

  Args:
    solver: a :class:`bilevel.BilevelSolver`.
    x0: initial upper variable.
    y0: initial lower variable.
    data: a :class:`bilevel.Data`, or ``None`` for full-batch objectives.
    num_steps: number of steps (in total, with a checkpoint to resume from).
    key: PRNG key for minibatch sampling (and stochastic solvers).
    steps_per_chunk: steps per compiled chunk.
    progress: show a progress bar.
    callback: ``callback(step, state) -> value`` called after each chunk;
      the values are returned in ``RunResult.evaluations``.
    state: resume from this solver state instead of calling ``solver.init``
      (``x0``/``y0``/``key`` are then ignored). It must be a state of this
      solver for data of these shapes (``ValueError`` otherwise).
    on_nonfinite: ``"raise"``, ``"warn"`` (a ``RuntimeWarning`` at the first
      bad step, and the run goes on) or ``"ignore"`` (no check, no cost).
    checkpoint_dir: directory of the run's checkpoints (created if needed).
    checkpoint_every: chunks between checkpoints.
    max_checkpoints: checkpoints kept (the oldest are deleted).
    state_sharding: for runs on several devices, a pytree of
      ``jax.sharding.Sharding`` matching the state, or a callable ``state ->
      shardings`` such as :func:`bilevel.sharding.fsdp` (``mesh``). The
      initial (or restored) state is placed on them and every step's state
      is constrained to them. Pair it with
      :func:`bilevel.sharding.shard_data` for data-parallel batches.
      ``None``: one device, or whatever the inputs' placement implies.

  Returns:
    A :class:`RunResult`.

  Raises:
    DivergenceError: with ``on_nonfinite="raise"``, at the first step with a
      NaN or an infinity.

  Example:
    >>> import jax, bilevel, problems
    >>> instance = problems.quadratic(jax.random.key(0), dim_x=4, dim_y=3)
    >>> solver = bilevel.solvers.aid(instance.problem)
    >>> result = bilevel.run(solver, instance.x0, instance.y0, num_steps=50)
    >>> result.history.upper_loss.shape
    (50,)
  """
  if not isinstance(solver, BilevelSolver):
    raise TypeError("run() expects a bilevel.BilevelSolver (e.g. "
                    f"bilevel.solvers.aid(problem)); got {type(solver).__name__}.")
  check_positive_int("num_steps", num_steps)
  check_positive_int("steps_per_chunk", steps_per_chunk)
  check_positive_int("checkpoint_every", checkpoint_every)
  check_positive_int("max_checkpoints", max_checkpoints)
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got "
                     f"{on_nonfinite!r}.")
  if callback is not None and not callable(callback):
    raise TypeError("callback must be a callable callback(step, state); got "
                    f"{type(callback).__name__}.")
  if state is None:
    state = solver.init(x0, y0, key=key, data=data)
  elif not _is_traced((state, data)):
    _check_state(solver, state, data)

  if _is_traced((state, data)):
    return _traced_run(solver, state, data, num_steps, on_nonfinite,
                       checkpoint_dir)
  shardings = None
  if state_sharding is not None:
    tree = state_sharding(state) if callable(state_sharding) else state_sharding
    try:
      state = jax.device_put(state, tree)
    except (ValueError, TypeError) as error:
      raise ValueError(
          "state_sharding must be a pytree of jax.sharding.Sharding that "
          "matches the solver state (or a callable state -> such a pytree, "
          f"e.g. bilevel.sharding.fsdp(mesh)): {error}") from error
    shardings = _StateShardings(tree)
  initial_state = state

  done = 0
  chunks = []
  evaluations = []
  checkpointer = None
  if checkpoint_dir is not None:
    checkpointer = checkpoint_lib.RunCheckpointer(
        checkpoint_dir, state, data, max_to_keep=max_checkpoints)
    restored = checkpointer.restore_latest(
        lambda like: jax.eval_shape(solver.step, like, data)[1])
    if restored is not None:
      if restored.step > num_steps:
        checkpointer.close()
        raise ValueError(
            f"The checkpoint in {checkpoint_dir} is at step {restored.step}, "
            f"beyond num_steps={num_steps}.")
      done, state = restored.step, restored.state
      if shardings is not None:
        state = jax.device_put(state, shardings.tree())
      chunks = [restored.history] if restored.step else []
      evaluations = list(restored.evaluations)

  length = min(steps_per_chunk, num_steps)
  seconds = 0.0
  compile_seconds = math.nan
  checkpoint_seconds = 0.0
  timed_steps = 0
  nonfinite_step = None
  num_chunks = 0
  bar = _progress_bar(num_steps, done, progress)
  try:
    while done < num_steps:
      active = min(length, num_steps - done)
      cache_size = _compiled_scan_steps._cache_size()  # pylint: disable=protected-access
      start = time.perf_counter()
      (new_state, first_bad), (infos, flags) = _compiled_scan_steps(
          solver, state, data, active, length=length,
          on_nonfinite=on_nonfinite, state_shardings=shardings)
      if _is_traced(first_bad):
        # The solver closes over tracers (it was built inside jit/vmap, e.g.
        # from a traced step size): run the whole run in the caller's trace.
        if checkpointer is not None:
          checkpointer.close()
          checkpointer = None
        return _traced_run(solver, initial_state, data, num_steps,
                           on_nonfinite, checkpoint_dir)
      jax.block_until_ready((new_state, infos))
      elapsed = time.perf_counter() - start
      if _compiled_scan_steps._cache_size() > cache_size:  # pylint: disable=protected-access
        compile_seconds = elapsed
      else:
        seconds += elapsed
        timed_steps += active
      infos = infos if active == length else jax.tree.map(
          lambda a, n=active: a[:n], infos)
      first_bad = int(first_bad)
      if first_bad >= 0 and nonfinite_step is None:
        nonfinite_step = done + first_bad + 1
        names = _leaf_names(new_state, jax.tree.map(lambda a: a[0], infos))
        variables = [name for name, bad in
                     zip(names, ~jax.device_get(flags[first_bad])) if bad]
        if first_bad > 0:
          last_info = _scalars(jax.tree.map(lambda a: a[first_bad - 1],
                                            infos))
        elif chunks:
          last_info = _scalars(jax.tree.map(lambda a: a[-1], chunks[-1]))
        else:
          last_info = None
        message = _divergence_message(nonfinite_step, num_steps, variables,
                                      last_info, on_nonfinite)
        if on_nonfinite == "raise":
          chunks.append(jax.tree.map(lambda a: a[:first_bad + 1], infos))
          result = RunResult(
              new_state.x, new_state.y, new_state, _concatenate(chunks),
              evaluations, seconds if timed_steps else math.nan,
              compile_seconds, timed_steps, nonfinite_step,
              checkpoint_seconds)
          raise DivergenceError(message, step=nonfinite_step,
                                variables=variables,
                                last_finite_info=last_info, result=result)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
      state = new_state
      chunks.append(infos)
      done += active
      num_chunks += 1
      if bar is not None:
        bar.update(active)
      if callback is not None:
        evaluations.append((done, callback(done, state)))
      if checkpointer is not None and (num_chunks % checkpoint_every == 0 or
                                       done == num_steps):
        start = time.perf_counter()
        checkpointer.save(done, state, _concatenate(chunks), evaluations)
        chunks = [_concatenate(chunks)]
        checkpoint_seconds += time.perf_counter() - start
  finally:
    if bar is not None:
      bar.close()
    if checkpointer is not None:
      start = time.perf_counter()
      checkpointer.close()
      checkpoint_seconds += time.perf_counter() - start
  return RunResult(state.x, state.y, state, _concatenate(chunks), evaluations,
                   seconds if timed_steps else math.nan, compile_seconds,
                   timed_steps, nonfinite_step, checkpoint_seconds)


__all__ = ["DivergenceError", "RunResult", "run"]
