"""What every reproduction shares: timed runs at a budget, summaries, plots.

A run is a dict of curves sampled at chunk ends: ``calls`` (oracle calls
spent so far), ``seconds`` (wall time, compilation and evaluation
excluded) and ``values`` (the metric, e.g. test accuracy or the distance to
a known solution), each starting with the value at the initial point; plus
``num_steps``, ``diverged`` and ``val_loss`` (the mean minibatch upper loss
over the last tenth of the steps, infinite for a diverged run).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

import bilevel

AXES = (("calls", "oracle calls (Gf + Gg + HVP + JVP)"),
        ("seconds", "wall time (s, compilation excluded)"))


def declared_calls(solver) -> float:
  """Oracle calls a step declares: Gf + Gg + HVP + JVP."""
  calls = solver.oracle_calls
  return float(calls.upper_grads + calls.lower_grads + calls.hvps
               + calls.cross_products)


def timed_run(solver, instance, *, num_steps: int, key, num_points: int,
              metric: Callable, step_costs: Callable | None = None,
              initial_calls: float = 0.0,
              higher_is_better: bool = True,
              final: Callable | None = None) -> dict:
  """Runs ``solver`` for ``num_steps`` steps and records its curves.

  ``init`` is jitted, and it and one chunk are compiled before the timed
  run; the time of ``init`` (e.g. BO-REP's refinement) counts.

  Args:
    solver: a :class:`bilevel.BilevelSolver`.
    instance: a :class:`problems.Instance` (``x0``, ``y0``, ``data``).
    num_steps: steps of the run.
    key: PRNG key of ``init``.
    num_points: chunk ends at which ``metric`` is evaluated.
    metric: ``(x, y) -> float``.
    step_costs: ``(num_done, history) -> array`` of oracle calls per step;
      default: :func:`declared_calls` at every step.
    initial_calls: calls spent by ``init`` (e.g. a refinement).
    higher_is_better: for a diverged run, values after the start are
      replaced by the worse of themselves and the initial value.
    final: ``state -> float`` evaluated on the last state, stored as
      ``"final"`` (``inf`` for a diverged run).

  Returns:
    The run dict of the module docstring.
  """
  chunk = max(1, math.ceil(num_steps / num_points))
  value0 = float(metric(instance.x0, instance.y0))
  init = jax.jit(lambda x, y, k: solver.init(x, y, key=k,
                                             data=instance.data))
  kwargs = dict(steps_per_chunk=chunk, progress=False)
  try:
    bilevel.run(solver, None, None, instance.data, num_steps=chunk,
                state=init(instance.x0, instance.y0, key), **kwargs)
  except bilevel.DivergenceError:
    pass
  times, values, excluded = [], [], [0.0]

  def callback(step, state):
    now = time.perf_counter()
    value = float(metric(state.x, state.y))
    times.append(now - start - excluded[0])
    values.append(value)
    excluded[0] += time.perf_counter() - now
    return step

  diverged = False
  init_seconds = 0.0
  start = time.perf_counter()
  try:
    state = jax.block_until_ready(init(instance.x0, instance.y0, key))
    init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = bilevel.run(solver, None, None, instance.data,
                         num_steps=num_steps, callback=callback, state=state,
                         **kwargs)
  except bilevel.DivergenceError as error:
    diverged = True
    result = error.result
  steps = [step for step, _ in result.evaluations]
  # Chunk times: the gaps between callbacks, except the first one, which
  # also holds run()'s checks of the state; it is taken from
  # ``result.seconds`` (compiled chunks only) when that is available.
  gaps = np.diff([0.0] + times[:len(steps)])
  if len(gaps) and math.isfinite(result.seconds) and not diverged:
    gaps[0] = max(result.seconds - float(np.sum(gaps[1:])), 0.0)
  times = list(init_seconds + np.cumsum(gaps))
  history = result.history
  done = len(np.asarray(history.upper_loss))
  per_step = (np.full(done, declared_calls(solver)) if step_costs is None
              else step_costs(done, history))
  costs = np.cumsum(per_step) + initial_calls
  calls = [0.0] + [float(costs[min(s, done) - 1]) for s in steps]
  losses = np.asarray(history.upper_loss)
  tail = losses[-max(1, len(losses) // 10):]
  val_loss = float(np.mean(tail)) if not diverged else math.inf
  values = values[:len(steps)]
  if diverged:  # a diverged run is worth no more than not running
    worse = min if higher_is_better else max
    values = [worse(v, value0) if math.isfinite(v) else value0
              for v in values]
  run = {"calls": calls, "seconds": [0.0] + times[:len(steps)],
         "values": [value0] + values, "num_steps": num_steps,
         "diverged": diverged, "val_loss": val_loss}
  if final is not None:
    run["final"] = math.inf if diverged else float(final(result.state))
  return run


def value_at(curve_x, curve_y, cutoff):
  """Last recorded value at or before ``cutoff`` on a step curve."""
  index = np.searchsorted(np.asarray(curve_x), cutoff, side="right") - 1
  return curve_y[max(int(index), 0)]


def summarise(runs: dict, key: str = "values"):
  """Per solver: the final value at the budget and at the common time.

  The common time is the shortest time any run that did not diverge took
  to spend its budget.

  Returns:
    ``(cutoff_seconds, rows)`` with ``rows[name]`` holding the means and
    standard deviations over seeds, the mean seconds and the number of
    diverged runs.
  """
  finished = [run["seconds"][-1] for per_solver in runs.values()
              for run in per_solver if not run["diverged"]]
  cutoff = min(finished) if finished else max(
      run["seconds"][-1] for per_solver in runs.values() for run in per_solver)
  rows = {}
  for name, per_solver in runs.items():
    at_budget = [run[key][-1] for run in per_solver]
    at_time = [value_at(run["seconds"], run[key], cutoff)
               for run in per_solver]
    rows[name] = {
        "budget_mean": float(np.mean(at_budget)),
        "budget_std": float(np.std(at_budget)),
        "time_mean": float(np.mean(at_time)),
        "time_std": float(np.std(at_time)),
        "seconds": float(np.mean([run["seconds"][-1] for run in per_solver])),
        "diverged": int(sum(run["diverged"] for run in per_solver)),
    }
  return cutoff, rows


def draw(ax, runs: dict, axis: str, budget: float, cutoff: float, *,
         labels: dict, highlight=(), key: str = "values", log: bool = False):
  """Mean ± one std over seeds of ``key`` against ``axis`` on ``ax``.

  With ``log``, the mean and the band are those of the log10 of the values
  (for distances spanning decades), drawn on a log axis.
  """
  for name, per_solver in runs.items():
    end = budget if axis == "calls" else max(run["seconds"][-1]
                                             for run in per_solver)
    grid = np.linspace(0, end, 60)
    curves = np.array([[value_at(run[axis], run[key], g) for g in grid]
                       for run in per_solver], dtype=float)
    if log:
      curves = np.log10(np.maximum(curves, 1e-300))
    mean, std = curves.mean(0), curves.std(0)
    low, high = mean - std, mean + std
    if log:
      mean, low, high = 10 ** mean, 10 ** low, 10 ** high
    line, = ax.plot(grid, mean, label=labels[name],
                    lw=2.2 if name in highlight else 1.2)
    ax.fill_between(grid, low, high, alpha=0.2, color=line.get_color())
  if axis == "seconds":
    ax.axvline(cutoff, color="gray", ls=":", lw=1)
  if log:
    ax.set_yscale("log")


class Options(NamedTuple):
  """The command line shared by the reproductions (see :func:`options`)."""
  args: argparse.Namespace
  seeds: int
  tune: bool
  num_points: int
  out: pathlib.Path
  settings: list
  log: Callable[[str], None]
  began: float


def options(description: str, default_out: str, setting_names, argv=None,
            extra: Callable | None = None) -> Options:
  """Parses ``--quick --out --seeds --tune/--no-tune --settings``.

  Args:
    description: the ``--help`` text.
    default_out: default output folder.
    setting_names: the settings, all run by default.
    argv: the arguments (``None``: ``sys.argv``).
    extra: ``parser -> None`` adding a script's own arguments.

  Returns:
    :class:`Options`: one seed, 4 evaluation points and no tuning with
    ``--quick``, else 3 seeds, 15 points and tuning; the output folder is
    created; ``log`` prints with the time since the start.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true",
                      help="one seed, a small budget, no tuning (tests)")
  parser.add_argument("--out", default=default_out)
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--tune", dest="tune", action="store_true",
                      default=None)
  parser.add_argument("--no-tune", dest="tune", action="store_false")
  parser.add_argument("--settings", default=",".join(setting_names))
  if extra is not None:
    extra(parser)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  began = time.perf_counter()

  def log(message):
    print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

  return Options(args, args.seeds or (1 if args.quick else 3),
                 (not args.quick) if args.tune is None else args.tune,
                 4 if args.quick else 15, out, args.settings.split(","), log,
                 began)


