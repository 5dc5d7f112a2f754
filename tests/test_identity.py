"""bilevel._identity.digest: a stable digest of values, and solver specs."""

import dataclasses
import functools
import inspect
import os
import pathlib
import pydoc
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems
from bilevel import _base
from bilevel._identity import MAX_DEPTH, digest
from bilevel._validation import as_optimizer

ROOT = pathlib.Path(__file__).resolve().parent.parent

_SCALE = 2.0
_TABLE = {"scale": 2.0}


def _helper(x):
  return x + 1.0


def _scaled(x):
  return _SCALE * x


def _reads_table(x):
  return _TABLE["scale"] * x


def _calls_helper(x):
  return _helper(x) * jnp.ones(())


def _scale_by(factor):
  def scale(x):
    return factor * x
  return scale


class _Pair(NamedTuple):
  a: Any
  b: Any


@dataclasses.dataclass
class _Record:
  a: Any
  b: Any


class _Opaque:
  __slots__ = ()


class _Model:
  def __init__(self, weight):
    self.weight = weight

  def apply(self, x):
    return self.weight * x


def test_numbers_strings_and_none_by_type_and_value():
  values = [None, True, False, 0, 1, 1.0, -0.0, 0.0, 0.1, 1 + 2j, "1", b"1",
            "a", 2**70]
  digests = [digest(value) for value in values]
  assert len(set(digests)) == len(values)
  assert digest(0.1) == digest(0.1) == digest(float("0.1"))
  assert digest("é") == digest("é")
  assert len(digest(1)) == 64 and int(digest(1), 16) >= 0


def test_arrays_by_dtype_shape_and_bytes():
  a = np.arange(6.0)
  assert digest(a) == digest(np.arange(6.0))
  assert digest(a) != digest(a + 1e-12)
  assert digest(a) != digest(a.astype(np.float32))
  assert digest(a) != digest(a.reshape(2, 3))
  assert digest(a.reshape(2, 3).T) == digest(np.ascontiguousarray(
      a.reshape(2, 3).T))
  x = jnp.arange(6.0)
  assert digest(x) == digest(jnp.arange(6.0))
  assert digest(x) != digest(x.at[0].set(7.0))
  assert digest(np.float64(0.5)) == digest(np.float64(0.5))
  assert digest(np.float64(0.5)) != digest(np.float32(0.5))
  assert digest(np.array([None, 1], dtype=object)) == digest(
      np.array([None, 1], dtype=object))


def test_prng_keys_by_their_data():
  assert digest(jax.random.key(0)) == digest(jax.random.key(0))
  assert digest(jax.random.key(0)) != digest(jax.random.key(1))
  assert digest(jax.random.key(0)) != digest(
      jax.random.key_data(jax.random.key(0)))
  assert digest(jax.random.split(jax.random.key(0))) != digest(
      jax.random.split(jax.random.key(1)))


def test_containers_recursively_with_their_type():
  assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
  assert digest({"a": 1, "b": 2}) != digest({"a": 1, "b": 3})
  assert digest({1: "a", "1": "b"}) == digest({"1": "b", 1: "a"})
  assert digest((1, 2)) != digest([1, 2])
  assert digest((1, 2)) != digest(_Pair(1, 2))
  assert digest(_Pair(1, 2)) == digest(_Pair(1, 2))
  assert digest(_Pair(1, 2)) != digest(_Pair(1, 3))
  assert digest(_Record(1, 2)) == digest(_Record(1, 2))
  assert digest(_Record(1, 2)) != digest(_Record(2, 1))
  assert digest({1, 2, 3}) == digest({3, 2, 1})
  assert digest(frozenset("abc")) == digest(frozenset("cba"))
  assert digest(frozenset("abc")) != digest({"a", "b", "c"})


