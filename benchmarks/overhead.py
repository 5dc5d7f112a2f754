r"""Per-step overhead of each solver over the oracle calls it declares.

For every solver of :mod:`bilevel.solvers` (the lowercase callables of its
``__all__``) on the minibatch logistic-regression hyperparameter problem
(float32), per step, medians over interleaved repeats:

* ``step``: the step as ``bilevel.run`` executes it, ``N`` steps in one
  compiled ``lax.scan`` (compilation excluded). It includes the library's
  minibatch sampler: drawing batches is real work the solver does.
* ``oracles``: the baseline, a jitted ``lax.scan`` of ``N`` rounds. A round
  (1) gathers as many minibatches of each level as one step draws (same
  batch size), as one ``jnp.take`` per data leaf of the rows
  ``order[positions % n]``, where ``order`` is a random permutation of the
  level's ``n`` rows computed once before timing and ``positions`` continue
  from round to round; (2) makes exactly the calls of ``solver.oracle_calls``
  with :mod:`bilevel.derivatives`, each on its own: ``upper_value_and_grads``
  (Gf), ``lower_grad`` (Gg), ``lower_hvp`` (HVP, forward-over-reverse),
  ``lower_cross`` (JVP, one reverse pass). Each output moves the next call's
  input by ``1e-6`` times itself, so XLA can neither drop nor merge a call.
  The baseline thus moves the same rows as the step; its indices cost one
  integer gather per row, about what slicing a precomputed permutation costs,
  and none of the library's per-position hashing (below).
* ``ratio``: median over repeats of ``step / oracles`` within each repeat
  (target: below 1.1).

Diagnostics (off with ``--quick``):

* ``sampler``: the library's sampler alone, ``bilevel._data.sample_many``
  drawing the same batches (each summed so that it is used);
* ``fixed-order``: the same compiled step with the sampler's draw patched,
  while tracing, to take the baseline's indices ``order[positions % n]``,
  and its ratio to ``oracles``: ``step - fixed-order`` estimates what the
  library's index generation costs inside the step.

The library's sampler (:mod:`bilevel._data`) keeps per level a seed, a
position and an epoch. Batch ``k`` reads positions ``[k b, (k + 1) b)`` of a
stream whose epoch ``e`` is a Feistel permutation of ``0..n-1`` keyed by the
seed and ``e``, evaluated per position (cycle walking in a ``while_loop``
until every index is below ``n``), then gathers those rows: ``O(b)`` per
batch, nothing of size ``n`` stored.

A step can beat the baseline where it shares work between oracles: one
``jax.vjp`` of ``grad_y g`` gives ``grad_y g``, ``H v`` and ``J v`` (SOBA, the
final product of StocBiO and AmIGO, ITD's reverse pass, counted as ``K`` HVPs
and ``K`` JVPs); AID's CG re-uses one linearisation. AID runs with
``cg(tol=0, maxiter=10)`` so that it makes exactly its declared products;
the other solvers use their defaults.

Run from the repository root::

    python benchmarks/overhead.py [--quick] [--steps N] [--repeats R]

Each repeat times one solver's workloads back to back (order reversed every
other repeat) so that they see the same machine state; compare ratios, not
absolute times, across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import bilevel  # pylint: disable=wrong-import-position
from bilevel import _data, _run  # pylint: disable=wrong-import-position
from bilevel import derivatives  # pylint: disable=wrong-import-position

PyTree = Any

# Scale of the outputs fed back into the inputs of the next oracle call.
_FEEDBACK = 1e-6

# Non-default settings, only where they make the declared count exact.
SOLVER_KWARGS = {
    "aid": lambda: dict(linear_solver=bilevel.linear_solve.cg(
        tol=0.0, maxiter=10)),
    # Solvers whose steps differ from one another run in a setting where
    # every timed step makes its declared calls: BO-REP updates y every step
    # (period 1; timing starts after step 0, which never updates), TTSA
    # truncates its series at 0 terms (Q = 1: no HVP).
    "borep": lambda: dict(period=1),
    "ttsa": lambda: dict(num_neumann_terms=1),
}


def solver_factories() -> dict[str, Callable]:
  """The solver factories of :mod:`bilevel.solvers` that take a problem alone.

  Factories with a second required argument (``stn(problem, space)``,
  whose objectives read a hyperparameter record instead of ``x``) need a
  problem of their own: ``paper_repro/stn`` measures STN's overhead.
  """
  factories = {}
  for name in bilevel.solvers.__all__:
    value = getattr(bilevel.solvers, name)
    if not (name.islower() and callable(value)):
      continue
    parameters = list(inspect.signature(value).parameters.values())
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if parameters and parameters[0].name == "problem" and len(required) == 1:
      factories[name] = value
  return factories


class BatchCounts(NamedTuple):
  upper: int
  lower: int


def batches_per_step(before, after, data: bilevel.Data,
                     num_steps: int = 1) -> BatchCounts:
  """Minibatches of each level one step draws, from two solver states.

  ``after`` is ``before`` advanced by ``num_steps`` steps; a stream has read
  ``epoch * n + position`` positions, ``batch_size`` per batch.
  """
  counts = []
  for level in ("upper", "lower"):
    start, end = getattr(before.sampler, level), getattr(after.sampler, level)
    if start is None:
      counts.append(0)
      continue
    n = _data.num_samples(getattr(data, level))
    advance = ((int(end.epoch) - int(start.epoch)) * n
               + int(end.position) - int(start.position))
    per_step = getattr(data, f"{level}_batch_size") * num_steps
    if advance % per_step:
      raise RuntimeError(f"The {level} stream advanced by {advance} in "
                         f"{num_steps} steps: not a multiple of {per_step}.")
    counts.append(advance // per_step)
  return BatchCounts(*counts)


# --------------------------------------------------------------------------
# Workloads.


def random_orders(data: bilevel.Data, key) -> tuple[jax.Array, jax.Array]:
  """A random permutation of each level's samples (length 1 if full batch)."""
  orders = []
  for level, level_key in zip(("upper", "lower"), jax.random.split(key)):
    n = (_data.num_samples(getattr(data, level))
         if _data.is_stochastic(data, level) else 1)
    orders.append(jax.random.permutation(level_key, n).astype(jnp.int32))
  return tuple(orders)


