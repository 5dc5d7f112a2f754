"""BO-REP against MA-SOBA, StocBiO, TTSA, SOBA and AID on recurrent networks.

A small, offline version of the experiments of Hao, Gong & Liu (ICLR 2024):
data hyper-cleaning, hyperparameter optimisation and hyper-representation
with an Elman network (or an LSTM, ``--cell lstm``) reading scikit-learn's
digits row by row (``problems/rnn.py``). Each solver runs for the same budget
of oracle calls, several seeds; test accuracy is recorded at every chunk end
together with the oracle calls and the wall time spent so far.

Oracle calls count one per stochastic gradient of ``f`` or ``g``, per
Hessian-vector product and per cross (Jacobian-vector) product, from the work
each step does:

* BO-REP: ``1 Gf + 1 HVP + 1 JVP`` per step, plus ``N Gg`` at the steps whose
  ``lower_updated`` flag is set, plus ``T0 Gg`` of the refinement at the
  start;
* TTSA: its declared count with the ``Q - 1`` Hessian-vector products
  replaced by their mean ``(Q - 1) / 2`` (the truncation is uniform on
  ``0..Q-1``);
* the others: their declared counts (AID's conjugate gradient is counted at
  its ``maxiter``, even when it stops early).

Wall time excludes compilation (``init``, jitted here, and one chunk run
before the timed run) and the evaluation callbacks; it includes ``init``
(BO-REP's refinement). "Equal time" reads every solver's accuracy at
the same cutoff, the shortest total time any solver (run that did not
diverge) needed for the oracle budget in that setting.

Tuning (``--tune``, on by default except with ``--quick``): every solver gets
the same grid, three upper step sizes (a base value times 1/3, 1, 3) times two
lower/linear step sizes, run once on seed 0 at the full budget; the
configuration with the lowest validation loss (mean upper loss over the last
tenth of the steps, a diverged run counts as infinite) is kept. Test accuracy
plays no part in the choice. Without tuning the middle of the grid and the
larger lower step are used.

Reference: each setting also runs SOBA's lower level alone with ``x``
frozen at ``x0`` for the same budget (no cleaning, the initial L2
coefficient, the random encoder); its accuracy is printed under the table.

Writes ``results.md``, ``results.json`` and two PNG figures per setting to
``--out`` (default ``results/paper_repro_borep``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np
import optax

import bilevel
import problems
from paper_repro import _common as common

SOLVERS = ("borep", "ma_soba", "stocbio", "ttsa", "soba", "aid")
LABELS = {"borep": "BO-REP", "ma_soba": "MA-SOBA", "stocbio": "StocBiO",
          "ttsa": "TTSA", "soba": "SOBA", "aid": "AID"}
NUM_INNER = 5  # StocBiO/AID lower steps, Neumann terms, CG iterations, N
REFINE = 50  # BO-REP's refinement length T0


@dataclasses.dataclass
class Setting:
  """One experiment: how to build it and the base step sizes of its grid.

  Attributes:
    name: short identifier.
    title: human-readable title.
    build: ``(key, cell) -> Instance``.
    upper: base upper step of the unnormalised methods.
    upper_borep: base length of BO-REP's normalised upper step.
    inner: the lower/linear step sizes of the grid (first: the default).
  """
  name: str
  title: str
  build: Callable
  upper: float
  upper_borep: float
  inner: tuple[float, float]


SETTINGS = (
    Setting("hyper_cleaning", "data hyper-cleaning (30% noisy labels)",
            lambda key, cell: problems.rnn_hyper_cleaning(
                key, cell=cell, num_train=500), 5.0, 0.3, (0.5, 0.1)),
    Setting("hyperparameter", "hyperparameter optimisation (L2 coefficient)",
            lambda key, cell: problems.rnn_hyperparameter(key, cell=cell),
            3.0, 0.01, (0.5, 0.1)),
    Setting("hyper_representation", "hyper-representation (5-way 5-shot)",
            lambda key, cell: problems.rnn_hyper_representation(
                key, cell=cell), 1.0, 0.1, (4.0, 1.0)),
)


def make_solver(name: str, problem, upper: float, inner: float):
  """The solver ``name`` with upper step ``upper`` and lower step ``inner``."""
  solvers = bilevel.solvers
  if name == "borep":
    return solvers.borep(problem, upper_step_size=upper, momentum=0.9,
                         lower_optimizer=inner, linear_optimizer=inner,
                         period=2, num_lower_steps=NUM_INNER,
                         num_refine_steps=REFINE)
  if name == "ma_soba":
    return solvers.ma_soba(problem, upper_step_size=upper, momentum=0.9,
                           lower_optimizer=inner, linear_optimizer=inner,
                           linear_radius=None)
  if name == "frozen":  # the reference: SOBA's lower level, x kept at x0
    return solvers.soba(problem, upper_optimizer=optax.set_to_zero(),
                        lower_optimizer=inner, linear_optimizer=inner)
  if name == "ttsa":
    # The two time scales of Hong et al.: t^(-3/5) and t^(-2/5), slowed down
    # so that they start to decay after about a hundred steps.
    return solvers.ttsa(
        problem, upper_optimizer=lambda t: upper * (1 + t / 100) ** -0.6,
        lower_optimizer=lambda t: inner * (1 + t / 100) ** -0.4,
        neumann_step_size=inner, num_neumann_terms=NUM_INNER)
  # AID's CG is cold-started: warm-started, the linear variable grows along
  # the negative curvature of the (nonconvex) RNN lower level from solve to
  # solve, and AID overflowed at every grid point of hyper-cleaning and of
  # the L2 setting (see README.md).
  solver = common.baseline(name, problem, upper, inner, NUM_INNER,
                           warm_start_linear=False)
  if solver is not None:
    return solver
  raise ValueError(f"unknown solver {name!r}")


def step_costs(name: str, solver, num_steps: int, history) -> np.ndarray:
  """Oracle calls spent by each of ``num_steps`` steps (see module doc)."""
  calls = solver.oracle_calls
  declared = (calls.upper_grads + calls.lower_grads + calls.hvps
              + calls.cross_products)
  if name == "borep":
    updated = np.asarray(history.lower_updated, dtype=float)
    return (calls.upper_grads + calls.hvps + calls.cross_products
            + calls.lower_grads * updated)
  if name == "ttsa":
    return np.full(num_steps, declared - calls.hvps + calls.hvps / 2)
  return np.full(num_steps, float(declared))


def mean_step_cost(name: str, solver) -> float:
  """Oracle calls of an average step, to size a run to a budget."""
  calls = solver.oracle_calls
  declared = (calls.upper_grads + calls.lower_grads + calls.hvps
              + calls.cross_products)
  if name == "borep":
    period = 2
    return declared - calls.lower_grads + calls.lower_grads / period
  if name == "ttsa":
    return declared - calls.hvps / 2
  return float(declared)


def run_once(name, instance, upper, inner, budget, key, *, num_points):
  """One run at a budget of oracle calls (see ``paper_repro._common``).

  Returns:
    A run dict whose metric is ``accuracy`` (test accuracy).
  """
  solver = make_solver(name, instance.problem, upper, inner)
  initial = REFINE if name == "borep" else 0
  num_steps = max(1, int((budget - initial) / mean_step_cost(name, solver)))
  run = common.timed_run(
      solver, instance, num_steps=num_steps, key=key, num_points=num_points,
      metric=lambda x, y: instance.evaluate(x, y)["test_accuracy"],
      step_costs=lambda done, history: step_costs(name, solver, done,
                                                  history),
      initial_calls=initial)
  run["accuracy"] = run.pop("values")
  return run


def tune(setting, name, instance, budget, key, log):
  """The grid point of lowest final validation loss (seed 0)."""
  base = setting.upper_borep if name == "borep" else setting.upper
  return common.grid_search(
      base, setting.inner,
      lambda upper, inner: run_once(name, instance, upper, inner, budget,
                                    key, num_points=2)["val_loss"],
      log, f"{setting.name} {name}")


def draw(ax, runs, axis, budget, cutoff):
  """Mean test accuracy ± one std over seeds against ``axis`` on ``ax``."""
  common.draw(ax, runs, axis, budget, cutoff, labels=LABELS,
              highlight=("borep",), key="accuracy")
  ax.set_ylim(0, 1)


def plot(setting, runs, budget, cutoff, out):
  """Test accuracy against oracle calls and against seconds (two PNGs)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for axis, label in common.AXES:
    figure, ax = plt.subplots(figsize=(6, 4))
    draw(ax, runs, axis, budget, cutoff)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.set_title(setting.title, fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = out / f"{setting.name}_vs_{axis}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    paths.append(path)
  return paths


def plot_summary(summary, out):
  """Every setting in one small figure (``summary.png``)."""

  def panel(ax, block, axis):
    draw(ax, block["runs"], axis, summary["budget"], block["cutoff_seconds"])
    return "test accuracy"

  return common.summary_figure(summary["settings"], out, panel)


def main(argv=None) -> dict:
  """Runs the comparison; returns the summary written to ``results.json``."""

  def extra(parser):
    parser.add_argument("--budget", type=float, default=None,
                        help="oracle calls per run (default 6000; quick 600)")
    parser.add_argument("--cell", default="elman", choices=("elman", "lstm"))

  opts = common.options(__doc__.splitlines()[0], "results/paper_repro_borep",
                        [s.name for s in SETTINGS], argv, extra)
  cell = opts.args.cell
  budget = opts.args.budget or (600.0 if opts.args.quick else 6000.0)
  summary = {"budget": budget, "seeds": opts.seeds, "cell": cell,
             "tuned": opts.tune, "settings": {}}
  for setting in SETTINGS:
    if setting.name not in opts.settings:
      continue
    instances = [setting.build(jax.random.key(seed), cell)
                 for seed in range(opts.seeds)]

    def choose(name, setting=setting, instances=instances):
      if opts.tune:
        return tune(setting, name, instances[0], budget,
                    jax.random.key(1000), opts.log)
      upper = setting.upper_borep if name == "borep" else setting.upper
      return upper, setting.inner[0]

    def run(name, instance, upper, inner, key):
      return run_once(name, instance, upper, inner, budget, key,
                      num_points=opts.num_points)

    runs, chosen = common.compare(SOLVERS, instances, choose=choose, run=run,
                                  log=opts.log, label=setting.name,
                                  key="accuracy")
    # What the lower level alone reaches with x frozen at x0 (no cleaning,
    # the initial L2 coefficient, the random encoder), for the same budget.
    reference = [run_once("frozen", instance, 0.0, chosen["soba"]["inner"],
                          budget, jax.random.key(seed + 1),
                          num_points=1)["accuracy"][-1]
                 for seed, instance in enumerate(instances)]
    jax.clear_caches()
    cutoff, rows = common.summarise(runs, key="accuracy")
    figures = plot(setting, runs, budget, cutoff, opts.out)
    summary["settings"][setting.name] = {
        "title": setting.title, "cutoff_seconds": cutoff, "rows": rows,
        "chosen": chosen, "runs": runs, "frozen_x_accuracy": reference,
        "figures": [path.name for path in figures]}
    summary["total_seconds"] = time.perf_counter() - opts.began
    write_report(summary, opts.out,
                 argv if argv is not None else sys.argv[1:])
  summary["total_seconds"] = time.perf_counter() - opts.began
  write_report(summary, opts.out, argv if argv is not None else sys.argv[1:])
  plot_summary(summary, opts.out)
  opts.log(f"wrote {opts.out / 'results.md'}")
  return summary


def write_report(summary, out, argv):
  """``results.md`` (tables) and ``results.json`` (every curve)."""
  lines = [
      "# BO-REP against five baselines (small scale, digits)", "",
      f"Command: `python -m paper_repro.borep.run {' '.join(argv)}`  ",
      f"Date: {datetime.date.today().isoformat()}; machine: "
      f"{platform.machine()}, {platform.system()}, jax "
      f"{jax.__version__}, {jax.device_count()} {jax.default_backend()} "
      f"device(s); total {summary['total_seconds']:.0f} s.  ",
      f"Cell: {summary['cell']}; budget: {summary['budget']:.0f} oracle "
      f"calls per run; seeds: {summary['seeds']}; step sizes "
      + ("tuned on a grid (seed 0, validation loss)." if summary["tuned"]
         else "fixed (no tuning)."), "",
      "Test accuracy, mean ± std over seeds, at the end of the oracle budget "
      "and at the common wall-time cutoff (the shortest time any solver "
      "took to spend the budget in that setting). `s` is the mean time to "
      "spend the budget; `upper`/`inner` the step sizes used.", ""]
  for name, block in summary["settings"].items():
    lines += [f"## {block['title']}", "",
              f"Time cutoff: {block['cutoff_seconds']:.2f} s.", "",
              "| solver | acc. @ budget | acc. @ time cutoff | s | upper | "
              "inner | diverged |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for solver, row in block["rows"].items():
      chosen = block["chosen"][solver]
      lines.append(
          f"| {LABELS[solver]} | {row['budget_mean']:.3f} ± "
          f"{row['budget_std']:.3f} | {row['time_mean']:.3f} ± "
          f"{row['time_std']:.3f} | {row['seconds']:.2f} | "
          f"{chosen['upper']:.4g} | {chosen['inner']:g} | "
          f"{row['diverged']} |")
    frozen = block["frozen_x_accuracy"]
    lines += ["", f"Reference, x frozen at x0 (SOBA's lower level alone, same "
              f"budget): {np.mean(frozen):.3f} ± {np.std(frozen):.3f}.", ""]
    lines += [f"![{f}]({f})" for f in block["figures"]] + [""]
  (out / "results.md").write_text("\n".join(lines))
  (out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
