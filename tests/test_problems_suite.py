"""The data-driven problems: ridge, logistic regularization, hyper-cleaning."""

import functools

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems
from problems import _base
from problems.hyper_cleaning import lower_hessian
from problems.ridge import BRACKET

jax.config.update("jax_enable_x64", True)

# Small sizes where the builders allow them, to keep the file fast.
BUILDERS = {
    "ridge": lambda: problems.ridge(),
    "logistic_ijcnn1": lambda: problems.logistic_regularization(
        dataset="ijcnn1_like", num_train=2000, num_val=1000),
    "logistic_breast_cancer": lambda: problems.logistic_regularization(
        dataset="breast_cancer"),
    "hyper_cleaning": lambda: problems.hyper_cleaning(num_train=100,
                                                      num_val=300),
}
NAMES = sorted(BUILDERS)


@functools.lru_cache(maxsize=None)
def _instance(name):
  return BUILDERS[name]()


def _flat(tree):
  return ravel_pytree(tree)[0]


def _random_x(instance, seed, scale=1.0):
  x0 = instance.x0
  return x0 + scale * jax.random.uniform(jax.random.key(seed), x0.shape,
                                         x0.dtype, -1.0, 1.0)


def _lower_gradient(instance, x, y):
  return _flat(jax.grad(instance.problem.lower, 1)(x, y, instance.data.lower))


@pytest.mark.parametrize("name", NAMES)
def test_names_and_float64_shapes(name):
  instance = _instance(name)
  assert instance.name == name
  leaves = jax.tree.leaves((instance.x0, instance.y0))
  assert all(leaf.dtype == jnp.float64 for leaf in leaves)
  assert not any(jnp.any(leaf) for leaf in leaves)  # both start at zero
  for leaf in jax.tree.leaves(instance.data):
    assert leaf.dtype in (jnp.float64, jnp.int32)
  expected_x = {"ridge": (), "logistic_ijcnn1": (23,),
                "logistic_breast_cancer": (31,), "hyper_cleaning": (100,)}
  assert instance.x0.shape == expected_x[name]
  if name == "hyper_cleaning":
    assert instance.y0["weights"].shape == (64, 10)
    assert instance.y0["bias"].shape == (10,)
  else:
    assert instance.y0.shape == {"ridge": (10,)}.get(name, instance.x0.shape)


@pytest.mark.parametrize("name", NAMES)
def test_lower_solution_is_stationary(name):
  instance = _instance(name)
  for x in (instance.x0, _random_x(instance, 1, scale=3.0)):
    y = instance.lower_solution(x)
    scale = jnp.linalg.norm(_lower_gradient(instance, x, instance.y0))
    assert jnp.linalg.norm(_lower_gradient(instance, x, y)) <= 1e-8 * scale


@pytest.mark.parametrize("name", NAMES)
def test_hypergradient_matches_finite_differences(name):
  instance = _instance(name)
  x = _random_x(instance, 2)
  gradient = instance.hypergradient(x)
  assert gradient.shape == x.shape and gradient.dtype == x.dtype
  step = 1e-5
  for seed in range(3):
    direction = jax.random.normal(jax.random.key(10 + seed), x.shape, x.dtype)
    direction /= jnp.linalg.norm(direction)
    central = (instance.value(x + step * direction)
               - instance.value(x - step * direction)) / (2 * step)
    exact = jnp.vdot(gradient, direction)
    assert abs(central - exact) <= 1e-5 * jnp.linalg.norm(gradient), (
        central, exact)


