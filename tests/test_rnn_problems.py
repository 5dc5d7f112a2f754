"""The recurrent-network problems of problems/rnn.py.

The encoders against a plain Python loop; the datasets (digits read row by
row, MNIST-1D generated offline); label noise drawn once per key; clean,
disjoint splits; few-shot tasks; every builder's shapes, dtypes and one
jitted SOBA step; the hyper-representation references against finite
differences; and a short SOBA run that learns.
"""

import functools
import socket
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from jax.flatten_util import ravel_pytree

import bilevel
import problems
from problems import rnn

jax.config.update("jax_enable_x64", True)

MNIST1D_SAMPLES = 1000  # small, so that generating it is quick
SMALL = {
    "rnn_hyper_cleaning": dict(num_train=200, num_val=100, batch_size=16,
                               hidden_dim=8),
    "rnn_hyperparameter": dict(num_train=200, num_val=100, batch_size=16,
                               hidden_dim=8),
    "rnn_hyper_representation": dict(num_tasks=12, num_test_tasks=6,
                                     task_batch_size=4, hidden_dim=8),
}
BUILDERS = sorted(SMALL)


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
  # LAPACK (the Newton solves of the hyper-representation references) runs on
  # OpenBLAS, whose threads spin and slow down by orders of magnitude when
  # the cores are shared with other test workers.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


@functools.lru_cache(maxsize=None)
def _instance(name, cell="elman", dataset="digits"):
  return getattr(problems, name)(jax.random.key(0), cell=cell,
                                 dataset=dataset,
                                 mnist1d_samples=MNIST1D_SAMPLES,
                                 **SMALL[name])


# ----------------------------------------------------------------- network


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_init_rnn_shapes_and_glorot_bounds(cell):
  params = rnn.init_rnn(jax.random.key(1), 3, 5, cell)
  gates = 4 if cell == "lstm" else 1
  assert params["input"].shape == (3, 5 * gates)
  assert params["recurrent"].shape == (5, 5 * gates)
  assert params["bias"].shape == (5 * gates,)
  assert all(leaf.dtype == jnp.float64 for leaf in params.values())
  assert np.max(np.abs(params["input"])) <= np.sqrt(6 / 8)
  assert np.max(np.abs(params["recurrent"])) <= np.sqrt(6 / 10)
  expected_bias = np.zeros((gates, 5))
  if cell == "lstm":
    expected_bias[1] = 1.0  # the forget gate
  np.testing.assert_array_equal(params["bias"], expected_bias.ravel())
  float32 = rnn.init_rnn(jax.random.key(1), 3, 5, cell, jnp.float32)
  assert all(leaf.dtype == jnp.float32 for leaf in float32.values())


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def _reference_encode(params, sequences, cell):
  """The recurrence written out, one sequence and one time step at a time."""
  w_x, w_h, b = (np.asarray(params[k])
                 for k in ("input", "recurrent", "bias"))
  hidden = w_h.shape[0]
  features = []
  for sequence in np.asarray(sequences):
    h, c = np.zeros(hidden), np.zeros(hidden)
    for s_t in sequence:
      z = s_t @ w_x + h @ w_h + b
      if cell == "elman":
        h = np.tanh(z)
      else:
        i, f, u, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(u)
        h = _sigmoid(o) * np.tanh(c)
    features.append(h)
  return np.stack(features)


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_encode_matches_a_python_loop(cell):
  shapes = jax.eval_shape(lambda: rnn.init_rnn(jax.random.key(0), 4, 6,
                                               cell))
  keys = jax.random.split(jax.random.key(2), 4)
  params = {name: jax.random.normal(key, shape.shape)
            for key, (name, shape) in zip(keys, sorted(shapes.items()))}
  sequences = jax.random.normal(keys[3], (2, 3, 7, 4))
  features = rnn.encode(params, sequences, cell)
  assert features.shape == (2, 3, 6)
  expected = _reference_encode(params, sequences.reshape(6, 7, 4), cell)
  np.testing.assert_allclose(features.reshape(6, 6), expected, rtol=0,
                             atol=1e-12)
  assert np.std(expected) > 0.1  # not saturated: the test has teeth


def test_bad_cell_and_dataset():
  with pytest.raises(ValueError, match="cell"):
    rnn.init_rnn(jax.random.key(0), 2, 3, "gru")
  with pytest.raises(ValueError, match="dataset"):
    problems.rnn_hyperparameter(dataset="mnist")


# ---------------------------------------------------------------- datasets


