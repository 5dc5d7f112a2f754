"""Same inputs and key, same bits: within a process and across processes.

Every solver runs a few chunks on a minibatch quadratic. Two runs with the
same key in one process give bit-identical states and histories, and another
key gives another run. Fresh Python processes (with different
``PYTHONHASHSEED``, so that nothing may depend on the order of hashed sets or
on ``hash()``) compute the same SHA-256 digests of every solver's final state
and history as this process. All solvers share one child process, run twice
concurrently: each start costs the import of JAX and five compilations.
"""

import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems

SOLVERS = ("aid", "amigo", "bome", "borep", "f2sa", "itd", "lvhba", "ma_soba",
           "penalty", "penalty_momentum", "scalebio", "soba", "stocbio",
           "ttsa")
KEY = jax.random.key(0)
OTHER_KEY = jax.random.key(1)
TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# The child enables x64 the way tests/conftest.py does, then prints the
# digests of this module's solver_hashes() as one line of JSON.
_CHILD = textwrap.dedent(f"""
    import json
    import sys

    import jax

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, {str(TESTS)!r})
    import test_determinism

    print(json.dumps(test_determinism.solver_hashes()))
""")


@functools.lru_cache(maxsize=None)
def _setup():
  """The problem and one solver object per name (compiled once a process)."""
  instance = problems.quadratic(jax.random.key(0), dim_x=6, dim_y=5,
                                num_samples=64, batch_size=8)
  solvers = {name: getattr(bilevel.solvers, name)(instance.problem)
             for name in SOLVERS}
  return instance, solvers


def _run(name, key):
  instance, solvers = _setup()
  # 12 steps in chunks of 5: three chunks, the last one padded.
  return bilevel.run(solvers[name], instance.x0, instance.y0, instance.data,
                     num_steps=12, key=key, steps_per_chunk=5)


def tree_digest(tree) -> str:
  """SHA-256 of a pytree: its structure, and each leaf's dtype, shape, bytes."""
  digest = hashlib.sha256(str(jax.tree.structure(tree)).encode())
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def solver_hashes() -> dict[str, str]:
  """``{solver name: tree_digest((final state, history))}`` of :func:`_run`."""
  assert jax.config.jax_enable_x64, "enable x64 first, as tests/conftest.py"
  hashes = {}
  for name in SOLVERS:
    result = _run(name, KEY)
    hashes[name] = tree_digest((result.state, result.history))
  return hashes


def test_tree_digest_sees_every_bit_dtype_and_shape():
  base = {"a": jnp.arange(4.0), "b": jnp.zeros(3, jnp.int32)}
  digest = tree_digest(base)
  assert digest == tree_digest(jax.tree.map(jnp.copy, base))
  nudged = dict(base, a=base["a"].at[2].set(jnp.nextafter(2.0, 3.0)))
  variants = [nudged, dict(base, a=base["a"].astype(jnp.float32)),
              dict(base, a=base["a"].reshape(2, 2)), {"a": base["a"]}]
  assert all(tree_digest(variant) != digest for variant in variants)


@pytest.mark.parametrize("name", SOLVERS)
def test_same_key_same_bits_other_key_other_run(name):
  first = _run(name, KEY)
  second = _run(name, KEY)
  chex.assert_trees_all_equal(first.state, second.state)
  chex.assert_trees_all_equal(first.history, second.history)
  assert tree_digest((first.state, first.history)) == tree_digest(
      (second.state, second.history))

  other = _run(name, OTHER_KEY)
  # Another key draws other minibatches: other seeds, iterates and losses
  # (the sampler positions, which count samples, are the same).
  assert not np.array_equal(other.state.sampler.lower.seed,
                            first.state.sampler.lower.seed)
  assert not np.array_equal(other.x, first.x)
  assert not np.array_equal(other.history.upper_loss,
                            first.history.upper_loss)
  if name == "ttsa":
    # TTSA's random truncation draws a key-dependent number of batches.
    assert not np.array_equal(jax.random.key_data(other.state.key),
                              jax.random.key_data(first.state.key))
  else:
    np.testing.assert_array_equal(other.state.sampler.lower.position,
                                  first.state.sampler.lower.position)


def test_bit_identical_across_processes():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  children = [
      subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT,
                       env=dict(env, PYTHONHASHSEED=seed),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
      for seed in ("0", "2718")]
  try:
    in_process = solver_hashes()  # while the children compile
    outputs = [child.communicate(timeout=600) for child in children]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        child.communicate()
  for child, (_, stderr) in zip(children, outputs):
    assert child.returncode == 0, stderr
  hashes = [json.loads(stdout.strip().splitlines()[-1])
            for stdout, _ in outputs]
  assert sorted(in_process) == sorted(SOLVERS)
  assert len(set(in_process.values())) == len(SOLVERS)
  assert hashes[0] == in_process
  assert hashes[1] == in_process