def _nudge(tree: PyTree, direction: PyTree, scale) -> PyTree:
  return jax.tree.map(lambda a, b: a + jnp.asarray(scale, a.dtype) * b,
                      tree, direction)


def oracle_only_steps(problem: bilevel.Problem, calls: bilevel.OracleCalls,
                      batches: BatchCounts, data: bilevel.Data, *,
                      num_steps: int) -> Callable:
  """``fun(x, y, v, orders) -> (x, y, v)``: ``num_steps`` rounds of oracles.

  One round gathers ``batches.upper`` upper and ``batches.lower`` lower
  minibatches (one ``jnp.take`` per level, rows at the next positions of
  ``orders``, read cyclically), then makes the declared calls in a step's
  order: lower gradients, upper gradients, HVPs, cross products, repeated
  calls in a ``lax.scan``, call ``i`` of a level on its batch ``i mod
  (number of batches)``. Full-batch levels pass the whole level.
  """
  num = {"upper": max(batches.upper, 1), "lower": max(batches.lower, 1)}
  eps = _FEEDBACK

  def gather(level, order, start):
    """``level``'s batches of this round, as ``i -> batch i mod count``."""
    arrays = None if data is None else getattr(data, level)
    if not _data.is_stochastic(data, level):
      return lambda i: arrays, 0
    size = getattr(data, f"{level}_batch_size")
    positions = start + jnp.arange(num[level] * size, dtype=jnp.int32)
    rows = order[positions % order.shape[0]].reshape(num[level], size)
    stacked = jax.tree.map(lambda leaf: jnp.take(leaf, rows, axis=0), arrays)
    pick = lambda i: jax.tree.map(lambda leaf: leaf[i % num[level]], stacked)
    return pick, num[level] * size

  def repeat(fun, xyv, count, first):
    if count == 0:
      return xyv
    if count == 1:
      return fun(xyv, first)
    return jax.lax.scan(lambda c, i: (fun(c, i), None), xyv,
                        first + jnp.arange(count))[0]

  def one_round(carry, _):
    x, y, v, orders, start = carry
    upper, upper_advance = gather("upper", orders[0], start[0])
    lower, lower_advance = gather("lower", orders[1], start[1])

    def lower_grad(xyv, i):
      x_, y_, v_ = xyv
      grad = derivatives.lower_grad(problem, x_, y_, lower(i))
      return x_, _nudge(y_, grad, -eps), v_

    def upper_grads(xyv, i):
      x_, y_, v_ = xyv
      value, grad_x, grad_y = derivatives.upper_value_and_grads(
          problem, x_, y_, upper(i))
      return _nudge(x_, grad_x, -eps), y_, _nudge(v_, grad_y, eps * value)

    def hvp(xyv, i):
      x_, y_, v_ = xyv
      hv = derivatives.lower_hvp(problem, x_, y_, v_, lower(i))
      return x_, y_, _nudge(v_, hv, -eps)

    def cross(xyv, i):
      x_, y_, v_ = xyv
      jv = derivatives.lower_cross(problem, x_, y_, v_, lower(i))
      return _nudge(x_, jv, -eps), y_, v_

    # Lower batches are dealt out in call order.
    xyv = repeat(lower_grad, (x, y, v), calls.lower_grads, 0)
    xyv = repeat(upper_grads, xyv, calls.upper_grads, 0)
    xyv = repeat(hvp, xyv, calls.hvps, calls.lower_grads)
    xyv = repeat(cross, xyv, calls.cross_products,
                 calls.lower_grads + calls.hvps)
    start = jnp.stack([(start[0] + upper_advance) % orders[0].shape[0],
                       (start[1] + lower_advance) % orders[1].shape[0]])
    return (*xyv, orders, start), None

  def run_rounds(x, y, v, orders):
    carry = (x, y, v, orders, jnp.zeros(2, jnp.int32))
    (x, y, v, _, _), _ = jax.lax.scan(one_round, carry, None,
                                      length=num_steps)
    return x, y, v

  return run_rounds


