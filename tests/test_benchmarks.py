"""The benchmark scripts run; the overhead baseline makes its declared calls."""

import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems
from bilevel import _data

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load_overhead():
  spec = importlib.util.spec_from_file_location("benchmark_overhead",
                                                BENCHMARKS / "overhead.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


overhead = _load_overhead()


def _run_script(name):
  completed = subprocess.run(
      [sys.executable, str(BENCHMARKS / name), "--quick"], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stdout + completed.stderr
  return completed.stdout


def test_overhead_script_quick():
  output = _run_script("overhead.py")
  assert re.search(r"^jax \S+, device ", output, re.MULTILINE)
  for name in overhead.solver_factories():
    row = re.search(rf"^{name}\s+\d+ Gf \+ \d+ Gg \+ \d+ HVP \+ \d+ JVP\s+"
                    r"\d+\+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", output,
                    re.MULTILINE)
    assert row, f"no table row for {name} in:\n{output}"
    step, oracles, ratio = map(float, row.groups())
    assert step > 0 and oracles > 0 and ratio > 0
  assert re.search(r"^ratio = step / oracles \(target < 1\.1\): \w+ worst at "
                   r"[\d.]+", output, re.MULTILINE), output


def test_hypergradient_script_quick():
  output = _run_script("hypergradient.py")
  assert "jaxopt" in output and "float64" in output
  match = re.search(r"^ratio ours/jaxopt = ([\d.]+) at maxiter=(\d+)", output,
                    re.MULTILINE)
  assert match, output
  assert float(match.group(1)) > 0


def test_projection_script_quick():
  output = _run_script("projection.py")
  for dataset in ("fourclass", "breast_cancer"):
    assert f"{dataset}: n = " in output
  ratios = re.findall(r"^BoxOSQP \(jit\)\s+\S+\s+(\S+)$", output, re.MULTILINE)
  assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), output


def test_solvers_are_discovered():
  assert set(overhead.solver_factories()) >= {"aid", "itd", "stocbio", "soba",
                                              "amigo", "scalebio", "lvhba"}
  assert "stn" not in overhead.solver_factories()  # its own problem contract


# What each derivative function counts as: (Gf, Gg, HVP, JVP).
COUNTS_AS = {
    "upper_value_and_grads": (1, 0, 0, 0),
    "lower_grad": (0, 1, 0, 0),
    "lower_hvp": (0, 0, 1, 0),
    "lower_cross": (0, 0, 0, 1),
    "lower_hvp_and_cross": (0, 1, 1, 1),
}
ORACLES = tuple(COUNTS_AS)


def _instrument(monkeypatch, executions, poison=None):
  """Wraps the oracles of ``bilevel.derivatives``.

  Every outermost call (``lower_hvp`` calls ``lower_grad`` inside: that one
  is not an oracle call of its own) counts its executions at run time (a
  debug callback, so calls inside ``lax.scan`` count once per iteration),
  and the outputs of ``poison`` become NaN.
  """
  depth = [0]

  def wrap(name, function):
    def wrapped(*args, **kwargs):
      outermost = depth[0] == 0
      depth[0] += 1
      try:
        out = function(*args, **kwargs)
      finally:
        depth[0] -= 1
      if not outermost:
        return out

      def record():
        executions[name] = executions.get(name, 0) + 1
      jax.debug.callback(record)
      if name == poison:
        out = jax.tree.map(lambda leaf: leaf * jnp.nan, out)
      return out
    return wrapped

  for name in ORACLES:
    monkeypatch.setattr(bilevel.derivatives, name,
                        wrap(name, getattr(bilevel.derivatives, name)))


@pytest.fixture(scope="module")
def stochastic_quadratic():
  return problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                            num_samples=64, batch_size=8)


CALLS = bilevel.OracleCalls(upper_grads=2, lower_grads=3, hvps=4,
                            cross_products=2)
BATCHES = overhead.BatchCounts(upper=1, lower=5)


