"""Checkpoints: resumed runs are bit-identical, writes are atomic."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOLVERS = ["aid", "amigo", "itd", "soba", "stocbio"]


def _instance():
  return problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                            num_samples=64, batch_size=8)


def _run(solver, instance, num_steps, **kwargs):
  return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                     num_steps=num_steps, key=jax.random.key(3),
                     steps_per_chunk=5, **kwargs)


def _sum_x(step, state):
  return float(jnp.sum(state.x))


@pytest.mark.parametrize("name", SOLVERS)
def test_resumed_run_is_bit_identical(name, tmp_path):
  instance = _instance()
  solver = getattr(bilevel.solvers, name)(
      instance.problem, upper_optimizer=__import__("optax").adam(0.05))
  whole = _run(solver, instance, 30, callback=_sum_x)
  # A run stopped after 15 steps (3 chunks), then the same call for 30.
  _run(solver, instance, 15, checkpoint_dir=tmp_path, callback=_sum_x)
  assert bilevel.checkpoint.latest_step(tmp_path) == 15
  resumed = _run(solver, instance, 30, checkpoint_dir=tmp_path,
                 callback=_sum_x)
  chex.assert_trees_all_equal(resumed.state, whole.state)
  chex.assert_trees_all_equal(resumed.history, whole.history)
  assert resumed.evaluations == whole.evaluations
  assert resumed.num_timed_steps + (0 if np.isnan(resumed.compile_seconds)
                                    else 5) == 15
  assert bilevel.checkpoint.latest_step(tmp_path) == 30


def test_checkpoints_every_k_chunks_and_at_the_end(tmp_path):
  instance = _instance()
  solver = bilevel.solvers.soba(instance.problem)
  result = _run(solver, instance, 27, checkpoint_dir=tmp_path,
                checkpoint_every=2, max_checkpoints=10)
  steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert steps == [10, 20, 27]
  assert result.checkpoint_seconds > 0
  _run(solver, instance, 40, checkpoint_dir=tmp_path, checkpoint_every=1,
       max_checkpoints=2)
  steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert steps == [37, 40]  # chunks of 5 from step 27; the two latest kept


def test_finished_run_returns_its_checkpoint(tmp_path):
  instance = _instance()
  solver = bilevel.solvers.aid(instance.problem)
  first = _run(solver, instance, 10, checkpoint_dir=tmp_path)
  again = _run(solver, instance, 10, checkpoint_dir=tmp_path)
  chex.assert_trees_all_equal(again.state, first.state)
  chex.assert_trees_all_equal(again.history, first.history)
  assert again.num_timed_steps == 0
  with pytest.raises(ValueError, match="beyond num_steps=5"):
    _run(solver, instance, 5, checkpoint_dir=tmp_path)


def test_checkpoint_of_another_run_is_refused(tmp_path):
  instance = _instance()
  solver = bilevel.solvers.soba(instance.problem)
  _run(solver, instance, 5, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="belongs to another run"):
    bilevel.run(solver, instance.x0, instance.y0, instance.data,
                num_steps=10, key=jax.random.key(4), checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="belongs to another run"):
    bilevel.run(solver, instance.x0 + 1.0, instance.y0, instance.data,
                num_steps=10, key=jax.random.key(3), checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="belongs to another run"):
    _run(bilevel.solvers.aid(instance.problem), instance, 10,
         checkpoint_dir=tmp_path)


def test_checkpoint_dir_must_be_a_directory(tmp_path):
  instance = _instance()
  path = tmp_path / "file"
  path.write_text("")
  with pytest.raises(ValueError, match="not a directory"):
    _run(bilevel.solvers.soba(instance.problem), instance, 5,
         checkpoint_dir=path)
  with pytest.raises(ValueError, match="checkpoint_every"):
    _run(bilevel.solvers.soba(instance.problem), instance, 5,
         checkpoint_dir=tmp_path, checkpoint_every=0)


def test_restore_state_reads_a_directory(tmp_path):
  instance = _instance()
  solver = bilevel.solvers.amigo(instance.problem)
  result = _run(solver, instance, 10, checkpoint_dir=tmp_path,
                max_checkpoints=5)
  like = solver.init(instance.x0, instance.y0, key=jax.random.key(0),
                     data=instance.data)
  chex.assert_trees_all_equal(
      bilevel.checkpoint.restore_state(tmp_path, like), result.state)
  earlier = bilevel.checkpoint.restore_state(tmp_path, like, step=5)
  assert int(earlier.num_steps) == 5
  with pytest.raises(FileNotFoundError, match="step 7"):
    bilevel.checkpoint.restore_state(tmp_path, like, step=7)
  assert bilevel.checkpoint.latest_step(tmp_path / "none") is None


class _NoisyState(NamedTuple):
  x: Any
  y: Any
  key: jax.Array
  inner: Any


def test_prng_keys_in_the_state_are_restored(tmp_path):
  """A solver that carries a typed PRNG key (e.g. for perturbations)."""
  instance = _instance()
  base = bilevel.solvers.soba(instance.problem)

  def init(x, y, *, key=None, data=None):
    return _NoisyState(x, y, jax.random.key(11), base.init(x, y, key=key,
                                                           data=data))

  def step(state, data=None):
    key, noise_key = jax.random.split(state.key)
    inner, info = base.step(state.inner, data)
    x = inner.x + 1e-3 * jax.random.normal(noise_key, inner.x.shape)
    inner = inner._replace(x=x)
    return _NoisyState(x, inner.y, key, inner), info

  solver = bilevel.BilevelSolver(init, step, base.oracle_calls)
  whole = _run(solver, instance, 20)
  _run(solver, instance, 10, checkpoint_dir=tmp_path)
  resumed = _run(solver, instance, 20, checkpoint_dir=tmp_path)
  chex.assert_trees_all_equal(resumed.state, whole.state)


_BUILD = textwrap.dedent("""
    import typing
    import jax
    jax.config.update("jax_enable_x64", True)
    import bilevel, problems
    instance = problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                                  num_samples=64, batch_size=8)
    soba = bilevel.solvers.soba(instance.problem)

    class State(typing.NamedTuple):
      x: typing.Any
      y: typing.Any
      inner: typing.Any
      big: typing.Any

    # A large auxiliary array makes every checkpoint slow to write (32 MB),
    # so that a kill most likely lands in the middle of a write.
    def init(x, y, *, key=None, data=None):
      inner = soba.init(x, y, key=key, data=data)
      return State(x, y, inner, jax.numpy.zeros((4_000_000,)))

    def step(state, data=None):
      inner, info = soba.step(state.inner, data)
      return State(inner.x, inner.y, inner, state.big + 1.0), info

    solver = bilevel.BilevelSolver(init, step, soba.oracle_calls)

    def run(num_steps, checkpoint_dir):
      return bilevel.run(solver, instance.x0, instance.y0, instance.data,
                         num_steps=num_steps, key=jax.random.key(3),
                         steps_per_chunk=2, checkpoint_dir=checkpoint_dir)