def test_digits_read_row_by_row():
  from sklearn.datasets import load_digits
  sequences, labels = rnn.digits_sequences()
  assert sequences.shape == (1797, 8, 8) and labels.shape == (1797,)
  flat, targets = load_digits(return_X_y=True)
  np.testing.assert_array_equal(sequences[:, 3, :], flat[:, 24:32] / 16)
  np.testing.assert_array_equal(labels, targets)
  assert sequences.min() == 0.0 and sequences.max() == 1.0


def test_mnist1d_is_generated_offline_without_side_effects(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("mnist1d_sequences touched the network")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  np.random.seed(7)
  expected_draw = np.random.rand()
  np.random.seed(7)
  sequences, labels = rnn.mnist1d_sequences(137, seed=3)
  assert np.random.rand() == expected_draw  # the global state is restored
  assert sequences.shape == (130, 40, 1) and sequences.dtype == np.float64
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 13))
  assert abs(sequences.mean()) < 1e-6 and abs(sequences.std() - 1) < 1e-6
  again, _ = rnn.mnist1d_sequences(137, seed=3)
  other, _ = rnn.mnist1d_sequences(137, seed=4)
  np.testing.assert_array_equal(again, sequences)
  assert not np.array_equal(other, sequences)


def test_mnist1d_import_error_names_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "mnist1d", None)
  monkeypatch.setitem(sys.modules, "mnist1d.data", None)
  with pytest.raises(ImportError, match="pip install mnist1d"):
    rnn.mnist1d_sequences(111, seed=5)  # not cached


# ------------------------------------------------------ noise and splits


def test_label_noise_is_drawn_once_per_key():
  arrays = rnn.rnn_classification_data(jax.random.key(3), corruption=0.3,
                                       num_train=1000, num_val=300)
  corrupted = arrays["corrupted"]
  assert corrupted.sum() == 300
  noisy, true = arrays["train_labels"], arrays["train_true_labels"]
  assert np.all(noisy[corrupted] != true[corrupted])
  np.testing.assert_array_equal(noisy[~corrupted], true[~corrupted])
  assert noisy.min() >= 0 and noisy.max() < 10
  # The corrupted labels are spread over the other classes.
  assert len(np.unique((noisy - true)[corrupted] % 10)) == 9

  same = rnn.rnn_classification_data(jax.random.key(3), corruption=0.3,
                                     num_train=1000, num_val=300)
  for name in arrays:
    np.testing.assert_array_equal(same[name], arrays[name])
  other = rnn.rnn_classification_data(jax.random.key(4), corruption=0.3,
                                      num_train=1000, num_val=300)
  assert not np.array_equal(other["train_rows"], arrays["train_rows"])

  # The builder trains on exactly these labels, and only on them.
  instance = problems.rnn_hyper_cleaning(jax.random.key(3), num_train=1000,
                                         num_val=300)
  np.testing.assert_array_equal(instance.data.lower["labels"], noisy)
  np.testing.assert_array_equal(instance.data.lower["index"],
                                np.arange(1000))
  assert instance.x0.shape == (1000,)
  with pytest.raises(ValueError, match="corruption"):
    rnn.rnn_classification_data(corruption=1.5)


@pytest.mark.parametrize("dataset", rnn.DATASETS)
def test_validation_and_test_splits_are_clean_and_disjoint(dataset):
  sequences, labels = (rnn.digits_sequences() if dataset == "digits" else
                       rnn.mnist1d_sequences(MNIST1D_SAMPLES))
  arrays = rnn.rnn_classification_data(
      jax.random.key(5), dataset=dataset, corruption=0.5, num_train=200,
      num_val=100, mnist1d_samples=MNIST1D_SAMPLES)
  rows = [arrays[f"{part}_rows"] for part in ("train", "val", "test")]
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)),
                                np.arange(len(labels)))
  for part, part_rows in zip(("train", "val", "test"), rows):
    np.testing.assert_array_equal(arrays[f"{part}_sequences"],
                                  sequences[part_rows])
  np.testing.assert_array_equal(arrays["val_labels"], labels[rows[1]])
  np.testing.assert_array_equal(arrays["test_labels"], labels[rows[2]])
  np.testing.assert_array_equal(arrays["train_true_labels"],
                                labels[rows[0]])

  instance = problems.rnn_hyper_cleaning(
      jax.random.key(5), dataset=dataset, corruption=0.5, num_train=200,
      num_val=100, mnist1d_samples=MNIST1D_SAMPLES)
  np.testing.assert_array_equal(instance.data.upper["labels"],
                                labels[rows[1]])
  np.testing.assert_array_equal(instance.data.upper["sequences"],
                                sequences[rows[1]])