@pytest.mark.parametrize("name", NAMES)
def test_objectives_on_minibatches_under_jit(name):
  instance = _instance(name)
  size = 16
  batches = [jax.tree.map(lambda leaf: leaf[3:3 + size], level)
             for level in (instance.data.upper, instance.data.lower)]
  y = instance.lower_solution(instance.x0)
  upper = jax.jit(instance.problem.upper)(instance.x0, y, batches[0])
  lower = jax.jit(instance.problem.lower)(instance.x0, y, batches[1])
  assert upper.shape == lower.shape == ()
  assert jnp.isfinite(upper) and jnp.isfinite(lower)
  bilevel.validate(instance.problem, instance.x0, instance.y0, *batches)
  metrics = jax.jit(instance.evaluate)(instance.x0, y)
  assert all(jnp.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("name", ["ridge", "hyper_cleaning"])
def test_stochastic_solver_runs(name):
  instance = _instance(name)
  data = bilevel.Data(instance.data.upper, instance.data.lower, 32, 32)
  solver = bilevel.solvers.soba(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, data, num_steps=20,
                       key=jax.random.key(0))
  assert all(bool(jnp.all(jnp.isfinite(leaf)))
             for leaf in jax.tree.leaves((result.x, result.y)))


@pytest.mark.parametrize("name", NAMES)
def test_float32(name):
  with jax.enable_x64(False):
    instance = BUILDERS[name]()
    leaves = jax.tree.leaves((instance.x0, instance.y0, instance.data))
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in leaves)
    value, gradient = jax.value_and_grad(instance.problem.lower, (0, 1))(
        instance.x0, instance.y0, instance.data.lower)
    assert value.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(gradient))
    if name in ("ridge", "logistic_breast_cancer"):  # the cheap references
      hypergradient = instance.hypergradient(instance.x0)
      assert hypergradient.dtype == jnp.float32
  if name in ("ridge", "logistic_breast_cancer"):
    reference = _instance(name)
    np.testing.assert_allclose(hypergradient,
                               reference.hypergradient(reference.x0),
                               rtol=1e-4)


# Ridge: closed forms.