def sampler_only_steps(data: bilevel.Data, batches: BatchCounts, *,
                       num_steps: int) -> Callable:
  """``fun(sampler) -> total``: ``num_steps`` rounds of the sampler alone.

  One round draws ``batches.upper`` upper and ``batches.lower`` lower batches
  with ``bilevel._data.sample_many`` and sums their floating-point leaves.
  """
  def one_round(carry, _):
    sampler, total = carry
    for level, count in zip(("upper", "lower"), batches):
      if count:
        stacked, sampler = _data.sample_many(sampler, data, level, count)
        total += sum(jnp.sum(leaf) for leaf in jax.tree.leaves(stacked)
                     if jnp.issubdtype(leaf.dtype, jnp.floating))
    return (sampler, total), None

  def run_rounds(sampler):
    total = jnp.zeros((), jnp.result_type(float))
    return jax.lax.scan(one_round, (sampler, total), None,
                        length=num_steps)[0][1]

  return run_rounds


@contextlib.contextmanager
def cyclic_sampler(orders: dict[int, np.ndarray]):
  """Within: the sampler's draws index fixed permutations, ``orders[n]``.

  Replaces ``bilevel._data._draw`` (so only for steps traced within) by a
  draw of the same batch size that takes ``orders[n][positions % n]`` as
  indices instead of hashing the positions, and advances ``position`` and
  ``epoch`` as the library does. Diagnostic only.
  """
  def draw(stream, arrays, batch_size):
    n = _data.num_samples(arrays)
    positions = stream.position + jnp.arange(batch_size, dtype=jnp.int32)
    indices = jnp.asarray(orders[n])[positions % n]
    batch = jax.tree.map(lambda leaf: jnp.take(leaf, indices, axis=0), arrays)
    position = stream.position + batch_size
    wrapped = position >= n
    return batch, stream._replace(
        position=jnp.where(wrapped, position - n, position),
        epoch=stream.epoch + wrapped.astype(stream.epoch.dtype))

  original = _data._draw  # pylint: disable=protected-access
  _data._draw = draw  # pylint: disable=protected-access
  try:
    yield
  finally:
    _data._draw = original  # pylint: disable=protected-access