def test_tasks_relabel_distinct_classes_with_disjoint_support_and_query():
  _, labels = rnn.digits_sequences()
  ways, shots = 4, 3
  arrays = rnn.rnn_tasks_data(jax.random.key(6), num_tasks=30,
                              num_test_tasks=20, ways=ways, shots=shots)
  training_rows, test_rows = set(), set()
  for prefix, num, rows in (("", 30, training_rows),
                            ("test_", 20, test_rows)):
    classes = arrays[prefix + "classes"]
    assert classes.shape == (num, ways)
    assert arrays[prefix + "support_sequences"].shape == (
        num, ways * shots, 8, 8)
    for t in range(num):
      assert len(set(classes[t])) == ways
      for part in ("support", "query"):
        new = arrays[prefix + part + "_labels"][t]
        np.testing.assert_array_equal(np.bincount(new, minlength=ways),
                                      np.full(ways, shots))
        np.testing.assert_array_equal(
            labels[arrays[prefix + part + "_rows"][t]], classes[t][new])
      support = set(arrays[prefix + "support_rows"][t])
      query = set(arrays[prefix + "query_rows"][t])
      assert len(support) == len(query) == ways * shots
      assert not support & query
      rows |= support | query
  assert not training_rows & test_rows
  # The classes of the tasks vary.
  assert len({tuple(c) for c in arrays["classes"]}) > 20
  with pytest.raises(ValueError, match="rows"):
    rnn.rnn_tasks_data(shots=200)


# ------------------------------------------------------------- builders


def _batch_spec(arrays, batch_size):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
          a.shape if batch_size is None else (batch_size,) + a.shape[1:],
          a.dtype), arrays)


@pytest.mark.parametrize("dataset", rnn.DATASETS)
@pytest.mark.parametrize("cell", rnn.CELLS)
@pytest.mark.parametrize("name", BUILDERS)
def test_shapes_dtypes_and_validation(name, cell, dataset):
  instance = _instance(name, cell, dataset)
  assert instance.name == name
  steps, features = (8, 8) if dataset == "digits" else (40, 1)
  hidden = SMALL[name]["hidden_dim"]
  gates = 4 if cell == "lstm" else 1
  encoder = {"input": (features, gates * hidden),
             "recurrent": (hidden, gates * hidden), "bias": (gates * hidden,)}
  if name == "rnn_hyper_representation":
    tasks = SMALL[name]["num_tasks"]
    assert jax.tree.map(jnp.shape, instance.x0) == encoder
    assert jax.tree.map(jnp.shape, instance.y0) == {
        "weights": (tasks, hidden, 5), "bias": (tasks, 5)}
    assert not any(jnp.any(leaf) for leaf in jax.tree.leaves(instance.y0))
    for level in (instance.data.lower, instance.data.upper):
      assert level["sequences"].shape == (tasks, 25, steps, features)
      assert level["labels"].shape == (tasks, 25)
      np.testing.assert_array_equal(level["task"], np.arange(tasks))
  else:
    network = {"encoder": encoder, "head": {"weights": (hidden, 10),
                                            "bias": (10,)}}
    assert jax.tree.map(jnp.shape, instance.y0) == network
    expected_x = (200,) if name == "rnn_hyper_cleaning" else ()
    assert instance.x0.shape == expected_x
    assert instance.data.lower["sequences"].shape == (200, steps, features)
    assert instance.data.upper["sequences"].shape == (100, steps, features)
  for leaf in jax.tree.leaves((instance.x0, instance.y0, instance.data)):
    assert leaf.dtype in (jnp.float64, jnp.int32)
  data = instance.data
  bilevel.validate(instance.problem, instance.x0, instance.y0,
                   _batch_spec(data.upper, data.upper_batch_size),
                   _batch_spec(data.lower, data.lower_batch_size))


def test_float32_without_x64():
  with jax.enable_x64(False):
    instance = problems.rnn_hyperparameter(hidden_dim=4, num_train=50,
                                           num_val=50, batch_size=8)
    leaves = jax.tree.leaves((instance.x0, instance.y0, instance.data))
    value = jax.eval_shape(instance.problem.lower, instance.x0, instance.y0,
                           instance.data.lower)
  assert {leaf.dtype for leaf in leaves} == {np.dtype("float32"),
                                           np.dtype("int32")}
  assert value.dtype == jnp.float32


