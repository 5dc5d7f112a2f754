"""Every solver in float64, float32 and bfloat16, and mixed precision.

What is checked, for each solver (the numbers behind ``docs/dtypes.md``):

* full :func:`bilevel.run` calls of several chunks, with minibatches on a
  problem whose constants are float32 (built with x64 disabled) and in full
  batch on one whose constants are float64: the state keeps the dtypes (and
  weak types) that ``init`` gave it, so float64 constants never promote
  float32 variables; the diagnostics are finite; float32 and bfloat16 runs
  track the float64 run of the same problem; float32 runs are bit-identical
  with and without ``jax_enable_x64``;
* bfloat16 variables, with float32 or bfloat16 constants: the run gets
  within a few percent of ``x*``, then stalls (the documented limitation of
  bfloat16 iterates);
* pytrees whose leaves mix dtypes, and the linear solvers in bfloat16.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems
from bilevel import linear_solve

SOLVERS = ("aid", "amigo", "itd", "soba", "stocbio")
# Every solver, for the tests of dtype stability and run-to-run tracking at
# default hyperparameters (the accuracy tests below use SOLVERS and their
# ACCURATE settings).
ALL_SOLVERS = SOLVERS + ("borep", "ma_soba", "ttsa", "penalty",
                         "penalty_momentum", "f2sa", "bome", "lvhba",
                         "scalebio")
# MA-SOBA's moving average (momentum 0.9) barely moves x in 12 steps, nor
# do the penalty method's and BOME's default steps.
DEFAULTS = {"ma_soba": dict(momentum=0.5),
            # lambda multiplies the rounding of grad_x g(y) - grad_x g(z)
            # (error ~ lambda u): at the default lambda_0 = 10 bfloat16 ends
            # 0.11 (penalty) and 0.52 (penalty_momentum) from float64.
            "penalty": dict(upper_optimizer=1.0, penalty=1.0),
            "penalty_momentum": dict(upper_optimizer=1.0, penalty=1.0),
            "bome": dict(step_size=0.5),
            "lvhba": dict(step_size=0.5, saddle_step_size=0.5, penalty_base=0.2),
            # With the default AdamW steps (1e-3 for the models) w and u
            # separate too slowly for x to move in 12 steps.
            "scalebio": dict(upper_optimizer=1.0, lower_optimizer=0.05)}

# Step sizes with which every solver converges fast on the quadratics below
# (condition number 10), as in tests/test_solvers.py: ITD and StocBiO need
# long inner loops for their truncation bias to fall below 1e-5.
ACCURATE = {
    "aid": dict(upper_optimizer=1.0, lower_optimizer=1.0),
    "amigo": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                  linear_optimizer=1.0),
    "itd": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                num_lower_steps=100),
    "soba": dict(upper_optimizer=0.5, lower_optimizer=1.0,
                 linear_optimizer=1.0),
    "stocbio": dict(upper_optimizer=1.0, lower_optimizer=1.0,
                    neumann_step_size=1.0, num_neumann_terms=100),
}

KEY = jax.random.key(0)
NUM_STEPS = 12
STEPS_PER_CHUNK = 5  # three chunks, the last one padded

# float32 against float64 on the same problem: the unit roundoff of float32
# is u = 2**-24 = 6e-8. Each step rounds its results to about u and passes
# the earlier rounding errors on through contractions whose amplification is
# bounded by the condition numbers (10 for the lower level, 11 for the
# hyper-objective): after 12 steps the relative gap is at most of the order
# of 12 * 11 * u = 8e-6, and is measured at 8e-7 at most (the history of
# ITD and AID). 2e-5 leaves a margin of 25 over what is measured, and still
# fails at once if anything in a float32 run were computed in bfloat16.
FLOAT32_RTOL = 2e-5
# bfloat16 against float64: the same argument with u = 2**-9 = 2e-3 gives
# 12 * 11 * u = 0.26, a bound too pessimistic to test anything; measured:
# 3e-2 at most (ITD's history), 2e-2 for the states. 0.1 is 50 u.
BFLOAT16_RTOL = 0.1


def _float32_minibatch_instance():
  """A small quadratic built with x64 disabled: float32 constants and data.

  The data are rounded to bfloat16 values (stored in float32), so that the
  float64, float32 and bfloat16 runs all see exactly the same samples.
  """
  with jax.enable_x64(False):
    instance = problems.quadratic(KEY, dim_x=6, dim_y=5, num_samples=64,
                                  batch_size=8)
  assert instance.x0.dtype == jnp.float32
  data = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32),
                      instance.data)
  return instance._replace(data=data)


def _float64_instance():
  """The same quadratic built with x64 enabled: float64 constants."""
  instance = problems.quadratic(KEY, dim_x=6, dim_y=5)
  assert instance.x0.dtype == jnp.float64
  return instance


def _solver(name, problem, **kwargs):
  return getattr(bilevel.solvers, name)(problem, **kwargs)


def _run(solver, x0, y0, data=None, **kwargs):
  """``(init_state, result)`` of a chunked run."""
  init = solver.init(x0, y0, key=KEY, data=data)
  kwargs = {"num_steps": NUM_STEPS, "steps_per_chunk": STEPS_PER_CHUNK,
            **kwargs}
  return init, bilevel.run(solver, x0, y0, data, key=KEY, **kwargs)


def _assert_same_types(tree, reference):
  """Same structure, dtypes and weak types, leaf by leaf."""
  chex.assert_trees_all_equal_dtypes(tree, reference)
  weak = [jax.typeof(leaf).weak_type for leaf in jax.tree.leaves(tree)]
  assert weak == [jax.typeof(leaf).weak_type
                  for leaf in jax.tree.leaves(reference)]


def _plain(tree):
  """``tree`` with PRNG key leaves (TTSA's state) as their raw key data."""
  return jax.tree.map(
      lambda leaf: jax.random.key_data(leaf) if jnp.issubdtype(
          leaf.dtype, jax.dtypes.prng_key) else leaf, tree)


def _floating_leaves(tree):
  return [leaf for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)]


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), tree


