"""Checkpoints: resumed runs are bit-identical, writes are atomic, and a
checkpoint of another run (any part of its fingerprint) is refused."""

import dataclasses
import json
import os
import pathlib
import re
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
import optax
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
  # As in the killed script's process: its functions are those of __main__
  # (a function's module is part of its identity in the fingerprint).
  namespace = {"__name__": "__main__"}
  exec(_BUILD, namespace)  # pylint: disable=exec-used
  resumed = namespace["run"](killed_at + 4, directory)
  whole = namespace["run"](killed_at + 4, None)
  chex.assert_trees_all_equal(resumed.state, whole.state)
  chex.assert_trees_all_equal(resumed.history, whole.history)


# One test per part of the fingerprint: a run checkpointed, then a run that
# differs from it in that part only is refused, with a message naming it.


def _doubled(objective):
  def doubled(x, y, batch):
    return 2.0 * objective(x, y, batch)
  return doubled


def _logged(step):
  def logged_step(state, data=None):
    return step(state, data)
  return logged_step


def _build(variant=None):
  """The reference run's pieces, with ``variant``'s change applied.

  Everything is built afresh (new problem, optimizers, arrays): equal
  contents, not identical objects, make the same run.
  """
  instance = _instance()
  build = dict(
      factory="aid", problem=instance.problem,
      hyperparameters=dict(
          upper_optimizer=0.05,
          lower_optimizer=optax.sgd(optax.exponential_decay(0.5, 10, 0.9)),
          num_lower_steps=10,
          linear_solver=bilevel.linear_solve.cg(maxiter=5)),
      x0=instance.x0, y0=instance.y0, data=instance.data,
      key=jax.random.key(3), edit=None)
  if variant is not None:
    _VARIANTS[variant][0](build)
  solver = getattr(bilevel.solvers, build["factory"])(
      build["problem"], **build["hyperparameters"])
  if build["edit"] is not None:
    solver = build["edit"](solver)
  return solver, build


def _without_linear_solver(build):
  del build["hyperparameters"]["linear_solver"]


_VARIANTS = {
    "solver kind": (lambda b: (b.update(factory="itd"),
                               _without_linear_solver(b)), "solver"),
    "step size": (lambda b: b["hyperparameters"].update(upper_optimizer=0.5),
                  "hyperparameter upper_optimizer"),
    "integer hyperparameter": (
        lambda b: b["hyperparameters"].update(num_lower_steps=5),
        "hyperparameter num_lower_steps"),
    "optax optimizer": (
        lambda b: b["hyperparameters"].update(
            lower_optimizer=optax.adam(optax.exponential_decay(0.5, 10, 0.9))),
        "hyperparameter lower_optimizer"),
    "schedule": (
        lambda b: b["hyperparameters"].update(
            lower_optimizer=optax.sgd(optax.exponential_decay(0.5, 10, 0.8))),
        "hyperparameter lower_optimizer"),
    "linear solver": (
        lambda b: b["hyperparameters"].update(
            linear_solver=bilevel.linear_solve.cg(maxiter=6)),
        "hyperparameter linear_solver"),
    "problem f": (
        lambda b: b.update(problem=dataclasses.replace(
            b["problem"], upper=_doubled(b["problem"].upper))), "problem"),
    "data contents": (
        lambda b: b.update(data=dataclasses.replace(
            b["data"], upper=jax.tree.map(lambda a: a.at[0, 0].add(1e-9),
                                          b["data"].upper))), "data"),
    "batch size": (
        lambda b: b.update(data=dataclasses.replace(b["data"],
                                                    upper_batch_size=4)),
        "data"),
    "x0": (lambda b: b.update(x0=b["x0"].at[0].add(1e-9)), "x0"),
    "y0": (lambda b: b.update(y0=b["y0"].at[0].add(1e-9)), "y0"),
    "key": (lambda b: b.update(key=jax.random.key(4)), "key"),
    "replaced step": (lambda b: b.update(edit=lambda s: s._replace(
        step=_logged(s.step))), "init and step"),
}


def _named(message: str) -> list[str]:
  """The parts of the run a refusal names."""
  match = re.search(r"belongs to another run: its (.*?) differs? from", message)
  assert match, message
  return match.group(1).split(", ")