def test_closures_by_code_and_cell_contents():
  assert digest(_scale_by(2.0)) == digest(_scale_by(2.0))
  assert digest(_scale_by(2.0)) != digest(_scale_by(3.0))
  assert digest(_scale_by(jnp.ones(3))) != digest(_scale_by(jnp.zeros(3)))
  assert digest(lambda x: x + 1) != digest(lambda x: x + 2)
  assert digest(lambda x: x + 1) != digest(lambda x: x * 1)

  def with_default(x, scale=1.0, *, shift=0.0):
    return scale * x + shift

  def with_other_default(x, scale=2.0, *, shift=0.0):
    return scale * x + shift

  def with_other_kwdefault(x, scale=1.0, *, shift=1.0):
    return scale * x + shift

  assert len({digest(with_default), digest(with_other_default),
              digest(with_other_kwdefault)}) == 3


def test_partials_methods_and_wrappers():
  assert digest(functools.partial(_scaled, 1.0)) == digest(
      functools.partial(_scaled, 1.0))
  assert digest(functools.partial(_scaled, 1.0)) != digest(
      functools.partial(_scaled, 2.0))
  assert digest(functools.partial(_scaled, x=1.0)) != digest(
      functools.partial(_scaled, x=2.0))
  assert digest(jax.tree_util.Partial(_scaled, 1.0)) != digest(
      functools.partial(_scaled, 1.0))
  assert digest(_Model(2.0).apply) == digest(_Model(2.0).apply)
  assert digest(_Model(2.0).apply) != digest(_Model(3.0).apply)
  assert digest(_Model(2.0)) != digest(_Model(3.0))

  @functools.wraps(_scaled)
  def wrapper(x):
    return _scaled(x)

  assert digest(wrapper) != digest(_scaled)


def test_jitted_functions_by_the_wrapped_function():
  def f(x):
    return x + 1.0

  def g(x):
    return x + 2.0

  assert digest(jax.jit(f)) == digest(jax.jit(f))
  assert digest(jax.jit(f)) != digest(jax.jit(g))
  assert digest(jax.jit(_scale_by(2.0))) != digest(jax.jit(_scale_by(3.0)))
  assert digest(jax.grad(f)) != digest(jax.grad(g))
  assert digest(jax.vmap(_scale_by(2.0))) != digest(jax.vmap(_scale_by(3.0)))

  def custom(rule_scale):
    @jax.custom_jvp
    def h(x):
      return x

    @h.defjvp
    def _(primals, tangents):
      return primals[0], rule_scale * tangents[0]

    return h

  assert digest(custom(1.0)) == digest(custom(1.0))
  assert digest(custom(1.0)) != digest(custom(2.0))


def test_optax_transformations_by_kind_and_hyperparameters():
  assert digest(optax.sgd(0.05)) == digest(optax.sgd(0.05))
  assert digest(optax.sgd(0.05)) != digest(optax.sgd(0.5))
  assert digest(optax.adam(1e-3)) != digest(optax.sgd(1e-3))
  assert digest(optax.adam(1e-3)) != digest(optax.adam(1e-3, b1=0.8))
  assert digest(optax.sgd(0.1, momentum=0.9)) != digest(optax.sgd(0.1))
  assert digest(optax.chain(optax.clip(1.0), optax.sgd(0.1))) != digest(
      optax.chain(optax.clip(2.0), optax.sgd(0.1)))
  # Through the solvers' conversion of step sizes.
  assert digest(as_optimizer("o", 0.05)) != digest(as_optimizer("o", 0.5))


def test_schedules_by_kind_and_hyperparameters():
  decay = optax.exponential_decay(0.1, 100, 0.5)
  assert digest(decay) == digest(optax.exponential_decay(0.1, 100, 0.5))
  assert digest(decay) != digest(optax.exponential_decay(0.1, 100, 0.6))
  assert digest(decay) != digest(optax.cosine_decay_schedule(0.1, 100))
  assert digest(optax.sgd(decay)) != digest(
      optax.sgd(optax.exponential_decay(0.1, 200, 0.5)))
  assert digest(bilevel.solvers.power_schedule(0.1, 0.5)) != digest(
      bilevel.solvers.power_schedule(0.1, 0.6))
  assert digest(bilevel.solvers.penalty_schedule(10.0, 1e4, 1000)) != digest(
      bilevel.solvers.penalty_schedule(10.0, 1e3, 1000))