def _gap(value, reference) -> float:
  """``||value - reference|| / ||reference||``, computed in float64."""
  value = np.asarray(value, np.float64)
  reference = np.asarray(reference, np.float64)
  return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _assert_close_runs(result, reference, rtol):
  """The floating state leaves and the diagnostics agree to ``rtol``.

  Integer leaves (sampler positions and seeds, step counts) must be equal:
  minibatches are drawn the same way in every precision. The linear-system
  residual is left out: once a solve has converged it is rounding noise
  (1e-16 in float64, 1e-7 in float32), which no relative tolerance relates.
  """
  for leaf, ref in zip(jax.tree.leaves(_plain(result.state)),
                       jax.tree.leaves(_plain(reference.state))):
    if jnp.issubdtype(ref.dtype, jnp.floating):
      assert _gap(leaf, ref) <= rtol, (leaf, ref)
    else:
      np.testing.assert_array_equal(leaf, ref)
  for field in ("upper_loss", "lower_grad_norm", "hypergradient_norm"):
    assert _gap(getattr(result.history, field),
                getattr(reference.history, field)) <= rtol, field


# --------------------------------------------------------- float32 / float64


def _check_run(init, result, dtype):
  """The checks every run passes, whatever its precision."""
  # Every state leaf keeps the dtype (and weak type) init gave it, and init
  # gave every floating leaf (x, y, v, optimizer states) the variables'
  # dtype: the constants do not leak into the state.
  _assert_same_types(result.state, init)
  assert {leaf.dtype for leaf in _floating_leaves(init)} == {
      jnp.dtype(dtype)}
  assert int(result.state.num_steps) == result.history.upper_loss.shape[0]
  _assert_finite(result.history)


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_float32_constants_with_minibatches(name):
  """float32 constants and data; float64, float32 and bfloat16 variables.

  The float64 run (the constants promoted) is the reference. The float32 run
  tracks it to ``FLOAT32_RTOL``, and is bit-identical with x64 disabled: a
  float32 run computes nothing in float64 when x64 is on. The bfloat16 run
  (data cast to bfloat16 too) tracks it to ``BFLOAT16_RTOL``.
  """
  instance = _float32_minibatch_instance()
  solver = _solver(name, instance.problem, **DEFAULTS.get(name, {}))
  results = {}
  for dtype in (jnp.float64, jnp.float32, jnp.bfloat16):
    data = instance.data
    if dtype == jnp.bfloat16:
      data = jax.tree.map(lambda a: a.astype(jnp.bfloat16), data)
    init, results[dtype] = _run(solver, instance.x0.astype(dtype),
                                instance.y0.astype(dtype), data)
    _check_run(init, results[dtype], dtype)
  reference = results[jnp.float64]
  # The runs moved (closeness of two frozen runs would prove nothing).
  assert np.linalg.norm(reference.x) > 0.1 * np.linalg.norm(instance.x_star)
  _assert_close_runs(results[jnp.float32], reference, FLOAT32_RTOL)
  _assert_close_runs(results[jnp.bfloat16], reference, BFLOAT16_RTOL)
  with jax.enable_x64(False):
    _, without_x64 = _run(solver, instance.x0, instance.y0, instance.data)
  chex.assert_trees_all_equal(_plain(without_x64.state),
                              _plain(results[jnp.float32].state))
  chex.assert_trees_all_equal(without_x64.history,
                              results[jnp.float32].history)


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_float64_constants_with_float32_variables(name):
  """float64 constants, full batch: float32 variables stay float32.

  The objectives promote float32 variables to float64 (their values, hence
  ``upper_loss``, are float64), but the state keeps float32 and tracks the
  float64 run to ``FLOAT32_RTOL``.
  """
  instance = _float64_instance()
  solver = _solver(name, instance.problem, **DEFAULTS.get(name, {}))
  results = {}
  for dtype in (jnp.float64, jnp.float32):
    init, results[dtype] = _run(solver, instance.x0.astype(dtype),
                                instance.y0.astype(dtype))
    _check_run(init, results[dtype], dtype)
  assert results[jnp.float32].history.upper_loss.dtype == jnp.float64
  reference = results[jnp.float64]
  assert np.linalg.norm(reference.x) > 0.1 * np.linalg.norm(instance.x_star)
  _assert_close_runs(results[jnp.float32], reference, FLOAT32_RTOL)