""")


def _kill_while_checkpointing(script, directory):
  """Runs ``script`` until it has checkpoints, then SIGKILLs it."""
  process = subprocess.Popen(
      [sys.executable, str(script), str(directory)],
      env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 120
    while (bilevel.checkpoint.latest_step(directory) or 0) < 6:
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline, "no checkpoint within 120 s"
      time.sleep(0.02)
    time.sleep(0.1)  # into the following writes
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  return [path.name for path in directory.iterdir()]


def test_killed_run_resumes_exactly(tmp_path):
  """SIGKILL in the middle of a checkpoint write; the resumed run is exact."""
  script = tmp_path / "killed.py"
  script.write_text(_BUILD + "\nimport sys\nrun(10**6, sys.argv[1])\n")
  # Writing takes most of the run's time, so the kill nearly always lands
  # in a write; a few attempts make sure the test sees one that did.
  for attempt in range(3):
    directory = tmp_path / f"checkpoints{attempt}"
    names = _kill_while_checkpointing(script, directory)
    if any("tmp" in name for name in names):
      break
  assert any("tmp" in name for name in names), names
  killed_at = bilevel.checkpoint.latest_step(directory)
  assert killed_at >= 6
  namespace = {}
  exec(_BUILD, namespace)  # pylint: disable=exec-used
  resumed = namespace["run"](killed_at + 4, directory)
  whole = namespace["run"](killed_at + 4, None)
  chex.assert_trees_all_equal(resumed.state, whole.state)
  chex.assert_trees_all_equal(resumed.history, whole.history)
