r"""What the safety of long runs costs: the divergence check and checkpoints.

One solver (AID, defaults) on the minibatch logistic-regression
hyperparameter problem (float32), ``N`` steps of :func:`bilevel.run` in
chunks of ``C`` steps, compilation excluded (every workload is warmed up
first). Workloads, timed as whole ``run`` calls in interleaved repeats
(order reversed every other repeat), medians:

* ``unchecked``: ``on_divergence="ignore"``, no checkpoints: the baseline;
* ``checked``: the default, the divergence checks (NaN/inf in the state and
  diagnostics, growth of the iterates and diagnostics past ``max_growth``
  times their start) after every step inside the compiled chunk;
* ``ckpt/k``: the default check plus a checkpoint every ``k`` chunks and at
  the end (a fresh directory per call, so nothing is resumed).

``ratio`` is the median over repeats of ``time / unchecked`` within each
repeat; ``ms/ckpt`` is the median extra time per checkpoint written. Then a
run of ``N/2`` steps with checkpoints, resumed to ``N``, against ``N``
uninterrupted steps: the largest absolute difference over the final state
and history (it must be exactly 0).

Run from the repository root::

    python benchmarks/long_runs.py [--quick] [--steps N] [--chunk C]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import bilevel  # pylint: disable=wrong-import-position

QUICK = dict(num_train=1000, num_val=1000, batch_size=64, num_steps=40,
             chunk=10, repeats=2, every=(1, 2))
FULL = dict(num_train=None, num_val=None, batch_size=256, num_steps=4000,
            chunk=200, repeats=5, every=(1, 5))


def _largest_difference(a, b) -> float:
  diffs = [float(np.max(np.abs(np.asarray(u, np.float64) -
                               np.asarray(v, np.float64)), initial=0.0))
           for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
           if jnp.issubdtype(jnp.result_type(u), jnp.number)]
  return max(diffs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small data and few steps (test suite)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--chunk", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args(argv)
  config = dict(QUICK if args.quick else FULL)
  num_steps = args.steps or config["num_steps"]
  chunk = args.chunk or config["chunk"]
  repeats = args.repeats or config["repeats"]

  # pylint: disable-next=import-outside-toplevel
  from problems.logistic import logistic_regularization
  kwargs = {k: config[k] for k in ("num_train", "num_val", "batch_size")
            if config[k] is not None}
  instance = logistic_regularization(jax.random.key(0), dataset="ijcnn1_like",
                                     **kwargs)
  solver = bilevel.solvers.aid(instance.problem)
  key = jax.random.key(1)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="bilevel-bench-"))
  print(f"jax {jax.__version__}, device {jax.devices()[0]}, dtype "
        f"{instance.x0.dtype}; AID on logistic_regularization(ijcnn1_like), "
        f"x and y of shape {tuple(instance.x0.shape)}")
  print(f"{num_steps} steps in chunks of {chunk} "
        f"({-(-num_steps // chunk)} chunks), {repeats} interleaved repeats")

  def workload(on_divergence, every):
    def call(repeat):
      directory = None
      if every is not None:
        directory = scratch / f"{every}-{repeat}-{time.monotonic_ns()}"
      start = time.perf_counter()
      result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                           num_steps=num_steps, key=key,
                           steps_per_chunk=chunk, on_divergence=on_divergence,
                           checkpoint_dir=directory, checkpoint_every=every or 1)
      seconds = time.perf_counter() - start
      if directory is not None:
        shutil.rmtree(directory)
      return seconds
    return call

  workloads = {"unchecked": workload("ignore", None),
               "checked": workload("raise", None)}
  num_checkpoints = {}
  for every in config["every"]:
    workloads[f"ckpt/{every}"] = workload("raise", every)
    chunks = -(-num_steps // chunk)
    num_checkpoints[f"ckpt/{every}"] = chunks // every + (chunks % every > 0)
  try:
    for call in workloads.values():  # compile, warm caches
      call(-1)
    times = {name: [] for name in workloads}
    for repeat in range(repeats):
      names = list(workloads)[::-1] if repeat % 2 else list(workloads)
      for name in names:
        times[name].append(workloads[name](repeat))
    print(f"\n{'workload':<10} {'median s':>9} {'ratio':>6} {'ms/ckpt':>8}")
    for name, seconds in times.items():
      ratio = statistics.median(t / b for t, b in
                                zip(seconds, times["unchecked"]))
      extra = ""
      if name in num_checkpoints:
        per = statistics.median(
            (t - b) / num_checkpoints[name] for t, b in
            zip(seconds, times["checked"]))
        extra = f"{1000 * per:8.1f}"
      print(f"{name:<10} {statistics.median(seconds):9.3f} {ratio:6.2f} "
            f"{extra:>8}")

    directory = scratch / "resume"
    whole = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                        num_steps=num_steps, key=key, steps_per_chunk=chunk)
    bilevel.run(solver, instance.x0, instance.y0, instance.data,
                num_steps=num_steps // 2, key=key, steps_per_chunk=chunk,
                checkpoint_dir=directory)
    resumed = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                          num_steps=num_steps, key=key, steps_per_chunk=chunk,
                          checkpoint_dir=directory)
    difference = max(_largest_difference(whole.state, resumed.state),
                     _largest_difference(whole.history, resumed.history))
    print(f"\nresumed at step {num_steps // 2} of {num_steps}: largest "
          f"difference to the uninterrupted run = {difference!r}")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return 0 if difference == 0.0 else 1


if __name__ == "__main__":
  sys.exit(main())
