"""The run loop: chunks of steps compiled as one ``lax.scan`` each."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bilevel._base import BilevelSolver
from bilevel._validation import check_positive_int

PyTree = Any


class RunResult(NamedTuple):
  """What :func:`run` returns.

  Attributes:
    x: final upper variable.
    y: final lower variable.
    state: final solver state (resume with ``solver.step``).
    history: the ``info`` records of every step, stacked on a leading axis
      of length ``num_steps``.
    evaluations: ``(step, callback output)`` pairs, one per chunk end, when a
      callback was given (empty under a JAX transformation).
    seconds: wall time of the compiled chunks, compilation and callbacks
      excluded (``nan`` under a JAX transformation, or when every chunk
      compiled).
    compile_seconds: wall time of the chunk that compiled, if one did.
    num_timed_steps: steps covered by ``seconds``.
  """
  x: PyTree
  y: PyTree
  state: Any
  history: Any
  evaluations: list
  seconds: float
  compile_seconds: float
  num_timed_steps: int

  @property
  def steps_per_second(self) -> float:
    """Steps per second, compilation excluded."""
    return self.num_timed_steps / self.seconds if self.seconds > 0 else math.nan


def _scan_steps(solver: BilevelSolver, state, data, num_active, length: int):
  """``length`` steps of ``solver``; steps ``>= num_active`` leave ``state``.

  The padding keeps one compiled chunk for every chunk of a run, the last one
  included, and ``step`` is traced exactly once per compilation. A padded
  step is computed and discarded (a select, not a branch, so the step is not
  traced twice); only the last chunk of a run has padded steps.
  """
  def body(state_, index):
    stepped, info = solver.step(state_, data)
    keep = index < num_active
    state_ = jax.tree.map(lambda new, old: jnp.where(keep, new, old),
                          stepped, state_)
    return state_, info

  return jax.lax.scan(body, state, jnp.arange(length))


_compiled_scan_steps = jax.jit(_scan_steps, static_argnames=("solver",
                                                             "length"))


def _is_traced(tree: PyTree) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _progress_bar(total: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - tqdm is a dependency
    return None
  return tqdm(total=total, unit="step", leave=False)


def run(solver: BilevelSolver, x0: PyTree, y0: PyTree, data=None, *,
        num_steps: int, key: jax.Array | None = None,
        steps_per_chunk: int = 100, progress: bool = False,
        callback: Callable[[int, Any], Any] | None = None,
        state: Any = None) -> RunResult:
  """Runs ``num_steps`` solver steps.

  Steps run in chunks of ``steps_per_chunk``, each one compiled ``lax.scan``
  (one compilation serves every chunk, the last one included, and a second
  call with the same solver and shapes compiles nothing). Between chunks, the
  host updates a progress bar and calls ``callback(step, state)``; neither is
  timed. Under ``jax.jit``/``jax.vmap`` (e.g. a vmap over seeds or over step
  sizes, the solver built inside the mapped function) the whole run is one
  scan inside the caller's trace, without progress bar or callback.

  Args:
    solver: a :class:`bilevel.BilevelSolver`.
    x0: initial upper variable.
    y0: initial lower variable.
    data: a :class:`bilevel.Data`, or ``None`` for full-batch objectives.
    num_steps: number of steps.
    key: PRNG key for minibatch sampling (and stochastic solvers).
    steps_per_chunk: steps per compiled chunk.
    progress: show a progress bar.
    callback: ``callback(step, state) -> value`` called after each chunk;
      the values are returned in ``RunResult.evaluations``.
    state: resume from this solver state instead of calling ``solver.init``
      (``x0``/``y0``/``key`` are then ignored).

  Returns:
    A :class:`RunResult`.

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
  if state is None:
    state = solver.init(x0, y0, key=key, data=data)

  if _is_traced((state, data)):
    state, history = _scan_steps(solver, state, data, num_steps, num_steps)
    return RunResult(state.x, state.y, state, history, [], math.nan,
                     math.nan, 0)

  length = min(steps_per_chunk, num_steps)
  chunks = []
  evaluations = []
  seconds = 0.0
  compile_seconds = math.nan
  timed_steps = 0
  bar = _progress_bar(num_steps, progress)
  done = 0
  try:
    while done < num_steps:
      active = min(length, num_steps - done)
      cache_size = _compiled_scan_steps._cache_size()  # pylint: disable=protected-access
      start = time.perf_counter()
      state, infos = _compiled_scan_steps(solver, state, data, active,
                                          length=length)
      jax.block_until_ready((state, infos))
      elapsed = time.perf_counter() - start
      if _compiled_scan_steps._cache_size() > cache_size:  # pylint: disable=protected-access
        compile_seconds = elapsed
      else:
        seconds += elapsed
        timed_steps += active
      chunks.append(infos if active == length else
                    jax.tree.map(lambda a, n=active: a[:n], infos))
      done += active
      if bar is not None:
        bar.update(active)
      if callback is not None:
        evaluations.append((done, callback(done, state)))
  finally:
    if bar is not None:
      bar.close()
  history = chunks[0] if len(chunks) == 1 else jax.tree.map(
      lambda *parts: jnp.concatenate(parts), *chunks)
  return RunResult(state.x, state.y, state, history, evaluations,
                   seconds if timed_steps else math.nan, compile_seconds,
                   timed_steps)


__all__ = ["run", "RunResult"]