def compare(names, instances, *, choose: Callable, run: Callable,
            log: Callable, label: str, key: str = "values"):
  """Every solver on every seed's instance, with its chosen step sizes.

  Args:
    names: solver names.
    instances: one instance per seed.
    choose: ``name -> (upper, inner)`` (tuned or default).
    run: ``(name, instance, upper, inner, key) -> run dict``.
    log: progress printer.
    label: the setting's name, for the log.
    key: the run dict's metric key.

  Returns:
    ``(runs, chosen)``: ``runs[name]`` the list of run dicts over seeds,
    ``chosen[name] = {"upper": ..., "inner": ...}``.
  """
  runs, chosen = {}, {}
  for name in names:
    upper, inner = choose(name)
    chosen[name] = {"upper": upper, "inner": inner}
    # Every configuration compiles anew; a long run of compilations can
    # exhaust LLVM's code memory, so drop the executables as we go.
    jax.clear_caches()
    runs[name] = []
    for seed, instance in enumerate(instances):
      result = run(name, instance, upper, inner, jax.random.key(seed + 1))
      runs[name].append(result)
      jax.clear_caches()
      log(f"{label} {name} seed {seed}: {result['num_steps']} steps, "
          f"{key} {result[key][-1]:.4g}, {result['seconds'][-1]:.2f} s"
          + (" (diverged)" if result["diverged"] else ""))
  return runs, chosen