def _check_refusal(error, variant):
  expected = _VARIANTS[variant][1]
  named = _named(str(error.value))
  # Only that part (and the optimizer/sampler states that follow from it).
  assert expected in named, (variant, named)
  assert set(named) <= {expected, "initial state"}, (variant, named)
  assert "Use another checkpoint_dir, or delete this one" in str(error.value)


def _checkpointer(directory, variant=None):
  solver, build = _build(variant)
  state = solver.init(build["x0"], build["y0"], key=build["key"],
                      data=build["data"])
  checkpointer = bilevel.checkpoint.RunCheckpointer(
      directory, state, build["data"], solver=solver, key=build["key"])
  return checkpointer, solver, state, build


def _info_like(solver, data):
  return lambda like: jax.eval_shape(solver.step, like, data)[1]


@pytest.fixture(scope="module")
def written_by_checkpointer(tmp_path_factory):
  """A directory with a checkpoint (one step) of the reference run."""
  directory = tmp_path_factory.mktemp("reference")
  checkpointer, solver, state, build = _checkpointer(directory)
  assert checkpointer.restore_latest(_info_like(solver, build["data"])) is None
  state, info = jax.jit(solver.step)(state, build["data"])
  checkpointer.save(1, state, jax.tree.map(lambda leaf: leaf[None], info), [])
  checkpointer.close()
  return directory, state


@pytest.fixture(scope="module")
def written_by_run(tmp_path_factory):
  """A directory with a checkpoint of the reference run, by bilevel.run."""
  directory = tmp_path_factory.mktemp("reference_run")
  solver, build = _build()
  result = bilevel.run(solver, build["x0"], build["y0"], build["data"],
                       num_steps=5, key=build["key"], steps_per_chunk=5,
                       checkpoint_dir=directory)
  return directory, result


def test_fingerprint_fields():
  solver, build = _build()
  state = solver.init(build["x0"], build["y0"], key=build["key"],
                      data=build["data"])
  fingerprint = bilevel.checkpoint.fingerprint(state, build["data"],
                                               solver=solver, key=build["key"])
  assert list(fingerprint) == [
      "solver", "hyperparameter upper_optimizer",
      "hyperparameter lower_optimizer", "hyperparameter num_lower_steps",
      "hyperparameter linear_solver", "hyperparameter warm_start_linear",
      "problem", "data", "x0", "y0", "key", "initial state"]
  assert fingerprint["solver"] == "aid"
  assert all(re.fullmatch("[0-9a-f]{64}", value)
             for name, value in fingerprint.items() if name != "solver")
  assert json.loads(json.dumps(fingerprint)) == fingerprint
  # Built afresh, equal: the same fingerprint.
  again, build = _build()
  state = again.init(build["x0"], build["y0"], key=build["key"],
                     data=build["data"])
  assert bilevel.checkpoint.fingerprint(
      state, build["data"], solver=again, key=build["key"]) == fingerprint
  # A solver assembled by hand: its functions stand for the problem.
  manual = bilevel.BilevelSolver(solver.init, solver.step,
                                 solver.oracle_calls)
  unrecorded = bilevel.checkpoint.fingerprint(state, build["data"],
                                              solver=manual)
  assert unrecorded["solver"] == "unrecorded"
  assert list(unrecorded) == ["solver", "problem", "data", "x0", "y0", "key",
                              "initial state"]


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_checkpointer_refuses_another_run(variant, written_by_checkpointer):
  directory, _ = written_by_checkpointer
  checkpointer, solver, _, build = _checkpointer(directory, variant)
  try:
    with pytest.raises(ValueError, match="belongs to another run") as error:
      checkpointer.restore_latest(_info_like(solver, build["data"]))
  finally:
    checkpointer.close()
  _check_refusal(error, variant)
  if variant == "solver kind":
    assert ("(solver 'aid' in the checkpoint, 'itd' in this run)" in
            str(error.value))


def test_checkpointer_resumes_the_same_run(written_by_checkpointer):
  directory, state = written_by_checkpointer
  checkpointer, solver, _, build = _checkpointer(directory)
  try:
    restored = checkpointer.restore_latest(_info_like(solver, build["data"]))
  finally:
    checkpointer.close()
  assert restored.step == 1
  chex.assert_trees_all_equal(restored.state, state)


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_run_refuses_another_run(variant, written_by_run):
  directory, _ = written_by_run
  solver, build = _build(variant)
  with pytest.raises(ValueError, match="belongs to another run") as error:
    bilevel.run(solver, build["x0"], build["y0"], build["data"],
                num_steps=10, key=build["key"], steps_per_chunk=5,
                checkpoint_dir=directory)
  _check_refusal(error, variant)