# ------------------------------------------------------------------ bfloat16


@functools.lru_cache(maxsize=None)
def _quadratic_constants():
  """The matrices of a float64 quadratic, recovered by differentiation.

  :func:`problems.quadratic` builds ``g = y'Ay/2 + y'(Bx + a)`` and
  ``f = (y - c)'P(y - c)/2 + mu |x|^2/2`` in the default precision; the
  constants are read back from its derivatives at zero so that they can be
  rounded to any dtype.
  """
  instance = problems.quadratic(KEY, dim_x=10, dim_y=8)
  problem = instance.problem
  x = jnp.zeros(10, jnp.float64)
  y = jnp.zeros(8, jnp.float64)
  a_matrix = jax.hessian(problem.lower, 1)(x, y, None)
  b_matrix = jax.jacobian(jax.grad(problem.lower, 1), 0)(x, y, None)
  a_vector = jax.grad(problem.lower, 1)(x, y, None)
  p_matrix = jax.hessian(problem.upper, 1)(x, y, None)
  c_vector = -jnp.linalg.solve(p_matrix,
                               jax.grad(problem.upper, 1)(x, y, None))
  mu = jax.hessian(problem.upper, 0)(x, y, None)[0, 0]
  return a_matrix, b_matrix, a_vector, p_matrix, c_vector, mu


@functools.lru_cache(maxsize=None)
def _rounded_quadratic(dtype):
  """The quadratic with constants rounded to ``dtype``, and its ``x*``.

  ``x*`` is that of the rounded problem, in float64 (closed form), so that
  the error measured is the solver's and not the rounding of the problem.
  """
  constants = [c.astype(dtype) for c in _quadratic_constants()]
  a_matrix, b_matrix, a_vector, p_matrix, c_vector, mu = constants

  def lower(x, y, batch):
    del batch
    return 0.5 * y @ a_matrix @ y + y @ (b_matrix @ x + a_vector)

  def upper(x, y, batch):
    del batch
    residual = y - c_vector
    return 0.5 * residual @ p_matrix @ residual + 0.5 * mu * x @ x

  a64, b64, av64, p64, c64, mu64 = [c.astype(jnp.float64) for c in constants]
  m_matrix = -jnp.linalg.solve(a64, b64)
  m_vector = -jnp.linalg.solve(a64, av64)
  x_star = -jnp.linalg.solve(
      m_matrix.T @ p64 @ m_matrix + mu64 * jnp.eye(b64.shape[1]),
      m_matrix.T @ p64 @ (m_vector - c64))
  return bilevel.Problem(upper, lower), x_star


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("constants", [jnp.float32, jnp.bfloat16],
                         ids=["float32_constants", "bfloat16_constants"])