# --------------------------------------------------------------------------
# Timing.


def _timer(compiled: Callable, *args) -> Callable[[], float]:
  def seconds():
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start
  return seconds


class Measurement(NamedTuple):
  """Per-step medians (microseconds) and paired ratios of one solver."""
  name: str
  calls: bilevel.OracleCalls
  batches: BatchCounts
  us: dict[str, float]       # workload -> median time per step
  ratios: dict[str, float]   # workload -> median of time / oracles time
  compile_seconds: float


def build_workloads(name, instance, key, num_steps, *, diagnostics):
  """The compiled workloads of one solver, as ``{name: timer}``."""
  factory = solver_factories()[name]
  solver = factory(instance.problem, **SOLVER_KWARGS.get(name, dict)())
  data = instance.data
  state = solver.init(instance.x0, instance.y0, key=key, data=data)
  state, _ = jax.jit(solver.step)(state, data)  # timing starts at step 1

  def time_step():
    result = bilevel.run(solver, None, None, data, num_steps=num_steps,
                         steps_per_chunk=num_steps, state=state)
    if result.num_timed_steps != num_steps:
      raise RuntimeError("bilevel.run recompiled while timing.")
    return result.seconds

  # Compiles the step and tells how many batches it draws.
  warm_up = bilevel.run(solver, None, None, data, num_steps=num_steps,
                        steps_per_chunk=num_steps, state=state)
  batches = batches_per_step(state, warm_up.state, data, num_steps)
  orders = random_orders(data, key)
  v = jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.01), instance.y0)
  oracle_args = (instance.x0, instance.y0, v, orders)

  oracles = jax.jit(oracle_only_steps(
      instance.problem, solver.oracle_calls, batches, data,
      num_steps=num_steps)).lower(*oracle_args).compile()
  workloads = {"step": time_step, "oracles": _timer(oracles, *oracle_args)}
  if diagnostics:
    sampler = _data.init_sampler(data, key)
    workloads["sampler"] = _timer(jax.jit(sampler_only_steps(
        data, batches, num_steps=num_steps)).lower(sampler).compile(),
        sampler)
    scan_steps = jax.jit(functools.partial(_run._scan_steps, solver),  # pylint: disable=protected-access
                         static_argnames="length")
    args = (state, data, num_steps)
    with cyclic_sampler({int(o.shape[0]): np.asarray(o) for o in orders}):
      compiled = scan_steps.lower(*args, length=num_steps).compile()
    workloads["fixed-order"] = _timer(compiled, *args)
  for timer in workloads.values():  # first runs: allocations, caches
    timer()
  return solver.oracle_calls, batches, workloads


def measure(instance, *, num_steps: int, repeats: int, key,
            diagnostics=True, names=None) -> list[Measurement]:
  """Builds every solver's workloads, then times them in interleaved repeats.

  Each repeat times, solver after solver, all workloads of one solver back
  to back (reversed on odd repeats); medians over repeats are reported.
  """
  cases = []
  for name in names or solver_factories():
    start = time.perf_counter()
    calls, batches, workloads = build_workloads(
        name, instance, key, num_steps, diagnostics=diagnostics)
    cases.append((name, calls, batches, workloads,
                  time.perf_counter() - start))
  times = [{kind: [] for kind in case[3]} for case in cases]
  for repeat in range(repeats):
    for (_, _, _, workloads, _), case_times in zip(cases, times):
      kinds = list(workloads)[::-1] if repeat % 2 else list(workloads)
      for kind in kinds:
        case_times[kind].append(workloads[kind]())
  results = []
  for (name, calls, batches, _, seconds), case_times in zip(cases, times):
    us = {kind: 1e6 * statistics.median(t) / num_steps
          for kind, t in case_times.items()}
    ratios = {kind: statistics.median(
        a / b for a, b in zip(t, case_times["oracles"]))
              for kind, t in case_times.items()}
    results.append(Measurement(name, calls, batches, us, ratios, seconds))
  return results