def test_run_with_optax_optimizers_and_schedules_resumes_exactly(tmp_path):
  """The reference run (optax schedule, linear solver) stopped at 5 steps,
  rebuilt afresh and resumed to 10: bit-identical to a run of 10."""
  solver, build = _build()
  args = (build["x0"], build["y0"], build["data"])
  options = dict(key=build["key"], steps_per_chunk=5)
  whole = bilevel.run(solver, *args, num_steps=10, **options)
  bilevel.run(solver, *args, num_steps=5, checkpoint_dir=tmp_path, **options)
  solver, build = _build()
  resumed = bilevel.run(solver, build["x0"], build["y0"], build["data"],
                        num_steps=10, checkpoint_dir=tmp_path, **options)
  chex.assert_trees_all_equal(resumed.state, whole.state)
  chex.assert_trees_all_equal(resumed.history, whole.history)


def test_issue_17_step_sizes_are_told_apart(tmp_path):
  """The measured defect: aid at upper_optimizer=0.05 checkpointed, then
  aid at 0.5 in the same directory resumed from it silently."""
  instance = _instance()
  _run(bilevel.solvers.aid(instance.problem, upper_optimizer=0.05), instance,
       5, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match=(
      "belongs to another run: its hyperparameter upper_optimizer differs "
      "from this run's")):
    _run(bilevel.solvers.aid(instance.problem, upper_optimizer=0.5),
         instance, 10, checkpoint_dir=tmp_path)


def test_unrecorded_solvers_by_their_functions(tmp_path):
  instance = _instance()
  base = bilevel.solvers.soba(instance.problem)

  def noisy(scale):
    def step(state, data=None):
      state, info = base.step(state, data)
      return state._replace(x=state.x + scale), info
    return bilevel.BilevelSolver(base.init, step, base.oracle_calls)

  _run(noisy(1e-3), instance, 5, checkpoint_dir=tmp_path)
  resumed = _run(noisy(1e-3), instance, 10, checkpoint_dir=tmp_path)
  chex.assert_trees_all_equal(resumed.state,
                              _run(noisy(1e-3), instance, 10).state)
  with pytest.raises(ValueError, match="its problem differs"):
    _run(noisy(2e-3), instance, 15, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match=(
      r"its solver differs from this run's \(solver 'unrecorded' in the "
      r"checkpoint, 'soba' in this run\)")):
    _run(base, instance, 15, checkpoint_dir=tmp_path)


def test_checkpoint_of_an_earlier_version_is_refused(tmp_path, monkeypatch):
  checkpointer, solver, state, build = _checkpointer(tmp_path)
  state, info = jax.jit(solver.step)(state, build["data"])
  # Format 1: a single SHA-256 string.
  monkeypatch.setattr(bilevel.checkpoint, "_FORMAT", 1)
  checkpointer._fingerprint = "0" * 64  # pylint: disable=protected-access
  checkpointer.save(1, state, jax.tree.map(lambda leaf: leaf[None], info), [])
  checkpointer.close()
  monkeypatch.undo()
  checkpointer, solver, _, build = _checkpointer(tmp_path)
  try:
    with pytest.raises(ValueError, match=(
        "written by an earlier version of bilevel .*format 1.*Use another "
        "checkpoint_dir, or delete this one")):
      checkpointer.restore_latest(_info_like(solver, build["data"]))
  finally:
    checkpointer.close()


def test_checkpointer_refuses_a_run_holding_tracers(tmp_path):
  """A solver built inside jax.vmap from a traced step size: its checkpoints
  go through bilevel.run's traced path, not RunCheckpointer."""
  instance = _instance()
  concrete = bilevel.solvers.soba(instance.problem)
  state = concrete.init(instance.x0, instance.y0, key=jax.random.key(3),
                        data=instance.data)

  def build(step_size):
    solver = bilevel.solvers.soba(instance.problem, upper_optimizer=step_size)
    with pytest.raises(TypeError, match="holds JAX tracers"):
      bilevel.checkpoint.RunCheckpointer(tmp_path, state, instance.data,
                                         solver=solver, key=jax.random.key(3))
    return step_size

  jax.vmap(build)(jnp.array([0.1, 0.2]))