def test_bfloat16_gets_near_x_star_then_stalls(name, constants):
  """bfloat16 iterates reach a relative error of about 1e-2 and stop.

  An update ``x - lr * h`` rounds back to ``x`` once ``lr * |h|`` is below
  half a unit in the last place of ``x`` (8 significant bits): the run stalls
  where the hypergradient is about ``2**-9 |x| / lr``, a relative error of
  about ``2**-9 / (lr mu)`` for a ``mu``-strongly convex hyper-objective.
  This is the documented limit of bfloat16 (docs/dtypes.md); float32 runs of
  the same problem go on to 1e-6 (SOBA: 2e-4 at this step, still moving).
  """
  problem, x_star = _rounded_quadratic(constants)
  solver = _solver(name, problem, **ACCURATE[name])
  x0 = jnp.zeros(10, jnp.bfloat16)
  y0 = jnp.zeros(8, jnp.bfloat16)
  init, result = _run(solver, x0, y0, num_steps=150, steps_per_chunk=50)
  _assert_same_types(result.state, init)
  assert {leaf.dtype for leaf in _floating_leaves(init)} == {
      jnp.dtype(jnp.bfloat16)}
  _assert_finite(result.history)
  # From x0 = 0 (relative error 1) to within 3% of x*.
  error = _gap(result.x, x_star)
  assert error <= 3e-2
  # Stalled: 50 more steps leave x and y exactly where they are.
  more = bilevel.run(solver, None, None, num_steps=50, steps_per_chunk=50,
                     state=result.state)
  np.testing.assert_array_equal(more.x, result.x)
  np.testing.assert_array_equal(more.y, result.y)


# --------------------------------------------------------- mixed precision


def _mixed_problem():
  """A separable quadratic on pytrees whose leaves mix dtypes.

  ``g = sum_i d_i y_i^2 / 2 - y_i x_i`` and
  ``f = |y - t|^2 / 2 + mu |x|^2 / 2`` give ``y*(x) = x / d`` and
  ``x* = (t / d) / (1 / d^2 + mu)`` elementwise.
  """
  curvature = {"a": jnp.array([1.0, 0.95, 0.9], jnp.float32),
               "b": jnp.array([0.97, 0.92], jnp.float32)}
  target = {"a": jnp.array([1.0, -2.0, 0.5], jnp.float32),
            "b": jnp.array([1.5, -1.0], jnp.float32)}
  mu = 0.1

  def tree_sum(tree):
    return sum(jnp.sum(leaf.astype(jnp.float32))
               for leaf in jax.tree.leaves(tree))

  def lower(x, y, batch):
    del batch
    return tree_sum(jax.tree.map(
        lambda d, y_, x_: 0.5 * d * y_ * y_ - y_ * x_, curvature, y, x))

  def upper(x, y, batch):
    del batch
    return (tree_sum(jax.tree.map(lambda y_, t: 0.5 * (y_ - t) ** 2, y,
                                  target))
            + 0.5 * mu * tree_sum(jax.tree.map(lambda x_: x_ * x_, x)))

  def solution(d, t):
    d, t = np.asarray(d, np.float64), np.asarray(t, np.float64)
    return t / d / (1.0 / d ** 2 + mu)

  x_star = jax.tree.map(solution, curvature, target)
  return bilevel.Problem(upper, lower), x_star