def _oracle_only(instance, num_steps):
  fun = overhead.oracle_only_steps(instance.problem, CALLS, BATCHES,
                                   instance.data, num_steps=num_steps)
  orders = overhead.random_orders(instance.data, jax.random.key(1))
  v = jnp.full_like(instance.y0, 0.1)
  return jax.block_until_ready(jax.jit(fun)(instance.x0 + 0.1,
                                            instance.y0 + 0.1, v, orders))


def test_oracle_only_makes_the_declared_calls(stochastic_quadratic,
                                              monkeypatch):
  executions = {}
  _instrument(monkeypatch, executions)
  num_steps = 3
  out = _oracle_only(stochastic_quadratic, num_steps)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
  totals = [0, 0, 0, 0]
  for name, count in executions.items():
    for i, weight in enumerate(COUNTS_AS[name]):
      totals[i] += weight * count
  assert totals == [num_steps * c for c in CALLS], executions
  assert "lower_hvp_and_cross" not in executions


@pytest.mark.parametrize("poison", ["upper_value_and_grads", "lower_grad",
                                    "lower_hvp", "lower_cross"])
def test_oracle_only_uses_every_output(stochastic_quadratic, monkeypatch,
                                       poison):
  """A NaN from any oracle reaches the result: XLA cannot drop the call."""
  _instrument(monkeypatch, {}, poison=poison)
  out = _oracle_only(stochastic_quadratic, 1)
  assert any(bool(jnp.any(jnp.isnan(leaf))) for leaf in jax.tree.leaves(out))


@pytest.mark.parametrize("name,kwargs,expected", [
    ("soba", {}, (1, 1)),
    ("aid", dict(num_lower_steps=3), (1, 4)),
    ("stocbio", dict(num_lower_steps=2, num_neumann_terms=3), (1, 6)),
])
def test_batches_per_step(stochastic_quadratic, name, kwargs, expected):
  instance = stochastic_quadratic
  solver = getattr(bilevel.solvers, name)(instance.problem, **kwargs)
  state = solver.init(instance.x0, instance.y0, key=jax.random.key(0),
                      data=instance.data)
  # 5 steps of up to 6 batches of 8 wrap the 64-sample epochs several times.
  result = bilevel.run(solver, None, None, instance.data, num_steps=5,
                       state=state)
  assert tuple(overhead.batches_per_step(state, result.state, instance.data,
                                         5)) == expected


def test_sampler_only_runs(stochastic_quadratic):
  data = stochastic_quadratic.data
  fun = overhead.sampler_only_steps(data, BATCHES, num_steps=4)
  sampler = _data.init_sampler(data, jax.random.key(0))
  total = jax.jit(fun)(sampler)
  assert math.isfinite(float(total))


def test_cyclic_sampler(stochastic_quadratic):
  """Patched draws read the fixed order and advance the stream alike."""
  data = stochastic_quadratic.data  # 64 rows, batches of 8
  order = np.random.default_rng(0).permutation(64)
  sampler = _data.init_sampler(data, jax.random.key(0))
  # 11 batches of 8: wraps the 64-row epoch once.
  expected, expected_sampler = _data.sample_many(sampler, data, "lower", 11)
  with overhead.cyclic_sampler({64: order}):
    batches, new_sampler = jax.jit(
        lambda s: _data.sample_many(s, data, "lower", 11))(sampler)
  rows = order[np.arange(88) % 64].reshape(11, 8)
  for got, leaf, reference in zip(jax.tree.leaves(batches),
                                  jax.tree.leaves(data.lower),
                                  jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, np.asarray(leaf)[rows])
    assert got.shape == reference.shape
  assert int(new_sampler.lower.position) == 24
  assert int(new_sampler.lower.epoch) == 1
  assert tuple(new_sampler.lower[1:]) == tuple(expected_sampler.lower[1:])
  # Outside the context the library's draw is back.
  again, _ = _data.sample_many(sampler, data, "lower", 11)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_long_runs_script_quick():
  output = _run_script("long_runs.py")
  for name in ("unchecked", "checked", "ckpt/1", "ckpt/2"):
    assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+", output,
                     re.MULTILINE), output
  assert re.search(r"largest difference to the uninterrupted run = 0\.0$",
                   output, re.MULTILINE), output