# The run below covers rnn_hyper_cleaning (Elman, digits).
@pytest.mark.parametrize("name, cell, dataset", [
    ("rnn_hyperparameter", "lstm", "mnist1d"),
    ("rnn_hyper_representation", "lstm", "digits"),
])
def test_one_jitted_soba_step_is_finite(name, cell, dataset):
  instance = _instance(name, cell, dataset)
  solver = bilevel.solvers.soba(instance.problem, upper_optimizer=0.1,
                                lower_optimizer=0.1, linear_optimizer=0.1)
  state = solver.init(instance.x0, instance.y0, key=jax.random.key(1),
                      data=instance.data)
  step = jax.jit(solver.step)
  state, _ = step(state, instance.data)
  state, info = step(state, instance.data)  # v = 0 at the first step
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(
      (state.x, state.y, state.v, info)))
  assert float(info.hypergradient_norm) > 0
  metrics = instance.evaluate(state.x, state.y)
  assert all(np.isfinite(value) for value in metrics.values())


# --------------------------------------------------------- evaluations


def test_evaluate_at_the_start():
  arrays = rnn.rnn_classification_data(jax.random.key(0), corruption=0.3,
                                       num_train=200, num_val=100)
  cleaning = _instance("rnn_hyper_cleaning")
  metrics = cleaning.evaluate(cleaning.x0, cleaning.y0)
  # A zero head predicts class 0 everywhere; every weight is sigmoid(0).
  np.testing.assert_allclose(metrics["test_accuracy"],
                             np.mean(arrays["test_labels"] == 0))
  np.testing.assert_allclose(metrics["test_loss"], np.log(10))
  np.testing.assert_allclose(metrics["weight_clean"], 0.5)
  np.testing.assert_allclose(metrics["weight_corrupted"], 0.5)
  np.testing.assert_allclose(metrics["clean_weight_fraction"], 0.7)

  hyper = _instance("rnn_hyperparameter")
  np.testing.assert_allclose(hyper.evaluate(hyper.x0, hyper.y0)["l2"], 1e-2)


def test_hyper_representation_references_and_evaluate():
  instance = _instance("rnn_hyper_representation")
  x0, y0 = instance.x0, instance.y0
  at_zero = instance.evaluate(x0, y0)
  np.testing.assert_allclose(at_zero["train_query_accuracy"], 0.2)  # 5 ways
  at_star = instance.evaluate(x0, instance.lower_solution(x0))
  # Test tasks get fresh heads: their metrics ignore y.
  assert at_star["test_accuracy"] == at_zero["test_accuracy"]
  assert at_star["test_accuracy"] > 0.5  # random features already help
  assert at_star["train_query_accuracy"] > 0.5

  x = jax.tree.map(lambda leaf: 1.5 * leaf, instance.x0)
  y_star = instance.lower_solution(x)
  gradient = jax.grad(instance.problem.lower, 1)(x, y_star,
                                                 instance.data.lower)
  assert np.max(np.abs(ravel_pytree(gradient)[0])) < 1e-13
  hypergradient = instance.hypergradient(x)
  flat_x, unravel = ravel_pytree(x)
  direction = jax.random.normal(jax.random.key(8), flat_x.shape)
  step = 1e-5
  difference = (instance.value(unravel(flat_x + step * direction))
                - instance.value(unravel(flat_x - step * direction))) / (
                    2 * step)
  exact = jnp.vdot(ravel_pytree(hypergradient)[0], direction)
  np.testing.assert_allclose(difference, exact, rtol=1e-7)
  # The hypergradient is not just the direct term grad_x f.
  direct = jax.grad(instance.problem.upper)(x, y_star, instance.data.upper)
  assert not np.allclose(ravel_pytree(direct)[0],
                         ravel_pytree(hypergradient)[0], rtol=0.1)


def test_short_soba_run_cleans_and_learns():
  """SOBA on digits, Elman cell, 200 steps (measured: test accuracy 0.10 ->
  0.90, mean weight 0.66 on clean and 0.32 on corrupted rows)."""
  instance = problems.rnn_hyper_cleaning(jax.random.key(0), num_train=500)
  solver = bilevel.solvers.soba(instance.problem, upper_optimizer=5.0,
                                lower_optimizer=0.5, linear_optimizer=0.5)
  start = instance.evaluate(instance.x0, instance.y0)
  result = bilevel.run(solver, instance.x0, instance.y0, instance.data,
                       num_steps=200, key=jax.random.key(0))
  metrics = instance.evaluate(result.state.x, result.state.y)
  assert start["test_accuracy"] < 0.15
  assert metrics["test_accuracy"] > 0.75
  assert metrics["weight_clean"] > metrics["weight_corrupted"] + 0.2