@pytest.mark.parametrize("name", SOLVERS)
def test_pytrees_mixing_dtypes(name):
  """Each leaf keeps its own dtype and converges to its own precision.

  Leaf "a" of ``x`` and ``y`` is float32, leaf "b" bfloat16; the problem is
  separable, so the float32 block can reach float32 accuracy although it
  shares the linear solves (CG's step lengths, say) with the bfloat16
  block. AID's CG failed to trace on such pytrees before it ran in a common
  working dtype (``bilevel/linear_solve.py``).
  """
  problem, x_star = _mixed_problem()
  x0 = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
  y0 = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.bfloat16)}
  kwargs = dict(ACCURATE[name])
  if name == "soba":
    # The single loop lags x two steps behind y and v: at 0.5 it oscillates
    # on this problem, in float64 as well.
    kwargs["upper_optimizer"] = 0.2
  solver = _solver(name, problem, **kwargs)
  init, result = _run(solver, x0, y0, num_steps=100, steps_per_chunk=50)
  _assert_same_types(result.state, init)
  _assert_finite(result.history)
  # Measured: 2e-8 to 6e-8 for the float32 block, 1e-3 to 6e-3 for the
  # bfloat16 one (its stall, see above).
  assert _gap(result.x["a"], x_star["a"]) <= 1e-6
  assert _gap(result.x["b"], x_star["b"]) <= 2e-2


# ------------------------------------------------------------ linear solves


def _spd(key, dim, condition_number):
  basis, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
  eigenvalues = jnp.logspace(0.0, -np.log10(condition_number), dim)
  return (basis * eigenvalues) @ basis.T


LINEAR_SOLVERS = {
    "cg": lambda matvec, b: linear_solve.cg(tol=0.0, maxiter=50).solve(
        matvec, b),
    "neumann": lambda matvec, b: linear_solve.neumann_series(
        matvec, b, step_size=1.0, num_terms=2000),
}


@pytest.mark.parametrize("method", sorted(LINEAR_SOLVERS))
def test_bfloat16_linear_solve_reaches_rounding_floor(method):
  """bfloat16 products, float32 recurrences: as accurate as bfloat16 gets.

  The solution of the (bfloat16) system is known exactly; merely rounding
  it to bfloat16 costs a relative 1.5e-3. Both solvers land within 3 times
  that (measured: 1.7e-3 for CG, 2.1e-3 for Neumann); run in bfloat16
  throughout, CG stopped at 1.1e-2 and the Neumann series at 1.7e-1 (the
  corrections fall below half a unit in the last place of the iterate and
  are lost).
  """
  matrix = _spd(jax.random.key(1), 50, 100.0).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (50,)).astype(jnp.bfloat16)
  exact = np.linalg.solve(np.asarray(matrix, np.float64),
                          np.asarray(b, np.float64))
  seen = []

  def matvec(u):
    seen.append(u.dtype)
    return matrix @ u

  solution = jax.jit(lambda b_: LINEAR_SOLVERS[method](matvec, b_))(b)
  assert solution.dtype == jnp.bfloat16
  assert set(seen) == {jnp.dtype(jnp.bfloat16)}  # products stay bfloat16
  rounding = _gap(exact.astype(jnp.bfloat16), exact)
  assert 1e-3 < rounding < 3e-3
  assert _gap(solution, exact) <= 3 * rounding


@pytest.mark.parametrize("method", sorted(LINEAR_SOLVERS))
@pytest.mark.parametrize("dtypes", [(jnp.bfloat16, jnp.float32),
                                    (jnp.float32, jnp.float64)],
                         ids=["bfloat16_float32", "float32_float64"])
def test_linear_solve_on_pytree_mixing_dtypes(method, dtypes):
  low, high = dtypes
  matrix = _spd(jax.random.key(3), 7, 10.0)
  b64 = jax.random.normal(jax.random.key(4), (7,))
  b = {"low": b64[:4].astype(low), "high": b64[4:].astype(high)}

  def matvec(u):
    assert u["low"].dtype == low and u["high"].dtype == high
    flat = jnp.concatenate([u["low"].astype(jnp.float64),
                            u["high"].astype(jnp.float64)])
    product = matrix @ flat
    return {"low": product[:4].astype(low), "high": product[4:].astype(high)}

  solution = jax.jit(lambda b_: LINEAR_SOLVERS[method](matvec, b_))(b)
  assert solution["low"].dtype == low and solution["high"].dtype == high
  exact = np.linalg.solve(
      np.asarray(matrix),
      np.concatenate([np.asarray(b["low"], np.float64),
                      np.asarray(b["high"], np.float64)]))
  # Accurate to the precision of the narrower leaf, rounding of the
  # products included.
  tolerance = 20 * float(jnp.finfo(low).eps)
  assert _gap(solution["low"], exact[:4]) <= tolerance
  assert _gap(solution["high"], exact[4:]) <= tolerance