def format_table(results: list[Measurement]) -> str:
  """One row per solver: times per step (us) and ratios to ``oracles``."""
  kinds = list(results[0].us)
  columns = [("solver", "<8"), ("oracle calls (per step)", "<31"),
             ("batches", ">7"), ("step us", ">8"), ("oracles us", ">10"),
             ("ratio", ">5")]
  if "sampler" in kinds:
    columns += [("sampler us", ">10"), ("fixed-order us", ">14"),
                ("ratio", ">5")]
  lines = [" ".join(f"{title:{align}}" for title, align in columns)]
  lines.append("-" * len(lines[0]))
  for r in results:
    cells = [r.name, str(r.calls), f"{r.batches.upper}+{r.batches.lower}",
             f"{r.us['step']:.1f}", f"{r.us['oracles']:.1f}",
             f"{r.ratios['step']:.2f}"]
    if "sampler" in kinds:
      cells += [f"{r.us['sampler']:.1f}", f"{r.us['fixed-order']:.1f}",
                f"{r.ratios['fixed-order']:.2f}"]
    lines.append(" ".join(f"{cell:{align}}"
                          for cell, (_, align) in zip(cells, columns)))
  return "\n".join(lines)


# Minibatch size (both levels) per dataset, and the --quick settings.
BATCH_SIZES = {"ijcnn1_like": 256, "breast_cancer": 32}
QUICK = dict(num_train=1000, num_val=1000, batch_size=64, num_steps=20,
             repeats=2)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small data, few "
                      "steps, ijcnn1_like only, no diagnostics (test suite)")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per timed call (default 500)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved repeats (default 5)")
  parser.add_argument("--solvers", default=None,
                      help="comma-separated subset of the solvers")
  args = parser.parse_args(argv)
  num_steps = args.steps or (QUICK["num_steps"] if args.quick else 500)
  repeats = args.repeats or (QUICK["repeats"] if args.quick else 5)
  names = args.solvers.split(",") if args.solvers else None

  # pylint: disable-next=import-outside-toplevel
  from problems.logistic import logistic_regularization
  print(f"jax {jax.__version__}, device {jax.devices()[0]} "
        f"({jax.default_backend()}), dtype {jnp.zeros(()).dtype}")
  print(f"{num_steps} steps per timed call, {repeats} interleaved repeats; "
        "medians, per step, in microseconds")
  for dataset in ["ijcnn1_like"] if args.quick else list(BATCH_SIZES):
    start = time.perf_counter()
    kwargs = dict(batch_size=BATCH_SIZES[dataset])
    if args.quick:
      kwargs = {key: QUICK[key] for key in ("num_train", "num_val",
                                            "batch_size")}
    instance = logistic_regularization(jax.random.key(0), dataset=dataset,
                                       **kwargs)
    data = instance.data
    print(f"\n== logistic_regularization(dataset={dataset!r}): "
          f"{_data.num_samples(data.upper)} upper (validation) and "
          f"{_data.num_samples(data.lower)} lower (training) rows, batch "
          f"size {data.lower_batch_size}, x and y of shape "
          f"{tuple(instance.x0.shape)}")
    results = measure(instance, num_steps=num_steps, repeats=repeats,
                      key=jax.random.key(1), diagnostics=not args.quick,
                      names=names)
    print(format_table(results))
    worst = max(results, key=lambda r: r.ratios["step"])
    print(f"ratio = step / oracles (target < 1.1): {worst.name} worst at "
          f"{worst.ratios['step']:.2f}; "
          f"{sum(r.ratios['step'] < 1.1 for r in results)}/{len(results)} "
          f"within target. Compilation and warm-up "
          f"{sum(r.compile_seconds for r in results):.1f} s, dataset total "
          f"{time.perf_counter() - start:.1f} s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
