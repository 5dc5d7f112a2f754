"""The run loop: chunks of steps compiled as one ``lax.scan`` each.

Between chunks, and only there, the host looks at the run: it reads one
integer that says whether a step diverged (non-finite values or a blow-up,
checked inside the compiled chunk, step by step: :mod:`bilevel._divergence`),
updates a progress bar, calls the user's callback and writes checkpoints
(:mod:`bilevel.checkpoint`). Under a JAX transformation the run is traced
into the caller's program instead (checkpointed sweeps: :mod:`bilevel._sweep`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bilevel import _chunk, _divergence, _identity, _sweep
from bilevel import checkpoint as checkpoint_lib
from bilevel._base import BilevelSolver
from bilevel._divergence import DivergenceError
from bilevel._validation import check_positive_int

PyTree = Any

ON_DIVERGENCE = _divergence.ON_DIVERGENCE


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
    divergence_step: the first step (counted from 1, from the start of the
      run) that diverged: its state or diagnostics held a NaN or an
      infinity, or grew past their bound (``max_growth``,
      ``max_magnitude``); ``None`` if none did or the check was off. Under a
      JAX transformation, an integer array (one per member under ``vmap``),
      ``-1`` for none.
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
  divergence_step: Any = None
  checkpoint_seconds: float = 0.0

  @property
  def nonfinite_step(self) -> Any:
    """Former name of :attr:`divergence_step`."""
    return self.divergence_step

  @property
  def y_penalized(self) -> PyTree:
    """The penalised point of a penalty-type solver, or ``None``.

    ``y`` is an iterate of the lower problem alone: a model of ``g(x, .)``
    that never saw the upper data, the one to evaluate or deploy.
    Penalty-type solvers (``penalty``, ``penalty_momentum``, ``f2sa``,
    ``bome``, ``scalebio``, ``lvhba``) also carry the papers' ``y``, fitted
    to ``f / lambda + g``: it approaches the optimistic lower solution (the
    lower minimiser best for ``f``) as ``lambda`` grows, the one to report
    when lower solutions are not unique. It is ``state.y_penalized``. The
    exception: ``lvhba`` with lower constraints has no lower iterate of its
    own, and its ``y`` is the paper's (the same array as ``y_penalized``).
    """
    return getattr(self.state, "y_penalized", None)

  @property
  def steps_per_second(self) -> float:
    """Steps per second, compilation excluded."""
    return self.num_timed_steps / self.seconds if self.seconds > 0 else math.nan


def _is_traced(tree: PyTree) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _holds_tracers(solver: BilevelSolver) -> bool:
  """Whether ``solver`` closes over tracers (built inside ``jit``/``vmap``)."""
  tracers = []
  _identity.digest(solver, tracers=tracers)
  return bool(tracers)


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


def _traced_run(solver, state, data, num_steps, on_divergence, limits
                ) -> RunResult:
  """The run as one scan in the caller's trace (under ``jit``/``vmap``)."""
  health = _chunk.start_health(state)
  (state, health), (history, _, _) = _chunk.scan_steps(
      solver, state, data, health, 0, num_steps, num_steps, limits,
      stop_at_divergence=on_divergence == "raise", freeze_counters=False)
  divergence = None if limits is None else jnp.where(
      health.first_bad < 0, -1, health.first_bad + 1)
  return RunResult(state.x, state.y, state, history, [], math.nan, math.nan,
                   0, divergence)


def _divergence_report(new_state, infos, flags, magnitudes, health,
                       relative: int, limits):
  """``(variables, grown)`` of the bad step ``relative`` of a chunk."""
  first_info = jax.tree.map(lambda a: a[0], infos)
  names = _divergence.names(new_state, first_info)
  bad = ~jax.device_get(flags[relative])
  variables = list(dict.fromkeys(
      name for name, flag in zip(names, bad) if flag))
  growth_names = names[len(_divergence.finite_leaves(new_state,
                                                     first_info)):]
  scales = _divergence.leaf_scales(
      health.state_scales, health.info_scales,
      len(_divergence.info_growth_leaves(first_info)))
  bounds = jax.device_get(_divergence.bounds(scales, limits))
  values = jax.device_get(magnitudes[relative])
  grown = {}
  for name, value, bound in zip(growth_names, values, bounds):
    if math.isfinite(value) and value > bound:
      grown[name] = (float(value), float(bound))
  return variables, grown


