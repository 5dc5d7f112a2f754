"""Runs solvers on 1 and on 8 host devices; prints a JSON report.

Started by tests/test_sharding.py in a subprocess, because the device count
(XLA_FLAGS=--xla_force_host_platform_device_count=8) must be set before JAX
starts. Float64 throughout.
"""

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

jax.config.update("jax_enable_x64", True)

import bilevel  # pylint: disable=wrong-import-position
import problems  # pylint: disable=wrong-import-position
from bilevel import lisa, reweighting  # pylint: disable=wrong-import-position

NUM_SOURCES, DIM, WIDTH, CLASSES = 4, 64, 64, 8


def _mlp_problem():
  rng = np.random.default_rng(0)
  n = 512
  train = {"x": jnp.asarray(rng.standard_normal((n, DIM))),
           "y": jnp.asarray(rng.integers(0, CLASSES, n)),
           "source": jnp.asarray(np.repeat(np.arange(NUM_SOURCES),
                                           n // NUM_SOURCES).astype(np.int32))}
  val = {"x": jnp.asarray(rng.standard_normal((128, DIM))),
         "y": jnp.asarray(rng.integers(0, CLASSES, 128))}

  def losses(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["input"])

    def layer(h, weights):
      return h + jnp.tanh(h @ weights[0] + weights[1]), None

    hidden, _ = jax.lax.scan(layer, hidden, (params["layers"]["w"],
                                             params["layers"]["b"]))
    logits = hidden @ params["output"]
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, batch["y"][:, None], 1)[:, 0]

  problem = bilevel.Problem(
      upper=lambda x, y, b: jnp.mean(losses(y, b)),
      lower=lambda x, y, b: reweighting.source_weighted_loss(
          x, losses(y, b), b["source"]))
  keys = jax.random.split(jax.random.key(1), 3)
  params = {"input": jax.random.normal(keys[0], (DIM, WIDTH)) / 8,
            "layers": {"w": jax.random.normal(keys[1], (4, WIDTH, WIDTH)) / 8,
                       "b": jnp.zeros((4, WIDTH))},
            "output": jax.random.normal(keys[2], (WIDTH, CLASSES)) / 8}
  data = bilevel.Data(upper=val, lower=train, upper_batch_size=32,
                      lower_batch_size=64)
  return problem, data, jnp.zeros(NUM_SOURCES), params


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _specs(tree):
  return sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)})


def main():
  report = {"num_devices": jax.device_count()}
  mesh = bilevel.sharding.make_mesh()

  # ScaleBiO with LISA: data parallel + FSDP against one device.
  problem, data, x0, y0 = _mlp_problem()
  solver = bilevel.solvers.scalebio(problem, lower_optimizer=lisa.lisa_adamw(
      1e-3, blocks="layers", num_active=2, period=5))
  kwargs = dict(num_steps=30, key=jax.random.key(0), steps_per_chunk=10)
  one = bilevel.run(solver, x0, y0, data, **kwargs)
  sharded_data = bilevel.sharding.shard_data(data, mesh)
  many = bilevel.run(solver, x0, y0, sharded_data,
                     state_sharding=bilevel.sharding.fsdp(mesh), **kwargs)
  report["scalebio_difference"] = _max_difference(
      (one.state.x, one.state.y, one.state.y_penalized),
      (many.state.x, many.state.y, many.state.y_penalized))
  report["scalebio_history_difference"] = _max_difference(
      (one.history.upper_loss, one.history.weights),
      (many.history.upper_loss, many.history.weights))
  report["scalebio_weight_scale"] = float(jnp.max(jnp.abs(one.state.y[
      "layers"]["w"])))
  report["layer_spec"] = str(many.state.y["layers"]["w"].sharding.spec)
  report["moment_spec"] = str(
      many.state.y_penalized_opt_state[0].block_state[0].mu["layers"]["w"]
      .sharding.spec)
  report["logits_spec"] = str(many.state.x.sharding.spec)
  one_bytes = bilevel.sharding.bytes_per_device(one.state)
  many_bytes = bilevel.sharding.bytes_per_device(many.state)
  report["state_bytes_one_device"] = sum(one_bytes.values())
  report["state_bytes_per_device"] = sorted(set(many_bytes.values()))

  # A checkpointed run of 20 steps, resumed to 30, gives the same state,
  # on the same shardings.
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as directory:
    fsdp = bilevel.sharding.fsdp(mesh)
    bilevel.run(solver, x0, y0, sharded_data, num_steps=20,
                key=jax.random.key(0), steps_per_chunk=10,
                state_sharding=fsdp, checkpoint_dir=directory)
    resumed = bilevel.run(solver, x0, y0, sharded_data, num_steps=30,
                          key=jax.random.key(0), steps_per_chunk=10,
                          state_sharding=fsdp, checkpoint_dir=directory)
  report["resumed_difference"] = _max_difference(resumed.state.y,
                                                 many.state.y)
  report["resumed_layer_spec"] = str(
      resumed.state.y["layers"]["w"].sharding.spec)

  # The sampled batches are split over the 8 devices inside the step.
  def batch_spec(state):
    batch, _ = bilevel._data.sample(state.sampler, sharded_data, "lower")  # pylint: disable=protected-access
    return batch["x"]
  traced = jax.jit(batch_spec)(many.state)
  report["batch_spec"] = str(traced.sharding.spec)

  # Any solver through the run loop: SOBA, stochastic quadratic, data
  # parallel with the state replicated.
  instance = problems.quadratic(jax.random.key(0), dim_x=16, dim_y=8,
                                num_samples=256, batch_size=16)
  soba = bilevel.solvers.soba(instance.problem)
  base = bilevel.run(soba, instance.x0, instance.y0, instance.data,
                     num_steps=50, key=jax.random.key(2))
  spread = bilevel.run(soba, instance.x0, instance.y0,
                       bilevel.sharding.shard_data(instance.data, mesh,
                                                   split_datasets=True),
                       num_steps=50, key=jax.random.key(2),
                       state_sharding=bilevel.sharding.replicate(mesh))
  report["soba_difference"] = _max_difference((base.x, base.y),
                                              (spread.x, spread.y))
  report["soba_specs"] = _specs(spread.state)

  rules = {}
  for name, leaf in {"rows": jnp.zeros((128, 12)), "columns": jnp.zeros((12, 96)),
                     "largest": jnp.zeros((16, 8, 64)),
                     "small": jnp.zeros((8, 8)), "odd": jnp.zeros((33, 35)),
                     "integer": jnp.zeros((64, 64), jnp.int32)}.items():
    rules[name] = str(bilevel.sharding.leaf_sharding(leaf, mesh).spec)
  report["rules"] = rules

  try:
    bilevel.sharding.shard_data(bilevel.Data(
        upper=data.upper, lower=data.lower, upper_batch_size=12,
        lower_batch_size=64), mesh)
    report["indivisible_batch_error"] = None
  except ValueError as error:
    report["indivisible_batch_error"] = str(error)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
