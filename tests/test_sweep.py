"""Checkpointed sweeps: bilevel.run with checkpoint_dir under jax.vmap."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems

jax.config.update("jax_enable_x64", True)

STEP_SIZES = jnp.array([0.05, 0.2, 50.0])  # the last one diverges
SEEDS = jnp.array([0, 1, 2])


def _instance():
  # Minibatches of 8: the key decides the batches, so members differ by key
  # and by step size.
  return problems.quadratic(jax.random.key(0), dim_x=4, dim_y=3,
                            num_samples=64, batch_size=8)


def _sweep(instance, num_steps, directory=None, step_sizes=STEP_SIZES,
           solver=bilevel.solvers.aid, **kwargs):
  def member(step_size, seed):
    result = bilevel.run(solver(instance.problem, upper_optimizer=step_size),
                         instance.x0, instance.y0, instance.data,
                         key=jax.random.key(seed), num_steps=num_steps,
                         steps_per_chunk=10, checkpoint_dir=directory,
                         **kwargs)
    return result.x, result.y, result.history, result.divergence_step
  return jax.vmap(member)(step_sizes, SEEDS)


def _assert_identical(a, b):
  for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(left, right)


def test_sweep_writes_and_resumes_bit_identically(tmp_path):
  instance = _instance()
  plain = _sweep(instance, 60)
  # The diverging member stopped at its own step; the others ran on.
  steps = np.asarray(plain[3])
  assert steps[0] == -1 and steps[1] == -1 and 1 <= steps[2] < 60
  assert np.all(np.isfinite(plain[0]))

  directory = tmp_path / "sweep"
  first = _sweep(instance, 30, directory, checkpoint_every=2)
  members = sorted(p.name for p in directory.iterdir())
  assert members[-1] == "sweep.json" and len(members) == 4
  files = sorted(p.name for p in (directory / members[0]).iterdir())
  assert files == ["step-000000000020.npz", "step-000000000030.npz"]
  np.testing.assert_array_equal(first[3], [-1, -1, steps[2]])
  resumed = _sweep(instance, 60, directory, checkpoint_every=2)
  _assert_identical(resumed, plain)
  # Resuming a finished sweep computes nothing and returns the same.
  _assert_identical(_sweep(instance, 60, directory), plain)


def test_another_sweep_is_refused(tmp_path):
  instance = _instance()
  directory = tmp_path / "sweep"
  _sweep(instance, 20, directory)
  # Other step sizes: the members' values differ (seen by their callbacks).
  with pytest.raises(Exception, match="has no checkpoint of step 20"):
    _sweep(instance, 40, directory, step_sizes=STEP_SIZES * 2)
  # Another solver: refused when the run is traced, naming what differs.
  with pytest.raises(ValueError, match="belong to another sweep: its .*"
                     "solver"):
    _sweep(instance, 40, directory, solver=bilevel.solvers.soba)
  # A directory of a run outside vmap is not a sweep's.
  single = tmp_path / "single"
  bilevel.run(bilevel.solvers.aid(instance.problem), instance.x0,
              instance.y0, instance.data, key=jax.random.key(0),
              num_steps=10, checkpoint_dir=single)
  with pytest.raises(ValueError, match="not empty and holds no sweep"):
    _sweep(instance, 20, single)


_KILLED = """
import jax, jax.numpy as jnp, sys
jax.config.update("jax_enable_x64", True)
sys.path[:0] = {paths!r}
import bilevel, problems
from tests.test_sweep import _instance, _sweep
_sweep(_instance(), 100000, {directory!r}, checkpoint_every=1)
"""


def test_sweep_killed_mid_run_resumes_bit_identically(tmp_path):
  directory = tmp_path / "sweep"
  root = pathlib.Path(__file__).resolve().parents[1]
  script = _KILLED.format(paths=[str(root)], directory=str(directory))
  process = subprocess.Popen([sys.executable, "-c", script],
                             cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      written = [p for p in directory.glob("member-*/step-*.npz")]
      if len({p.name for p in written}) >= 3:
        break
      if process.poll() is not None:
        raise AssertionError(process.stderr.read().decode()[-2000:])
      time.sleep(0.05)
    else:
      raise AssertionError("the sweep wrote no checkpoints in 240 s")
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  instance = _instance()
  # Resume to the step the slowest member had written, then some more.
  latest = min(max(int(p.stem.split("-")[1]) for p in member.glob("*.npz"))
               for member in directory.glob("member-*"))
  assert latest >= 20
  num_steps = latest + 30
  _assert_identical(_sweep(instance, num_steps, directory),
                    _sweep(instance, num_steps))
  assert not list(directory.glob("member-*/*.tmp"))


def test_sweep_over_step_sizes_alone(tmp_path):
  # Only the solver is traced (x0, y0 and the key are concrete): the run
  # still goes through the sweep's callbacks.
  instance = _instance()

  def sweep(num_steps, directory=None):
    def member(step_size):
      solver = bilevel.solvers.soba(instance.problem,
                                    upper_optimizer=step_size)
      return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                         key=jax.random.key(0), num_steps=num_steps,
                         steps_per_chunk=10, checkpoint_dir=directory).x
    return jax.vmap(member)(STEP_SIZES[:2])

  sweep(20, tmp_path)
  assert len(list(tmp_path.glob("member-*/step-000000000020.npz"))) == 2
  np.testing.assert_array_equal(sweep(40, tmp_path), sweep(40))
