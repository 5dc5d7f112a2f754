"""The main job: every solver with its defaults on the problem suite.

Writes ``report.md`` and one convergence plot per problem (PNG) to ``--out``.
Run it as ``make demo`` or ``python -m problems.demo --out results/demo``;
``--quick`` shrinks every run (the test suite uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import problems

SOLVERS = ("aid", "itd", "stocbio", "soba", "amigo")


@dataclasses.dataclass
class Case:
  """A problem of the suite and how long each solver runs on it."""
  label: str
  build: Callable[[], problems.Instance]
  num_steps: int
  check_estimators: bool = True  # add a row to the estimator table


def suite(quick: bool) -> list[Case]:
  key = jax.random.key(0)
  scale = 0.1 if quick else 1.0

  def steps(n):
    return max(20, int(n * scale))

  return [
      Case("quadratic (deterministic, d_x=50, d_y=40, kappa=10)",
           lambda: problems.quadratic(key, dim_x=50, dim_y=40,
                                      condition_number=10.0), steps(500)),
      Case("quadratic (minibatches of 64 from 4096 samples)",
           lambda: problems.quadratic(key, dim_x=50, dim_y=40,
                                      condition_number=10.0,
                                      num_samples=4096, batch_size=64),
           steps(2000), check_estimators=False),
      Case("ridge (diabetes, full batch)", lambda: problems.ridge(),
           steps(1000)),
      Case("logistic, one penalty per feature (breast_cancer, full batch)",
           lambda: problems.logistic_regularization(
               key, dataset="breast_cancer"), steps(1000)),
      Case("logistic, one penalty per feature (ijcnn1-like 49,990 x 22, "
           "batches of 256)",
           lambda: problems.logistic_regularization(
               key, dataset="ijcnn1_like", batch_size=256,
               num_train=5000 if quick else None), steps(2000)),
      Case("data hyper-cleaning (digits, 50% corrupted, batches of 128)",
           lambda: problems.hyper_cleaning(key, batch_size=128), steps(2000)),
  ]


def _relative(a, b):
  flat_a = jnp.concatenate([jnp.ravel(l) for l in jax.tree.leaves(a)])
  flat_b = jnp.concatenate([jnp.ravel(l) for l in jax.tree.leaves(b)])
  return float(jnp.linalg.norm(flat_a - flat_b) / jnp.linalg.norm(flat_b))


def _norm(tree):
  return float(optax.tree.norm(tree))


def estimator_errors(instance: problems.Instance) -> dict[str, float]:
  """Relative error of each hypergradient estimator at (x0, y*(x0))."""
  x = instance.x0
  y = instance.lower_solution(x)
  exact = instance.hypergradient(x)
  cg = bilevel.linear_solve.cg
  neumann = bilevel.linear_solve.neumann
  estimators = {
      "AID, CG 10 iterations": lambda: bilevel.implicit_hypergradient(
          instance.problem, x, y, *_full(instance),
          linear_solver=cg(tol=0.0, maxiter=10)),
      "AID, CG 100 iterations": lambda: bilevel.implicit_hypergradient(
          instance.problem, x, y, *_full(instance),
          linear_solver=cg(tol=1e-14, maxiter=100)),
      "AID, Neumann 10 terms (step 0.5)": lambda: bilevel.implicit_hypergradient(
          instance.problem, x, y, *_full(instance),
          linear_solver=neumann(step_size=0.5, num_terms=10)),
      "AID, Neumann 100 terms (step 0.5)":
          lambda: bilevel.implicit_hypergradient(
              instance.problem, x, y, *_full(instance),
              linear_solver=neumann(step_size=0.5, num_terms=100)),
      "ITD, 20 steps of 0.5 from y*(x0)": lambda: bilevel.unrolled_hypergradient(
          instance.problem, x, y, *_full(instance), lower_optimizer=0.5,
          num_steps=20),
      "ITD, 200 steps of 0.5 from y*(x0)":
          lambda: bilevel.unrolled_hypergradient(
              instance.problem, x, y, *_full(instance), lower_optimizer=0.5,
              num_steps=200),
  }
  return {name: _relative(jax.jit(fn)(), exact)
          for name, fn in estimators.items()}


def _full(instance):
  if instance.data is None:
    return None, None
  return instance.data.upper, instance.data.lower


def final_estimate_error(name: str, instance: problems.Instance,
                         result: bilevel.RunResult) -> float:
  """Error of the solver's hypergradient estimate at its final iterates.

  One more step from the final state (its warm-started ``y`` and linear-system
  variable, fresh minibatches) with the upper optimizer replaced by
  ``optax.scale(1.0)``, whose update is the estimate itself. The error
  against the exact full-data hypergradient at ``x_T`` is divided by
  ``|grad Phi(x_0)|``: near a stationary point ``grad Phi(x_T)`` vanishes and
  an error relative to it says nothing. A biased estimator that has
  converged (its own estimate is zero) shows its bias, ``|grad Phi(x_T)|``.
  """
  probe = getattr(bilevel.solvers, name)(instance.problem,
                                         upper_optimizer=optax.scale(1.0))
  state = result.state._replace(
      upper_opt_state=optax.scale(1.0).init(result.x))
  stepped, _ = jax.jit(probe.step)(state, instance.data)
  estimate = jax.tree.map(jnp.subtract, stepped.x, result.x)
  error = optax.tree.sub(estimate, instance.hypergradient(result.x))
  return _norm(error) / _norm(instance.hypergradient(instance.x0))


def upper_on_full_data(instance: problems.Instance):
  """``(x, y) -> f(x, y)`` on the full upper data, compiled once per problem."""
  upper_data = None if instance.data is None else instance.data.upper
  return jax.jit(lambda x, y: instance.problem.upper(x, y, upper_data))


def run_case(case: Case, instance: problems.Instance, name: str,
             upper_full: Callable):
  """Runs one solver with its defaults; returns its report row and curve.

  The curve, recorded between compiled chunks (outside the timings), is the
  upper objective at the solver's own iterates on the full upper data,
  ``f(x_t, y_t)``, and the held-out metrics; the exact hyper-objective
  (which may need a Newton solve) is evaluated once, at the end.
  """
  solver = getattr(bilevel.solvers, name)(instance.problem)
  steps_per_chunk = max(1, math.ceil(case.num_steps / 10))
  curve = []

  def callback(step, state):
    point = {"step": step, "upper": float(upper_full(state.x, state.y))}
    if instance.evaluate is not None:
      point.update({k: float(v) for k, v in
                    instance.evaluate(state.x, state.y).items()})
    curve.append(point)

  callback(0, solver.init(instance.x0, instance.y0, key=jax.random.key(1),
                          data=instance.data))
  result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=case.num_steps, key=jax.random.key(1),
                       steps_per_chunk=steps_per_chunk, callback=callback)
  finite = all(bool(jnp.all(jnp.isfinite(leaf)))
               for leaf in jax.tree.leaves((result.x, result.y)))
  row = {
      "solver": name,
      "oracle calls / step": str(solver.oracle_calls),
      "steps/s": result.steps_per_second,
      "f(x_T, y_T)": curve[-1]["upper"],
  }
  if not finite:
    row["diverged"] = "yes"
  if instance.value is not None and finite:
    row["Phi(x_T)"] = float(instance.value(result.x))
  if instance.hypergradient is not None and finite:
    row["‖∇Φ(x_T)‖ / ‖∇Φ(x_0)‖"] = (
        _norm(instance.hypergradient(result.x))
        / _norm(instance.hypergradient(instance.x0)))
    row["‖ĥ(x_T) − ∇Φ(x_T)‖ / ‖∇Φ(x_0)‖"] = final_estimate_error(
        name, instance, result)
  if instance.x_star is not None:
    row["‖x_T − x*‖ / ‖x*‖"] = _relative(result.x, instance.x_star)
  if instance.evaluate is not None:
    row.update({k: float(v) for k, v in
                instance.evaluate(result.x, result.y).items()})
  row["_calls_per_step"] = sum(solver.oracle_calls)
  return row, curve


def _format(value):
  if isinstance(value, float):
    if math.isnan(value):
      return "n/a"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
  return str(value)


def plot(case_label: str, curves: dict, path: pathlib.Path, calls: dict):
  """f(x_t, y_t) and the first held-out metric against steps and calls."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  first = next(iter(curves.values()))[0]
  panels = ["upper"] + [k for k in first if k not in ("step", "upper")][:1]
  fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.4 * len(panels)),
                           squeeze=False)
  for row, key in enumerate(panels):
    for name, curve in curves.items():
      steps = np.array([p["step"] for p in curve])
      values = np.array([p[key] for p in curve])
      axes[row, 0].plot(steps, values, marker=".", label=name)
      axes[row, 1].plot(steps * calls[name], values, marker=".", label=name)
    for ax, xlabel in ((axes[row, 0], "step"),
                       (axes[row, 1], "oracle calls (all kinds)")):
      ax.set_xlabel(xlabel)
      ax.set_ylabel("f(x_t, y_t), full upper data" if key == "upper"
                    else key)
      ax.legend(fontsize=8)
  fig.suptitle(case_label, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="results/demo")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", nargs="*", default=None,
                      help="run only the problems whose label contains one "
                      "of these words")
  parser.add_argument("--float32", action="store_true",
                      help="run in float32 (default float64)")
  args = parser.parse_args(argv)
  if not args.float32:
    jax.config.update("jax_enable_x64", True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cases = suite(args.quick)
  if args.only:
    cases = [c for c in cases if any(w in c.label for w in args.only)]
  started = time.perf_counter()
  lines = ["# bilevel demo: every solver, default hyperparameters, the "
           "problem suite", "",
           f"jax {jax.__version__} on {jax.devices()[0].platform}, "
           f"{'float32' if args.float32 else 'float64'}"
           f"{', quick mode' if args.quick else ''}. Steps per second "
           "exclude compilation. f(x_T, y_T) is the upper objective at the "
           "solver's final iterates on the full upper data; Phi(x_T) = "
           "f(x_T, y*(x_T)) is the exact hyper-objective (closed form or a "
           "float64 Newton solve of the lower level), and grad Phi its exact "
           "gradient. The hypergradient error at x_T is that of the estimate "
           "the solver would use at its final iterates (one more step, on "
           "fresh minibatches for stochastic problems) against the exact "
           "full-data hypergradient at x_T, divided by |grad Phi(x_0)|. "
           "Oracle calls: Gf/Gg gradients of f/g, HVP and JVP "
           "second-order products.", ""]
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(cases) * len(SOLVERS), unit="run")
  except ImportError:  # pragma: no cover
    bar = None
  estimator_lines = []
  for index, case in enumerate(cases):
    instance = case.build()
    rows, curves, calls = [], {}, {}
    upper_full = upper_on_full_data(instance)
    for name in SOLVERS:
      if bar is not None:
        bar.set_description(f"{instance.name}: {name}")
      row, curve = run_case(case, instance, name, upper_full)
      rows.append(row)
      curves[name] = curve
      calls[name] = row.pop("_calls_per_step")
      if bar is not None:
        bar.update(1)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines += [f"## {case.label}", "",
              f"{case.num_steps} steps per solver. Plot: "
              f"`{instance.name}_{index}.png`.", "",
              "| " + " | ".join(columns) + " |",
              "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, math.nan))
                                for c in columns) + " |" for row in rows]
    lines.append("")
    plot(case.label, curves, out / f"{instance.name}_{index}.png", calls)
    if instance.hypergradient is not None and case.check_estimators:
      errors = estimator_errors(instance)
      estimator_lines += [f"| {instance.name} | " + " | ".join(
          f"{e:.1e}" for e in errors.values()) + " |"]
      estimator_header = list(errors)
  if bar is not None:
    bar.close()
  lines += ["## Hypergradient estimators at (x0, y*(x0)) against the exact "
            "hypergradient", "", "Relative error; full data.", "",
            "| problem | " + " | ".join(estimator_header) + " |",
            "|" + "---|" * (len(estimator_header) + 1)] + estimator_lines
  lines += ["", f"Total time: {time.perf_counter() - started:.0f} s."]
  (out / "report.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"\nWrote {out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
  main()
