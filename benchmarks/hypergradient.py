r"""Implicit hypergradients: ``bilevel`` against jaxopt, at equal accuracy.

On the full-batch logistic-regression hyperparameter problem in float64, both
libraries compute :math:`\nabla\Phi(x) = \nabla_x f - J H^{-1} \nabla_y f` at
the same point ``y = y*(x)`` (precomputed by Newton's method, outside the
timed functions), so only the hypergradient itself is timed:

* **ours**: ``bilevel.implicit_hypergradient`` with
  ``bilevel.linear_solve.cg(tol=TOL, maxiter=m)``;
* **jaxopt**: ``jax.grad`` of ``x -> f(x, root(x))`` where ``root`` is an
  identity "solver" returning the precomputed ``y*(x)``, decorated with
  ``jaxopt.implicit_diff.custom_root`` on the optimality condition
  ``grad_y g(x, y) = 0`` with
  ``solve=partial(jaxopt.linear_solve.solve_cg, tol=TOL, maxiter=m)`` (its
  defaults would be the normal-equation solver and ``tol=1e-5``).

Both run ``jax.scipy.sparse.linalg.cg`` with the same ``tol``, ``atol=0`` and
``maxiter``; they differ in how the products are formed (ours linearises
``grad_y g`` once for the HVPs and the final cross product; jaxopt linearises
it once with respect to ``y`` for the solve and once more with respect to
``(x, data)`` for the cross product).

For every ``maxiter`` the script prints the relative error of each estimate
against the dense reference (``instance.hypergradient(x)``) and the time per
call (jitted, compilation excluded, calls of ours and jaxopt's interleaved,
medians of repeats), then the time ratio ours/jaxopt at the smallest
``maxiter`` where both reach the error threshold (default ``1e-6``).

Run from the repository root::

    python benchmarks/hypergradient.py [--quick] [--repeats R]
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import pathlib
import statistics
import sys
import time
import warnings
from typing import Callable, NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=wrong-import-position

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=wrong-import-position

import bilevel  # pylint: disable=wrong-import-position

with warnings.catch_warnings():
  # "JAXopt is no longer maintained": it still is the reference to beat.
  warnings.simplefilter("ignore", DeprecationWarning)
  import jaxopt  # pylint: disable=wrong-import-position

#: Relative tolerance of both CG solves: tight, so that ``maxiter`` binds.
TOL = 1e-12
#: Error threshold defining "equal accuracy".
THRESHOLD = 1e-6
MAXITERS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
QUICK_MAXITERS = (2, 8, 32)


def ours(problem: bilevel.Problem, maxiter: int, tol: float = TOL
         ) -> Callable:
  """``fun(x, y, upper, lower) -> hypergradient`` with ``bilevel``."""
  solver = bilevel.linear_solve.cg(tol=tol, maxiter=maxiter)

  def hypergradient(x, y, upper, lower):
    return bilevel.implicit_hypergradient(problem, x, y, upper, lower,
                                          linear_solver=solver)
  return hypergradient


def theirs(problem: bilevel.Problem, maxiter: int, tol: float = TOL
           ) -> Callable:
  """The same with ``jaxopt.implicit_diff.custom_root``."""
  def optimality(y, x, lower):
    return jax.grad(problem.lower, argnums=1)(x, y, lower)

  solve = functools.partial(jaxopt.linear_solve.solve_cg, tol=tol,
                            maxiter=maxiter)

  @jaxopt.implicit_diff.custom_root(optimality, solve=solve)
  def lower_solution(y_init, x, lower):
    del x, lower  # y_init is already y*(x): the inner solve is not timed
    return y_init

  def hypergradient(x, y, upper, lower):
    return jax.grad(
        lambda x_: problem.upper(x_, lower_solution(y, x_, lower), upper))(x)
  return hypergradient


def relative_error(estimate, exact) -> float:
  return float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))


def _time_calls(fun, args, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fun(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


class Row(NamedTuple):
  maxiter: int
  ours_error: float
  theirs_error: float
  ours_ms: float
  theirs_ms: float
  ratio: float  # median over repeats of the paired ratio ours / jaxopt


def compare(instance, x, *, maxiters, repeats: int,
            min_seconds: float = 0.05) -> list[Row]:
  """Errors and interleaved timings of both hypergradients at each maxiter."""
  problem = instance.problem
  upper, lower = instance.data.upper, instance.data.lower
  y = instance.lower_solution(x)
  exact = instance.hypergradient(x)
  args = (x, y, upper, lower)
  rows = []
  for maxiter in maxiters:
    funs = [jax.jit(ours(problem, maxiter)).lower(*args).compile(),
            jax.jit(theirs(problem, maxiter)).lower(*args).compile()]
    errors = [relative_error(fun(*args), exact) for fun in funs]
    # Calls per timing so that one timing lasts about min_seconds.
    once = max(_time_calls(funs[0], args, 1), 1e-6)
    calls = max(1, int(min_seconds / once))
    times = [[], []]
    for repeat in range(repeats):
      order = (1, 0) if repeat % 2 else (0, 1)
      for which in order:
        times[which].append(_time_calls(funs[which], args, calls))
    ratio = statistics.median(a / b for a, b in zip(*times))
    rows.append(Row(maxiter, *errors, 1e3 * statistics.median(times[0]),
                    1e3 * statistics.median(times[1]), ratio))
  return rows


def format_rows(rows: list[Row]) -> str:
  header = (f"{'maxiter':>7} {'ours rel.err':>12} {'jaxopt rel.err':>14} "
            f"{'ours ms':>9} {'jaxopt ms':>9} {'ours/jaxopt':>11}")
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r.maxiter:>7} {r.ours_error:>12.2e} "
                 f"{r.theirs_error:>14.2e} {r.ours_ms:>9.3f} "
                 f"{r.theirs_ms:>9.3f} {r.ratio:>11.2f}")
  return "\n".join(lines)


def summary(rows: list[Row], threshold: float) -> str:
  for r in rows:
    if r.ours_error <= threshold and r.theirs_error <= threshold:
      return (f"ratio ours/jaxopt = {r.ratio:.2f} at maxiter={r.maxiter}, "
              f"the smallest where both reach rel. error <= {threshold:g} "
              f"(ours {r.ours_error:.1e}, jaxopt {r.theirs_error:.1e}; "
              f"{r.ours_ms:.3f} ms vs {r.theirs_ms:.3f} ms)")
  ours_first = next((r.maxiter for r in rows if r.ours_error <= threshold),
                    None)
  theirs_first = next((r.maxiter for r in rows
                       if r.theirs_error <= threshold), None)
  return (f"ratio ours/jaxopt: n/a, no maxiter reached rel. error <= "
          f"{threshold:g} for both (first maxiter: ours {ours_first}, jaxopt "
          f"{theirs_first}); median paired ratio over all rows "
          f"{statistics.median(r.ratio for r in rows):.2f}")


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def logistic_regularization(*args, **kwargs):
  """``problems.logistic_regularization`` (imported from its module)."""
  # pylint: disable-next=import-outside-toplevel
  from problems.logistic import logistic_regularization as build
  return build(*args, **kwargs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small data, three maxiter values (test suite)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved repeats per maxiter (default 7)")
  parser.add_argument("--threshold", type=float, default=THRESHOLD,
                      help="relative error defining equal accuracy")
  parser.add_argument("--datasets", default=None,
                      help="comma-separated subset of ijcnn1_like,"
                      "breast_cancer (default both; --quick: breast_cancer)")
  parser.add_argument("--maxiters", default=None,
                      help="comma-separated CG iteration budgets")
  args = parser.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 7)
  datasets = (args.datasets.split(",") if args.datasets else
              ["breast_cancer"] if args.quick else
              ["ijcnn1_like", "breast_cancer"])
  maxiters = (tuple(int(m) for m in args.maxiters.split(","))
              if args.maxiters else QUICK_MAXITERS if args.quick
              else MAXITERS)

  print(f"jax {jax.__version__}, jaxopt {_version('jaxopt')}, device "
        f"{jax.devices()[0]} ({jax.default_backend()}), dtype "
        f"{jnp.zeros(()).dtype}")
  print(f"CG tol={TOL:g}, atol=0 for both; {repeats} interleaved repeats; "
        "times per call (medians), ratio = median of paired ratios")
  for dataset in datasets:
    start = time.perf_counter()
    kwargs = {}
    if args.quick and dataset == "ijcnn1_like":
      kwargs = dict(num_train=2000, num_val=1000)
    instance = logistic_regularization(jax.random.key(0), dataset=dataset,
                                       **kwargs)
    # Penalties exp(x) between e^-3 and 1: a moderately ill-conditioned
    # lower level (the reference Newton solve is exact to ~1e-12 there).
    x = jax.random.uniform(jax.random.key(1), instance.x0.shape,
                           instance.x0.dtype, -3.0, 0.0)
    y = instance.lower_solution(x)
    residual = jnp.linalg.norm(jax.grad(instance.problem.lower, 1)(
        x, y, instance.data.lower))
    hessian = jax.hessian(instance.problem.lower, 1)(x, y,
                                                     instance.data.lower)
    eigenvalues = jnp.linalg.eigvalsh(hessian)
    print(f"\n== logistic_regularization(dataset={dataset!r}), full batch: "
          f"{instance.data.upper['features'].shape[0]} upper and "
          f"{instance.data.lower['features'].shape[0]} lower rows, "
          f"dim {x.shape[0]}; x ~ U(-3, 0); |grad_y g(x, y*)| = "
          f"{float(residual):.1e}; cond(H) = "
          f"{float(eigenvalues[-1] / eigenvalues[0]):.1f}")
    rows = compare(instance, x, maxiters=maxiters, repeats=repeats)
    print(format_rows(rows))
    print(summary(rows, args.threshold))
    print(f"({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