def run(solver: BilevelSolver, x0: PyTree, y0: PyTree, data=None, *,
        num_steps: int, key: jax.Array | None = None,
        steps_per_chunk: int = 100, progress: bool = False,
        callback: Callable[[int, Any], Any] | None = None,
        state: Any = None, on_divergence: str = "raise",
        max_growth: float = _divergence.DEFAULT_MAX_GROWTH,
        max_magnitude: float | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1, max_checkpoints: int = 2,
        state_sharding: Any = None,
        on_nonfinite: str | None = None) -> RunResult:
  """Runs ``num_steps`` solver steps.

  Steps run in chunks of ``steps_per_chunk``, each one compiled ``lax.scan``
  (one compilation serves every chunk, the last one included, and a second
  call with the same solver and shapes compiles nothing). Between chunks, the
  host updates a progress bar and calls ``callback(step, state)``; neither is
  timed. Under ``jax.jit``/``jax.vmap`` (e.g. a vmap over seeds or over step
  sizes, the solver built inside the mapped function) the whole run is
  traced into the caller's program, without progress bar, callback or
  errors; checkpoints then go through host callbacks (see below).

  **Divergence.** Every step checks, inside the compiled chunk, that its new
  state and its diagnostics are finite and that the iterates (``x``, ``y``,
  ``y_penalized``) and the diagnostics stay below ``max_growth`` times their
  starting magnitude (at least 1) and below ``max_magnitude``
  (:mod:`bilevel._divergence`); the host reads the outcome once per chunk.
  With ``on_divergence="raise"`` (default) the state stops at the last good
  step and the run raises :class:`DivergenceError`, naming the first bad
  step, the bad variables (with their magnitudes and bounds for a blow-up)
  and the last good diagnostics. Under a JAX transformation nothing can be
  raised: the floating-point leaves of the state stop at their last good
  values (per member under ``vmap``; integer counters keep counting) and
  ``RunResult.divergence_step`` tells where (``-1``: nowhere), so one
  diverging member of a sweep does not stop the others.

  **Checkpoints.** With ``checkpoint_dir``, the full state (optimizer states,
  sampler positions and keys included), the history and the callback values
  (when JSON-serialisable) are written every ``checkpoint_every`` chunks and
  at the end, atomically (:mod:`bilevel.checkpoint`, with orbax). If the
  directory already holds a checkpoint of this run, the run resumes from its
  latest one and continues up to ``num_steps`` in total; the result is
  bit-identical to an uninterrupted run. "This run" means the same solver
  and hyperparameters, problem functions, data (contents included), initial
  values and key; a checkpoint of another run raises ``ValueError`` naming
  what differs. Under ``jax.vmap`` (a sweep over keys, initial values or
  hyperparameters, the solver built inside the mapped function) every
  member writes its own checkpoints in ``checkpoint_dir`` through host
  callbacks and resumes from them (:mod:`bilevel._sweep`); the directory is
  read when the run is traced.

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
    on_divergence: ``"raise"``, ``"warn"`` (a ``RuntimeWarning`` at the
      first bad step, and the run goes on) or ``"ignore"`` (no check, no
      cost).
    max_growth: the factor of its starting magnitude (at least 1) past which
      an iterate or a diagnostic counts as diverged; ``math.inf`` turns the
      growth check off (the non-finite check stays).
    max_magnitude: an absolute bound on the iterates and diagnostics
      (``None``: none).
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
    on_nonfinite: former name of ``on_divergence`` (deprecated).

  Returns:
    A :class:`RunResult`.

  Raises:
    DivergenceError: with ``on_divergence="raise"``, at the first step with
      a NaN, an infinity or a blow-up.

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
  if on_nonfinite is not None:
    warnings.warn("run(on_nonfinite=...) is now run(on_divergence=...): it "
                  "also covers finite blow-ups.", DeprecationWarning,
                  stacklevel=2)
    on_divergence = on_nonfinite
  if on_divergence not in ON_DIVERGENCE:
    raise ValueError(f"on_divergence must be one of {ON_DIVERGENCE}; got "
                     f"{on_divergence!r}.")
  limits = _divergence.check_limits(max_growth, max_magnitude)
  if on_divergence == "ignore":
    limits = None
  if callback is not None and not callable(callback):
    raise TypeError("callback must be a callable callback(step, state); got "
                    f"{type(callback).__name__}.")
  if state is None:
    state = solver.init(x0, y0, key=key, data=data)
  elif not _is_traced((state, data)):
    _check_state(solver, state, data)

  if _is_traced((state, data)) or (checkpoint_dir is not None and
                                    _holds_tracers(solver)):
    return _traced(solver, state, data, num_steps, on_divergence, limits,
                   checkpoint_dir, steps_per_chunk, checkpoint_every,
                   max_checkpoints, key)
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
    shardings = _chunk.StateShardings(tree)
  initial_state = state
  health = _chunk.start_health(state)

  done = 0
  chunks = []
  evaluations = []
  checkpointer = None
  if checkpoint_dir is not None:
    checkpointer = checkpoint_lib.RunCheckpointer(
        checkpoint_dir, state, data, max_to_keep=max_checkpoints,
        solver=solver, key=key)
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
      if restored.step:
        health = _chunk.resumed_health(
            initial_state, jax.tree.map(lambda a: a[0], restored.history),
            -1)

  length = min(steps_per_chunk, num_steps)
  seconds = 0.0
  compile_seconds = math.nan
  checkpoint_seconds = 0.0
  timed_steps = 0
  divergence_step = None
  num_chunks = 0
  bar = _progress_bar(num_steps, done, progress)
  compiled = _chunk.compiled_scan_steps
  try:
    while done < num_steps:
      active = min(length, num_steps - done)
      cache_size = compiled._cache_size()  # pylint: disable=protected-access
      start = time.perf_counter()
      (new_state, health), (infos, flags, magnitudes) = compiled(
          solver, state, data, health, done, num_steps, length=length,
          limits=limits, stop_at_divergence=on_divergence == "raise",
          state_shardings=shardings)
      if _is_traced(health.first_bad):
        # The solver closes over tracers (it was built inside jit/vmap, e.g.
        # from a traced step size): run the whole run in the caller's trace.
        if checkpointer is not None:
          checkpointer.close()
          checkpointer = None
        return _traced(solver, initial_state, data, num_steps, on_divergence,
                       limits, checkpoint_dir, steps_per_chunk,
                       checkpoint_every, max_checkpoints, key)
      jax.block_until_ready((new_state, infos))
      elapsed = time.perf_counter() - start
      if compiled._cache_size() > cache_size:  # pylint: disable=protected-access
        compile_seconds = elapsed
      else:
        seconds += elapsed
        timed_steps += active
      infos = infos if active == length else jax.tree.map(
          lambda a, n=active: a[:n], infos)
      health = _chunk.uncommitted(health)
      first_bad = int(health.first_bad)
      if first_bad >= done and divergence_step is None:
        relative = first_bad - done
        divergence_step = first_bad + 1
        variables, grown = _divergence_report(
            new_state, infos, flags, magnitudes, health, relative, limits)
        if relative > 0:
          last_info = _scalars(jax.tree.map(lambda a: a[relative - 1],
                                            infos))
        elif chunks:
          last_info = _scalars(jax.tree.map(lambda a: a[-1], chunks[-1]))
        else:
          last_info = None
        message = _divergence.message(divergence_step, num_steps, variables,
                                      grown, last_info, on_divergence)
        if on_divergence == "raise":
          chunks.append(jax.tree.map(lambda a: a[:relative + 1], infos))
          result = RunResult(
              new_state.x, new_state.y, new_state, _concatenate(chunks),
              evaluations, seconds if timed_steps else math.nan,
              compile_seconds, timed_steps, divergence_step,
              checkpoint_seconds)
          raise DivergenceError(message, step=divergence_step,
                                variables=variables, magnitudes=grown,
                                last_good_info=last_info, result=result)
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
                   timed_steps, divergence_step, checkpoint_seconds)


def _traced(solver, state, data, num_steps, on_divergence, limits,
            checkpoint_dir, steps_per_chunk, checkpoint_every,
            max_checkpoints, key) -> RunResult:
  """A run in the caller's trace, checkpointed through host callbacks."""
  if checkpoint_dir is None:
    return _traced_run(solver, state, data, num_steps, on_divergence, limits)
  state, health, history = _sweep.run(
      solver, state, data, num_steps=num_steps, key=key,
      directory=checkpoint_dir, steps_per_chunk=steps_per_chunk,
      checkpoint_every=checkpoint_every, max_checkpoints=max_checkpoints,
      limits=limits, stop_at_divergence=on_divergence == "raise")
  divergence = None if limits is None else jnp.where(
      health.first_bad < 0, -1, health.first_bad + 1)
  return RunResult(state.x, state.y, state, history, [], math.nan, math.nan,
                   0, divergence)


__all__ = ["DivergenceError", "RunResult", "run"]
