"""Sharding over devices: the same numbers on 1 and on 8 host devices."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import bilevel

ROOT = pathlib.Path(__file__).parent.parent


@functools.lru_cache(maxsize=None)
def _report():
  env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
  completed = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "multidevice_script.py")],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return json.loads(completed.stdout.strip().splitlines()[-1])


def test_scalebio_with_lisa_data_parallel_fsdp_matches_one_device():
  report = _report()
  assert report["num_devices"] == 8
  # Float64: the sums of per-device partial gradients differ only in order.
  # Measured 6e-15 on weights of size 0.5 after 30 steps.
  assert report["scalebio_difference"] < 1e-12
  assert report["scalebio_history_difference"] < 1e-12
  assert report["scalebio_weight_scale"] > 0.1


def test_state_is_split_and_batches_are_split():
  report = _report()
  # The stacked layers (4, 64, 64) and their LISA moments (2, 64, 64) split
  # along their second axis, the logits (4,) replicated.
  assert report["layer_spec"] == "P(None, 'data')"
  assert report["moment_spec"] == "P(None, 'data')"
  assert report["logits_spec"] == "P()"
  assert report["batch_spec"] == "P('data',)"
  # Measured: 753856 bytes on one device, 123072 on each of 8 (the small
  # leaves stay replicated).
  (per_device,) = report["state_bytes_per_device"]
  assert per_device < report["state_bytes_one_device"] / 5


def test_sharded_checkpoint_resumes_exactly():
  report = _report()
  assert report["resumed_difference"] == 0.0
  assert report["resumed_layer_spec"] == "P(None, 'data')"


def test_any_solver_runs_data_parallel_through_the_run_loop():
  report = _report()
  assert report["soba_difference"] < 1e-12
  assert report["soba_specs"] == ["P()"]


def test_sharding_rules_and_errors():
  report = _report()
  assert report["rules"] == {
      "rows": "P('data', None)", "columns": "P(None, 'data')",
      "largest": "P(None, None, 'data')", "small": "P()", "odd": "P()",
      "integer": "P()"}
  assert "does not split evenly" in report["indivisible_batch_error"]


def test_one_device_mesh_and_bad_arguments():
  mesh = bilevel.sharding.make_mesh()
  assert mesh.shape["data"] == jax.device_count()
  with pytest.raises(ValueError, match="no axis"):
    bilevel.sharding.fsdp(mesh, axis="model")
  with pytest.raises(TypeError, match="bilevel.Data"):
    bilevel.sharding.shard_data({"a": jnp.zeros(3)}, mesh)
  with pytest.raises(TypeError, match="NamedSharding"):
    bilevel._data.validate_data(bilevel.Data(  # pylint: disable=protected-access
        lower=jnp.zeros((8, 2)), lower_batch_size=4, batch_sharding="data"))
  instance_problem = bilevel.Problem(lambda x, y, b: jnp.sum(y ** 2),
                                     lambda x, y, b: jnp.sum((y - x) ** 2))
  solver = bilevel.solvers.aid(instance_problem)
  with pytest.raises(ValueError, match="state_sharding"):
    bilevel.run(solver, jnp.zeros(2), jnp.zeros(2), num_steps=2,
                state_sharding=[bilevel.sharding.replicated(mesh)])