def test_globals_that_the_code_reads(monkeypatch):
  before = digest(_scaled)
  monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
  assert digest(_scaled) != before
  monkeypatch.undo()
  assert digest(_scaled) == before
  # Global functions are followed.
  before = digest(_calls_helper)
  monkeypatch.setattr(sys.modules[__name__], "_helper", lambda x: x + 2.0)
  assert digest(_calls_helper) != before
  # Mutable globals (a dict) are seen by their type only (documented).
  before = digest(_reads_table)
  _TABLE["scale"] = 3.0
  try:
    assert digest(_reads_table) == before
  finally:
    _TABLE["scale"] = 2.0


def test_objects_without_addresses():
  assert digest(_Opaque()) == digest(_Opaque())
  assert digest(_Model(jnp.ones(2))) == digest(_Model(jnp.ones(2)))
  assert digest(np.float32) == digest(np.float32)
  assert digest(np.dtype("float32")) != digest(np.dtype("float64"))
  assert digest(len) == digest(len)
  assert digest({}.get) == digest({}.get)
  assert digest({"a": 1}.get) != digest({"a": 2}.get)


def test_cycles_and_depth_terminate():
  cycle = [1]
  cycle.append(cycle)
  other = [1]
  other.append(other)
  assert digest(cycle) == digest(other)
  assert digest(cycle) != digest([1, [1]])
  node = {"value": 1}
  node["self"] = node
  assert digest(node) == digest(node)
  model = _Model(None)
  model.weight = model
  assert digest(model) == digest(model)

  def recursive(n):
    return 0 if n == 0 else recursive(n - 1)

  assert digest(recursive) == digest(recursive)
  # A value shared by two places is a back-reference the second time.
  shared = [1.0]
  assert digest([shared, shared]) != digest([[1.0], [1.0]])
  deep = []
  for _ in range(3 * MAX_DEPTH):
    deep = [deep]
  assert digest(deep) == digest(deep)


def test_tracers_raise_or_are_collected():
  def traced(x):
    with pytest.raises(TypeError, match="tracer"):
      digest({"step_size": x})
    tracers = []
    first = digest({"step_size": x, "other": x, "fixed": 1.0},
                   tracers=tracers)
    assert len(tracers) == 1 and tracers[0] is x
    assert first == digest({"step_size": x, "other": x, "fixed": 1.0},
                           tracers=[])
    assert first != digest({"step_size": x, "other": x, "fixed": 2.0},
                           tracers=[])
    return x

  jax.jit(traced)(jnp.float32(0.5))
  seen = []

  def vmapped(step_size):
    seen.append(digest(optax.sgd(step_size), tracers=[]))
    return step_size

  jax.vmap(vmapped)(jnp.array([0.1, 0.2]))
  jax.vmap(vmapped)(jnp.array([0.3, 0.4]))
  assert seen[0] == seen[1]  # by shape and dtype only
  jax.vmap(vmapped)(jnp.array([0.3, 0.4], jnp.float32))
  assert seen[2] != seen[0]


# Built identically in this process and in fresh ones.
_STABLE = textwrap.dedent("""
    import functools
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    import bilevel
    import problems
    from bilevel._identity import digest

    instance = problems.quadratic(jax.random.key(0), dim_x=5, dim_y=4,
                                  num_samples=64, batch_size=8)
    OFFSET = 0.25

    def upper(x, y, batch):
      if "flag" in {"flag", "other", "third"}:  # a frozenset constant
        return instance.problem.upper(x, y, batch) + OFFSET
      return 0.0

    solver = bilevel.solvers.aid(
        bilevel.Problem(upper=upper, lower=instance.problem.lower),
        upper_optimizer=optax.adam(optax.exponential_decay(0.1, 10, 0.5)),
        lower_optimizer=optax.sgd(0.3, momentum=0.9))
    values = {
        "numbers": [1, 2.5, True, None, "text", {"b": 1, "a": 2}],
        "set": {"alpha", "beta", "gamma", "delta"},
        "array": np.arange(12.0).reshape(3, 4),
        "key": jax.random.key(7),
        "optax": optax.adamw(1e-3, weight_decay=0.1),
        "partial": functools.partial(jnp.clip, min=0.0),
        "jit": jax.jit(upper),
        "problem": solver.spec.problem,
        "hyperparameters": solver.spec.hyperparameters,
        "solver functions": (solver.init, solver.step),
        "data": instance.data.upper,
    }
    digests = {name: digest(value) for name, value in values.items()}
""")


