"""First-order penalty methods against implicit ones, at equal oracle budgets.

A small, offline version of the comparisons of Kwon et al. (ICML 2023:
F2SA; ICLR 2024: the penalty method): the double-loop penalty method, its
single-loop momentum-assisted variant, F2SA and BOME (Hessian-free) against
AID, SOBA and StocBiO (Hessian-vector products), on

* ``hyper_cleaning``: data hyper-cleaning of a multinomial logistic
  regression on scikit-learn's digits, half of the training labels
  corrupted (``problems.hyper_cleaning``, minibatches of 64); metric: test
  accuracy;
* ``nonunique``: a lower level with a whole affine set of minimisers
  (``problems.underdetermined_least_squares``), where the optimistic
  solution is known in closed form and the lower Hessian is singular;
  metric: relative distance to :math:`x^*`.

Oracle calls count one per gradient of ``f`` or ``g`` (a gradient with
respect to both ``x`` and ``y`` counts once), Hessian-vector product and
cross product, from each solver's declared ``oracle_calls``. Wall time
excludes compilation and evaluations.

Tuning (on by default, off with ``--quick``): the same grid for every solver,
three upper steps (a base times 1/3, 1, 3) times two lower steps, once on
seed 0 at the full budget; the kept point has the lowest validation loss
(hyper-cleaning: mean minibatch upper loss over the last tenth of the run)
or the lowest hyper-objective value :math:`\\psi(x)` at the end (nonunique,
computed in closed form; it does not use :math:`x^*`). A diverged run
counts as infinitely bad.

The penalty method's :math:`\\lambda` grows geometrically from 1 to 100 over
the first half of its outer steps (``penalty_schedule``); F2SA starts at
:math:`\\lambda_0 = 10` (its default) on its own :math:`k^{1/7}` schedule.

Writes ``results.md``, ``results.json`` and ``summary.png`` to ``--out``
(default ``results/paper_repro_penalty``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

import bilevel
import problems
from paper_repro import _common as common

SOLVERS = ("penalty", "penalty_momentum", "f2sa", "bome", "aid", "soba",
           "stocbio")
LABELS = {"penalty": "penalty", "penalty_momentum": "penalty (1 loop)",
          "f2sa": "F2SA", "bome": "BOME", "aid": "AID", "soba": "SOBA",
          "stocbio": "StocBiO"}
FIRST_ORDER = ("penalty", "penalty_momentum", "f2sa", "bome")
NUM_INNER = 5  # inner steps of the double loops, CG iterations, Neumann terms


@dataclasses.dataclass
class Setting:
  """One experiment.

  Attributes:
    name: short identifier.
    title: human-readable title.
    build: ``key -> Instance``.
    metric: ``(instance, x, y) -> float``.
    higher_is_better: direction of the metric.
    upper: base upper step of the grid.
    inner: the two lower steps of the grid (first: the default).
    budget: oracle calls per run (full, quick).
  """
  name: str
  title: str
  build: Callable
  metric: Callable
  higher_is_better: bool
  upper: float
  inner: tuple[float, float]
  budget: tuple[float, float]


def _accuracy(instance, x, y):
  return float(instance.evaluate(x, y)["test_accuracy"])


def _distance(instance, x, y):
  del y
  return float(jnp.linalg.norm(x - instance.x_star)
               / jnp.linalg.norm(instance.x_star))


SETTINGS = (
    Setting("hyper_cleaning", "data hyper-cleaning (digits, 50% noise)",
            lambda key: problems.hyper_cleaning(key, corruption=0.5,
                                                batch_size=64),
            _accuracy, True, 9.0, (0.5, 0.1), (12000.0, 1200.0)),
    Setting("nonunique", "non-unique lower solutions (least squares)",
            problems.underdetermined_least_squares, _distance, False, 0.1,
            (0.5, 0.1), (6000.0, 600.0)),
)


def make_solver(name: str, problem, upper: float, inner: float,
                num_steps: int):
  """The solver ``name`` with upper step ``upper`` and lower step ``inner``."""
  solvers = bilevel.solvers
  schedule = solvers.penalty_schedule(1.0, 100.0, max(1, num_steps // 2))
  if name == "penalty":
    return solvers.penalty(problem, upper_optimizer=upper,
                           lower_optimizer=inner, penalty=schedule,
                           num_inner_steps=NUM_INNER)
  if name == "penalty_momentum":
    return solvers.penalty_momentum(problem, upper_optimizer=upper,
                                    lower_optimizer=inner, penalty=schedule,
                                    momentum=0.1)
  if name == "f2sa":
    return solvers.f2sa(problem, upper_step_size=upper,
                        lower_step_size=inner, num_inner_steps=NUM_INNER)
  if name == "bome":
    return solvers.bome(problem, step_size=upper, lower_optimizer=inner,
                        num_lower_steps=NUM_INNER)
  solver = common.baseline(name, problem, upper, inner, NUM_INNER)
  if solver is not None:
    return solver
  raise ValueError(f"unknown solver {name!r}")


def run_once(setting, name, instance, upper, inner, budget, key, *,
             num_points):
  """One run at a budget of oracle calls, with its tuning ``criterion``."""
  probe = make_solver(name, instance.problem, upper, inner, 1)
  num_steps = max(1, int(budget / common.declared_calls(probe)))
  solver = make_solver(name, instance.problem, upper, inner, num_steps)
  nonunique = setting.name == "nonunique"
  run = common.timed_run(
      solver, instance, num_steps=num_steps, key=key, num_points=num_points,
      metric=lambda x, y: setting.metric(instance, x, y),
      higher_is_better=setting.higher_is_better,
      final=(lambda state: instance.value(state.x)) if nonunique else None)
  run["criterion"] = run.pop("final") if nonunique else run["val_loss"]
  if not math.isfinite(run["criterion"]):
    run["criterion"] = math.inf
  return run


def tune(setting, name, instance, budget, key, log):
  """The grid point of lowest criterion (seed 0)."""
  return common.grid_search(
      setting.upper, setting.inner,
      lambda upper, inner: run_once(setting, name, instance, upper, inner,
                                    budget, key, num_points=2)["criterion"],
      log, f"{setting.name} {name}")


def plot_summary(summary, out):
  """Both settings against calls and seconds (``summary.png``)."""

  def panel(ax, block, axis):
    higher = block["higher_is_better"]
    common.draw(ax, block["runs"], axis, block["budget"],
                block["cutoff_seconds"], labels=LABELS, highlight=FIRST_ORDER,
                log=not higher)
    if higher:
      ax.set_ylim(0, 1)
      return "test accuracy"
    ax.set_ylim(1e-3, 1e1)  # diverged runs would squash the others
    return "‖x − x*‖ / ‖x*‖"

  return common.summary_figure(summary["settings"], out, panel, width=5.0,
                               height=6.5)


def write_report(summary, out, argv):
  """``results.md`` (tables) and ``results.json`` (every curve)."""
  lines = [
      "# First-order penalty methods against implicit ones (small scale)",
      "",
      f"Command: `python -m paper_repro.penalty.run {' '.join(argv)}`  ",
      f"Date: {datetime.date.today().isoformat()}; machine: "
      f"{platform.machine()}, {platform.system()}, jax {jax.__version__}, "
      f"{jax.device_count()} {jax.default_backend()} device(s); total "
      f"{summary['total_seconds']:.0f} s.  ",
      f"Seeds: {summary['seeds']}; step sizes "
      + ("tuned on a grid (seed 0)." if summary["tuned"]
         else "fixed (no tuning)."), ""]
  for block in summary["settings"].values():
    metric = ("test accuracy" if block["higher_is_better"]
              else "relative distance to x*")
    lines += [f"## {block['title']}", "",
              f"Budget {block['budget']:.0f} oracle calls; {metric}, mean "
              f"± std over seeds; time cutoff "
              f"{block['cutoff_seconds']:.2f} s.", "",
              "| solver | @ budget | @ time cutoff | s | steps | upper | "
              "inner | diverged |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for solver, row in block["rows"].items():
      chosen = block["chosen"][solver]
      steps = block["runs"][solver][0]["num_steps"]
      lines.append(
          f"| {solver} | {row['budget_mean']:.4g} ± {row['budget_std']:.2g} "
          f"| {row['time_mean']:.4g} ± {row['time_std']:.2g} | "
          f"{row['seconds']:.2f} | {steps} | {chosen['upper']:.4g} | "
          f"{chosen['inner']:g} | {row['diverged']} |")
    lines.append("")
  lines += ["![summary](summary.png)", ""]
  (out / "results.md").write_text("\n".join(lines))
  (out / "results.json").write_text(json.dumps(summary, indent=1))


def main(argv=None) -> dict:
  """Runs the comparison; returns the summary written to ``results.json``."""
  opts = common.options(__doc__.splitlines()[0], "results/paper_repro_penalty",
                        [s.name for s in SETTINGS], argv)
  summary = {"seeds": opts.seeds, "tuned": opts.tune, "settings": {}}
  for setting in SETTINGS:
    if setting.name not in opts.settings:
      continue
    budget = setting.budget[1 if opts.args.quick else 0]
    instances = [setting.build(jax.random.key(seed))
                 for seed in range(opts.seeds)]

    def choose(name, setting=setting, budget=budget, instances=instances):
      if not opts.tune:
        return setting.upper, setting.inner[0]
      return tune(setting, name, instances[0], budget, jax.random.key(1000),
                  opts.log)

    def run(name, instance, upper, inner, key, setting=setting,
            budget=budget):
      return run_once(setting, name, instance, upper, inner, budget, key,
                      num_points=opts.num_points)

    runs, chosen = common.compare(SOLVERS, instances, choose=choose, run=run,
                                  log=opts.log, label=setting.name)
    cutoff, rows = common.summarise(runs)
    summary["settings"][setting.name] = {
        "title": setting.title, "budget": budget,
        "higher_is_better": setting.higher_is_better,
        "cutoff_seconds": cutoff, "rows": rows, "chosen": chosen,
        "runs": runs}
  summary["total_seconds"] = time.perf_counter() - opts.began
  write_report(summary, opts.out, argv if argv is not None else sys.argv[1:])
  plot_summary(summary, opts.out)
  opts.log(f"wrote {opts.out / 'results.md'}")
  return summary


if __name__ == "__main__":
  main()