UPPER_SCALES = (1 / 3, 1.0, 3.0)


def grid_search(base_upper: float, inners, criterion: Callable, log,
                label: str):
  """The (upper, inner) of lowest ``criterion(upper, inner)``.

  The grid: ``base_upper`` times 1/3, 1 and 3, times each of ``inners``;
  ties keep the first point.
  """
  best = None
  for scale in UPPER_SCALES:
    for inner in inners:
      upper = base_upper * scale
      value = criterion(upper, inner)
      log(f"  tune {label} upper={upper:.4g} inner={inner:g}: "
          f"criterion {value:.5g}")
      if best is None or value < best[0]:
        best = (value, upper, inner)
  return best[1], best[2]


def baseline(name: str, problem, upper: float, inner: float,
             num_inner: int, *, warm_start_linear: bool = True):
  """AID, SOBA or StocBiO as both reproductions run them (else ``None``).

  ``upper`` is the upper step, ``inner`` the lower step (also SOBA's
  linear-system step and StocBiO's Neumann step); ``num_inner`` counts the
  lower steps of AID and StocBiO, AID's CG iterations and StocBiO's Neumann
  terms.
  """
  solvers = bilevel.solvers
  if name == "aid":
    return solvers.aid(problem, upper_optimizer=upper, lower_optimizer=inner,
                       num_lower_steps=num_inner,
                       linear_solver=bilevel.linear_solve.cg(
                           maxiter=num_inner),
                       warm_start_linear=warm_start_linear)
  if name == "soba":
    return solvers.soba(problem, upper_optimizer=upper,
                        lower_optimizer=inner, linear_optimizer=inner)
  if name == "stocbio":
    return solvers.stocbio(problem, upper_optimizer=upper,
                           lower_optimizer=inner, num_lower_steps=num_inner,
                           neumann_step_size=inner,
                           num_neumann_terms=num_inner)
  return None


def summary_figure(blocks: dict, out: pathlib.Path, panel: Callable, *,
                   width: float = 4.0, height: float = 6.0) -> pathlib.Path:
  """One column per setting, curves against calls (top) and seconds.

  Args:
    blocks: the settings' summary blocks (each with a ``"title"``).
    out: output folder; the figure is ``out / "summary.png"``.
    panel: ``(ax, block, axis) -> y label``, drawing one panel.
    width: inches per column.
    height: inches in all.

  Returns:
    The path of the figure.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(2, len(blocks), squeeze=False,
                              figsize=(width * len(blocks), height))
  for column, block in enumerate(blocks.values()):
    for row, (axis, label) in enumerate(AXES):
      ax = axes[row, column]
      ax.set_ylabel(panel(ax, block, axis), fontsize=8)
      ax.set_xlabel(label, fontsize=8)
      ax.tick_params(labelsize=7)
      if row == 0:
        ax.set_title(block["title"], fontsize=9)
  axes[0, 0].legend(fontsize=7)
  figure.tight_layout()
  path = out / "summary.png"
  figure.savefig(path, dpi=80)
  plt.close(figure)
  return path


def save(opts: Options, results: dict, write_report: Callable,
         plot: Callable) -> None:
  """Writes ``results.json`` (the settings and the total seconds), then
  ``write_report(out, results, seconds)`` and ``plot(out, results)``."""
  seconds = time.perf_counter() - opts.began
  (opts.out / "results.json").write_text(json.dumps(
      {"settings": results, "seconds": seconds}, indent=1))
  write_report(opts.out, results, seconds)
  plot(opts.out, results)
  opts.log(f"wrote {opts.out}")


def step_and_oracle_ms(steps: Callable, oracles: Callable, arg, num_steps: int,
                       quick: bool) -> tuple[float, float]:
  """Milliseconds per step of two compiled loops of ``num_steps``, timed
  side by side: medians over 5 runs (1 with ``quick``), interleaved over 3
  rounds (1), after one call each that compiles."""
  def timed(fun):
    jax.block_until_ready(fun(arg))
    times = []
    for _ in range(1 if quick else 5):
      start = time.perf_counter()
      jax.block_until_ready(fun(arg))
      times.append(time.perf_counter() - start)
    return float(np.median(times)) / num_steps

  step_seconds, oracle_seconds = [], []
  for _ in range(1 if quick else 3):  # interleaved
    step_seconds.append(timed(steps))
    oracle_seconds.append(timed(oracles))
  return (1e3 * float(np.median(step_seconds)),
          1e3 * float(np.median(oracle_seconds)))