def test_digests_are_identical_in_a_fresh_process():
  namespace = {"__name__": "__main__"}
  exec(_STABLE, namespace)  # pylint: disable=exec-used
  here = namespace["digests"]
  script = _STABLE + "\nimport json\nprint(json.dumps(digests))\n"
  for seed in ("0", "12345"):  # string hashing differs between processes
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=seed),
        cwd=str(ROOT), check=False, timeout=300)
    assert process.returncode == 0, process.stderr
    there = __import__("json").loads(process.stdout.strip().splitlines()[-1])
    assert there == here


def _problem():
  return problems.quadratic(jax.random.key(0), dim_x=3, dim_y=2,
                            num_samples=16, batch_size=4).problem


def test_factories_record_their_arguments():
  problem = _problem()
  solver = bilevel.solvers.aid(problem, upper_optimizer=0.05)
  spec = solver.spec
  assert isinstance(spec, _base.SolverSpec)
  assert spec.name == "aid" and spec.problem is problem
  assert spec.hyperparameters == {
      "upper_optimizer": 0.05, "lower_optimizer": 0.5, "num_lower_steps": 10,
      "linear_solver": None, "warm_start_linear": True}
  assert spec.init is solver.init and spec.step is solver.step
  assert "aid" in repr(spec) and " at 0x" not in repr(spec)
  names = ["aid", "amigo", "bome", "borep", "f2sa", "itd", "lvhba", "ma_soba",
           "penalty", "penalty_momentum", "scalebio", "soba", "stocbio",
           "ttsa"]
  for name in names:
    built = getattr(bilevel.solvers, name)(problem)
    assert built.spec.name == name
    parameters = list(inspect.signature(getattr(bilevel.solvers, name))
                      .parameters)
    assert list(built.spec.hyperparameters) == parameters[1:]
  assert bilevel.BilevelSolver(solver.init, solver.step,
                               solver.oracle_calls).spec is None


def test_recorded_factories_keep_their_signature_and_docs():
  for name in ["aid", "stn", "penalty_momentum", "ttsa"]:
    factory = getattr(bilevel.solvers, name)
    original = factory.__wrapped__
    assert factory.__name__ == name and factory.__doc__ == original.__doc__
    assert inspect.signature(factory) == inspect.signature(original)
    assert str(inspect.signature(original)) in pydoc.render_doc(
        factory, renderer=pydoc.plaintext)
  entry = bilevel.solvers.REGISTRY["aid"]
  assert entry.factory is bilevel.solvers.aid


def test_solvers_hash_and_compare_by_identity():
  problem = _problem()
  first = bilevel.solvers.aid(problem)
  second = bilevel.solvers.aid(problem)
  assert isinstance(hash(first), int)
  assert first == first and first != second
  assert first.spec != second.spec and hash(first.spec) != hash(second.spec)
  # The solver is a static argument of jax.jit.
  instance = problems.quadratic(jax.random.key(0), dim_x=3, dim_y=2,
                                num_samples=16, batch_size=4)
  solver = bilevel.solvers.soba(instance.problem)
  state = solver.init(instance.x0, instance.y0, key=jax.random.key(0),
                      data=instance.data)

  @functools.partial(jax.jit, static_argnums=0)
  def one_step(solver_, state_, data):
    return solver_.step(state_, data)[0]

  assert jnp.all(jnp.isfinite(one_step(solver, state, instance.data).x))


def test_spec_of_a_vmapped_sweep_holds_tracers():
  instance = problems.quadratic(jax.random.key(0), dim_x=3, dim_y=2,
                                num_samples=16, batch_size=4)

  def build(step_size):
    solver = bilevel.solvers.soba(instance.problem,
                                  upper_optimizer=step_size)
    assert isinstance(solver.spec.hyperparameters["upper_optimizer"],
                      jax.core.Tracer)
    tracers = []
    bilevel.checkpoint.fingerprint(None, None, solver=solver,
                                   tracers=tracers)
    assert tracers == [step_size]
    return step_size

  jax.vmap(build)(jnp.array([0.1, 0.2]))
