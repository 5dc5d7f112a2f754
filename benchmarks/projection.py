"""The cost of LV-HBA's projection: ours inside the step against a CPU QP.

The official LV-HBA code projects (w, b, xi) onto the SVM margin polyhedron
with cvxpy/ECOS at every iteration, on the CPU, outside the autodiff graph.
This script times, side by side in one run, on the SVM problems of
``problems.constrained``:

* the projection alone: our exact projection (semismooth Newton on d + 1
  variables), our generic QP projection (``bilevel.projections.polyhedron``,
  BoxOSQP in JAX), both jitted, and a CPU QP per call (cvxpy with ECOS at the
  official tolerances and warm start, and with OSQP) when cvxpy is installed;
* one LV-HBA step (jitted) with each in-JAX projection, and the official
  design: the jitted step without projection followed by a cvxpy solve.

It prints times per call and their ratios to our exact projection.
cvxpy is not a dependency of the library: ``pip install cvxpy`` to time it.

``python benchmarks/projection.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from problems import constrained

jax.config.update("jax_enable_x64", True)

SETTINGS = dict(step_size=0.01, z_step_size=0.1, saddle_step_size=0.001,
                gamma1=1.0, gamma2=1.0, penalty_base=0.01, penalty_power=0.5,
                normalize_constraints=False)


def _per_call(fun, repeats):
  fun()  # compile / warm up
  start = time.perf_counter()
  for _ in range(repeats):
    fun()
  return (time.perf_counter() - start) / repeats


def _train_arrays(dataset, seed):
  """The training rows and (signed) labels the instance closes over."""
  instance = constrained.svm_hyperparameter(jax.random.key(seed),
                                            dataset=dataset)
  constraint = instance.problem.lower_constraints
  n = instance.x0.shape[0]
  d = instance.y0["w"].shape[0]
  # c_i = 1 - xi_i - y_i (w'a_i + b): read y_i a_i and y_i off its Jacobian.
  zero = {"w": jnp.zeros(d), "b": jnp.zeros(()), "xi": jnp.zeros(n)}
  jac = jax.jacobian(constraint, 1)(instance.x0, zero)
  signed_features = -np.asarray(jac["w"])
  labels = -np.asarray(jac["b"])
  return instance, signed_features * labels[:, None], labels


def _cvxpy_projection(features, labels, solver):
  import cvxpy as cp  # pylint: disable=import-outside-toplevel
  n, d = features.shape
  v = cp.Variable(d + 1 + n)
  target = cp.Parameter(d + 1 + n)
  margins = cp.multiply(labels, features @ v[:d] + v[d])
  problem = cp.Problem(cp.Minimize(cp.sum_squares(v - target)),
                       [1 - v[d + 1:] - margins <= 0])
  options = (dict(abstol=2e-3, reltol=2e-3, warm_start=True)
             if solver == "ECOS" else dict(warm_start=True))

  def project(point):
    target.value = point
    problem.solve(solver=solver, **options)
    return v.value

  return project


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats (tests)")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats = 3
  have_cvxpy = importlib.util.find_spec("cvxpy") is not None
  if not have_cvxpy:
    print("cvxpy is not installed: the CPU QP rows are skipped.")
  rows = []
  for dataset in ("fourclass", "breast_cancer"):
    instance, features, labels = _train_arrays(dataset, 0)
    n, d = features.shape
    exact = jax.jit(constrained.svm_margin_projection(features, labels))
    qp = jax.jit(constrained.svm_margin_qp_projection(features, labels))
    rng = np.random.default_rng(0)
    point = {"w": jnp.asarray(rng.normal(size=d)),
             "b": jnp.asarray(0.1),
             "xi": jnp.asarray(rng.normal(size=n))}
    flat = np.concatenate([point["w"], [point["b"]], point["xi"]])
    times = {
        "exact (jit)": _per_call(
            lambda: jax.block_until_ready(exact(point)), args.repeats),
        "BoxOSQP (jit)": _per_call(
            lambda: jax.block_until_ready(qp(point)), args.repeats)}
    if have_cvxpy:
      for solver in ("ECOS", "OSQP"):
        project = _cvxpy_projection(features, labels, solver)
        times[f"cvxpy {solver} (CPU)"] = _per_call(lambda: project(flat),
                                                   args.repeats)
    # Whole steps.
    step_times = {}
    for name, projection in (("step, exact", "exact"), ("step, BoxOSQP", "qp"),
                             ("step, none", "none")):
      inst = constrained.svm_hyperparameter(jax.random.key(0),
                                            dataset=dataset,
                                            projection=projection)
      solver = bilevel.solvers.lvhba(inst.problem, **SETTINGS)
      state = solver.init(inst.x0, inst.y0)
      step = jax.jit(solver.step)
      step_times[name] = _per_call(
          lambda: jax.block_until_ready(step(state)), args.repeats)
    if have_cvxpy:
      step_times["step, none + cvxpy ECOS (official design)"] = (
          step_times["step, none"] + times["cvxpy ECOS (CPU)"])
    base = times["exact (jit)"]
    print(f"\n{dataset}: n = {n} constraints, {d + 1 + n} variables")
    print(f"{'':45s} {'ms / call':>10s} {'ratio to exact':>15s}")
    for name, seconds in {**times, **step_times}.items():
      print(f"{name:45s} {1e3 * seconds:10.3f} {seconds / base:15.1f}")
      rows.append((dataset, name, seconds))
  return rows


if __name__ == "__main__":
  main()