def test_ridge_closed_form_hypergradient():
  instance = _instance("ridge")
  dense = _base.dense_hypergradient(instance.problem, instance.data,
                                    instance.lower_solution)
  for x in (-8.0, -2.0, 0.0, 3.0):
    x = jnp.asarray(x)
    closed = instance.hypergradient(x)
    np.testing.assert_allclose(closed, jax.grad(instance.value)(x),
                               rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(closed, dense(x), rtol=1e-10, atol=1e-16)


def test_ridge_x_star_is_an_interior_minimum():
  instance = _instance("ridge")
  x_star = instance.x_star
  low, high = BRACKET
  assert x_star is not None and low < x_star < high
  assert abs(instance.hypergradient(x_star)) < 1e-8
  assert jax.grad(instance.hypergradient)(x_star) > 0
  grid = jnp.linspace(low, high, 721)
  assert instance.value(x_star) <= jnp.min(jax.vmap(instance.value)(grid))
  metrics = instance.evaluate(x_star, instance.lower_solution(x_star))
  assert metrics["test_mse"] < instance.evaluate(
      instance.x0, instance.lower_solution(instance.x0))["test_mse"]


def test_ridge_uses_train_statistics():
  instance = _instance("ridge")
  train = instance.data.lower
  np.testing.assert_allclose(train["features"].mean(axis=0), 0, atol=1e-12)
  np.testing.assert_allclose(train["targets"].mean(), 0, atol=1e-12)
  np.testing.assert_allclose(train["targets"].std(), 1, rtol=1e-12)
  hessian = train["features"].T @ train["features"] / len(train["targets"])
  np.testing.assert_allclose(jnp.linalg.eigvalsh(hessian)[-1], 1, rtol=1e-12)


# Logistic regularization.


def test_logistic_ijcnn1_like_default_sizes():
  instance = problems.logistic_regularization()
  assert instance.name == "logistic_ijcnn1"
  features = instance.data.lower["features"]
  assert features.shape == (49_990, 22 + 1)  # 22 features and the intercept
  assert instance.data.upper["features"].shape == (10_000, 23)
  np.testing.assert_array_equal(features[:, -1], 1.0)
  positives = jnp.mean(instance.data.lower["labels"] > 0)
  assert 0.07 < positives < 0.12
  without = problems.logistic_regularization(num_train=100,
                                             fit_intercept=False)
  assert without.data.lower["features"].shape == (100, 22)
  assert without.x0.shape == (22,)
  # The validation rows do not depend on the number of training rows (their
  # standardisation does).
  np.testing.assert_array_equal(without.data.upper["labels"],
                                instance.data.upper["labels"])


def test_logistic_breast_cancer_split():
  instance = _instance("logistic_breast_cancer")
  assert instance.data.lower["features"].shape == (284, 31)
  assert instance.data.upper["features"].shape == (142, 31)
  assert set(np.unique(instance.data.lower["labels"])) == {-1.0, 1.0}
  np.testing.assert_allclose(
      instance.data.lower["features"][:, :-1].mean(axis=0), 0, atol=1e-12)


# Hyper-cleaning.


@pytest.mark.parametrize("corruption", [0.0, 0.3, 0.5, 0.9])
def test_hyper_cleaning_corruption(corruption):
  arrays = problems.hyper_cleaning_data(jax.random.key(3),
                                        corruption=corruption,
                                        num_train=500, num_val=300)
  corrupted = arrays["corrupted"]
  assert corrupted.sum() == round(corruption * 500)
  changed = arrays["train_labels"] != arrays["train_true_labels"]
  np.testing.assert_array_equal(changed, corrupted)
  assert np.all((0 <= arrays["train_labels"]) & (arrays["train_labels"] < 10))


def test_hyper_cleaning_batches_carry_indices_and_weights():
  instance = _instance("hyper_cleaning")
  lower = instance.data.lower
  np.testing.assert_array_equal(lower["index"], np.arange(100))
  arrays = problems.hyper_cleaning_data(num_train=100, num_val=300)
  np.testing.assert_array_equal(lower["labels"], arrays["train_labels"])
  # Only the chosen rows' weights matter for a minibatch.
  y = jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.1), instance.y0)
  batch = jax.tree.map(lambda leaf: leaf[:10], lower)
  gradient = jax.grad(instance.problem.lower)(instance.x0, y, batch)
  assert jnp.all(gradient[10:] == 0) and jnp.all(gradient[:10] != 0)
  corrupted = arrays["corrupted"]
  x = jnp.where(corrupted, -3.0, 3.0)
  metrics = instance.evaluate(x, y)
  np.testing.assert_allclose(metrics["weight_clean"], jax.nn.sigmoid(3.0))
  np.testing.assert_allclose(metrics["weight_corrupted"],
                             jax.nn.sigmoid(-3.0))
  # On average the hypergradient raises clean weights, lowers corrupted ones.
  gradient = instance.hypergradient(instance.x0)
  assert gradient[~corrupted].mean() < 0 < gradient[corrupted].mean()


def test_hyper_cleaning_analytic_hessian():
  instance = _instance("hyper_cleaning")
  x = _random_x(instance, 4, scale=2.0)
  keys = jax.random.split(jax.random.key(5), 3)
  y = {"weights": 0.3 * jax.random.normal(keys[0], (64, 10)),
       "bias": jax.random.normal(keys[1], (10,))}

  def lower(flat):  # rows: the bias, then the rows of W
    matrix = flat.reshape(65, 10)
    y_ = {"weights": matrix[1:], "bias": matrix[0]}
    return instance.problem.lower(x, y_, instance.data.lower)

  stacked = jnp.concatenate([y["bias"][None], y["weights"]]).ravel()
  analytic = lower_hessian(x, y, instance.data.lower, 1e-2).reshape(650, 650)
  for direction in jax.random.normal(keys[2], (3, 650)):
    _, expected = jax.jvp(jax.grad(lower), (stacked,), (direction,))
    np.testing.assert_allclose(analytic @ direction, expected, rtol=1e-11,
                               atol=1e-14)
