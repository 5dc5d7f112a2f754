"""bilevel.best_response and bilevel.regularizers: kinds, perturbations,
structured layers, the generic response and per-example regularizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import scipy.stats

from bilevel import best_response as br
from bilevel import regularizers

KEY = jax.random.key(0)


# ---------------------------------------------------------------- kinds


@pytest.mark.parametrize("hyper", [
    br.interval(0.05, 0.0, 0.9), br.interval(-2.0, -3.0, 5.0),
    br.positive(1e-4), br.positive(3.0), br.discrete(2, 0, 4),
    br.discrete(0, 0, 4), br.discrete(4, 0, 4), br.discrete(-1, -2, 1)])
def test_initial_value_round_trips(hyper):
  value = hyper.constrain(jnp.asarray(hyper.unconstrained_init()))
  np.testing.assert_allclose(value, hyper.init, rtol=1e-10)


def test_interval_is_a_stretched_sigmoid():
  hyper = br.interval(0.3, 0.1, 0.9)
  u = jnp.linspace(-40, 40, 101)
  values = hyper.constrain(u)
  np.testing.assert_allclose(values, 0.1 + 0.8 / (1 + np.exp(-np.asarray(u))),
                             rtol=1e-12)
  assert float(values.min()) >= 0.1 and float(values.max()) <= 0.9


def test_positive_is_softplus():
  u = jnp.linspace(-20, 20, 41)
  np.testing.assert_allclose(br.positive(1.0).constrain(u),
                             np.logaddexp(0, np.asarray(u)), rtol=1e-12)


def test_discrete_gives_each_integer_an_equal_share_of_the_sigmoid():
  hyper = br.discrete(1, 0, 3)
  p = jnp.linspace(1e-6, 1 - 1e-6, 400_001)
  values = np.asarray(hyper.constrain(jnp.log(p) - jnp.log1p(-p)))
  assert set(np.unique(values)) == {0.0, 1.0, 2.0, 3.0}
  shares = np.bincount(values.astype(int)) / values.size
  np.testing.assert_allclose(shares, 0.25, atol=1e-4)
  # The gradient through the floor is zero: only the hypernetwork moves it.
  assert float(jax.grad(lambda u: hyper.constrain(u))(0.3)) == 0.0


@pytest.mark.parametrize("make,match", [
    (lambda: br.interval(0.0, 0.0, 1.0), "strictly inside"),
    (lambda: br.interval(0.5, 1.0, 0.0), "low < high"),
    (lambda: br.positive(0.0), "init > 0"),
    (lambda: br.discrete(1.5, 0, 3), "integer"),
    (lambda: br.discrete(5, 0, 3), r"lie in \[0, 3\]"),
    (lambda: br.interval(float("nan")), "finite number"),
    (lambda: br.Hyperparameter("log", 1.0), "kind must be one of"),
    (lambda: br.HyperparameterSpace({}), "non-empty mapping"),
])
def test_bad_hyperparameters_are_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_space_refuses_non_hyperparameters():
  with pytest.raises(TypeError, match="'dropout' must be built with"):
    br.HyperparameterSpace({"dropout": 0.1})
  with pytest.raises(ValueError, match="last axis of size 2"):
    br.HyperparameterSpace({"a": br.positive(1.0),
                            "b": br.positive(1.0)}).constrain(jnp.zeros(3))


def test_space_orders_columns_and_constrains_rows():
  space = br.HyperparameterSpace({"drop": br.interval(0.2, 0.0, 0.9),
                                  "l2": br.positive(0.5),
                                  "shift": br.discrete(1, 0, 2)})
  assert space.names == ("drop", "l2", "shift") and space.size == 3
  rows = jnp.stack([space.init()] * 4)
  values = space.constrain(rows)
  np.testing.assert_allclose(values["drop"], [0.2] * 4, rtol=1e-12)
  np.testing.assert_allclose(values["l2"], [0.5] * 4, rtol=1e-12)
  np.testing.assert_array_equal(values["shift"], [1.0] * 4)
  assert hash(space) == hash(br.HyperparameterSpace(dict(space.entries)))


# ------------------------------------------------------- perturbation


def test_perturbation_rows_are_gaussian_around_the_centre():
  space = br.HyperparameterSpace({
      "a": br.interval(0.5, 0.0, 1.0), "b": br.positive(1.0),
      "c": br.positive(2.0, per_example=False)})
  centre = jnp.asarray([0.3, -1.0, 2.0])
  scale = jnp.asarray([0.5, 0.1, 0.7])
  hp = br.perturb(space, centre, scale, KEY, 200_000, regularizer_key="k")
  assert hp.unconstrained.shape == (200_000, 3) and hp.key == "k"
  rows = np.asarray(hp.unconstrained)
  np.testing.assert_allclose(rows[:, :2].mean(0), centre[:2], atol=4e-3)
  np.testing.assert_allclose(rows[:, :2].std(0), scale[:2], rtol=5e-3)
  # per_example=False: one draw shared by the whole batch.
  assert np.all(rows[:, 2] == rows[0, 2]) and rows[0, 2] != 2.0
  np.testing.assert_allclose(hp.values["b"], np.logaddexp(0, rows[:, 1]),
                             rtol=1e-12)
  # Without a scale every row is the centre.
  plain = br.perturb(space, centre, None, None, 3)
  np.testing.assert_array_equal(plain.unconstrained, jnp.stack([centre] * 3))


def test_values_carry_no_gradient_but_rows_do():
  space = br.HyperparameterSpace({"a": br.positive(1.0)})

  def through_values(u):
    return jnp.sum(br.perturb(space, u, None, None, 2).values["a"])

  def through_rows(u):
    return jnp.sum(br.perturb(space, u, None, None, 2).unconstrained)

  assert float(jax.grad(through_values)(jnp.ones(1))[0]) == 0.0
  assert float(jax.grad(through_rows)(jnp.ones(1))[0]) == 2.0


def test_entropy_is_the_gaussian_entropy():
  scale = jnp.asarray([0.1, 0.5, 2.0])
  np.testing.assert_allclose(
      br.entropy(scale), scipy.stats.norm(scale=np.asarray(scale)).entropy().sum(),
      rtol=1e-12)


def test_init_variables():
  space = br.HyperparameterSpace({"a": br.positive(0.3), "b": br.positive(2.)})
  x = br.init_variables(space, scale=0.5)
  np.testing.assert_allclose(x.scale, [0.5, 0.5], rtol=1e-12)
  np.testing.assert_allclose(space.constrain(x.unconstrained)["a"], 0.3,
                             rtol=1e-12)
  with pytest.raises(ValueError, match="scale must be a positive number"):
    br.init_variables(space, scale=0.0)


# ---------------------------------------------------- structured layers


def test_hyper_dense_is_the_gated_formula():
  k = jax.random.split(KEY, 3)
  params = br.hyper_dense_init(k[0], 5, 4, 2)
  params["gate"] = jax.random.normal(k[1], (2, 8))  # not tiny, to see it
  params["scale"] = jnp.asarray(1.3)
  inputs = jax.random.normal(k[2], (3, 5))
  rows = jnp.asarray([[0.1, -2.0], [1.0, 0.5], [0.0, 0.0]])
  out = br.hyper_dense(params, inputs, rows)
  p = {name: np.asarray(v) for name, v in params.items()}
  for b in range(3):
    gates = np.asarray(rows[b]) @ p["gate"]
    expected = (1.3 * (np.asarray(inputs[b]) @ p["kernel"] + p["bias"]) +
                gates[:4] * (np.asarray(inputs[b]) @ p["hyper_kernel"]) +
                gates[4:] * p["hyper_bias"])
    np.testing.assert_allclose(out[b], expected, rtol=1e-12)
  # Rows of zeros (or a zero gate) leave the plain layer.
  np.testing.assert_allclose(out[2], 1.3 * (inputs[2] @ p["kernel"] +
                                            p["bias"]), rtol=1e-12)


def test_hyper_dense_initialisation_follows_the_paper():
  params = br.hyper_dense_init(KEY, 400, 300, 3)
  bound = 1 / math.sqrt(400)
  assert float(jnp.abs(params["kernel"]).max()) <= bound
  assert float(jnp.abs(params["kernel"]).max()) > 0.99 * bound
  assert float(params["scale"]) == 1.0
  assert params["gate"].shape == (3, 600)
  np.testing.assert_allclose(float(params["gate"].std()), 0.01, rtol=0.05)


def test_hyper_conv_matches_a_correlation_per_example_1d_and_2d():
  k = jax.random.split(KEY, 4)
  for kernel_size, spatial in (((3,), (7,)), ((3, 3), (6, 5))):
    params = br.hyper_conv_init(k[0], 2, 3, kernel_size, 2)
    params["gate"] = jax.random.normal(k[1], (2, 6))
    inputs = jax.random.normal(k[2], (2,) + spatial + (2,))
    rows = jax.random.normal(k[3], (2, 2))
    out = jax.jit(br.hyper_conv)(params, inputs, rows)
    assert out.shape == (2,) + spatial + (3,)
    p = {name: np.asarray(v) for name, v in params.items()}

    def correlate(x, kernel):  # SAME cross-correlation, channels last
      out_ = np.zeros(x.shape[:-1] + (kernel.shape[-1],))
      for o in range(kernel.shape[-1]):
        for i in range(kernel.shape[-2]):
          out_[..., o] += scipy.signal.correlate(x[..., i], kernel[..., i, o],
                                                 mode="same")
      return out_

    for b in range(2):
      gates = np.asarray(rows[b]) @ p["gate"]
      x = np.asarray(inputs[b])
      expected = (p["scale"] * (correlate(x, p["kernel"]) + p["bias"]) +
                  gates[:3] * correlate(x, p["hyper_kernel"]) +
                  gates[3:] * p["hyper_bias"])
      np.testing.assert_allclose(out[b], expected, rtol=1e-10, atol=1e-12)


def test_layers_refuse_mismatched_rows():
  params = br.hyper_dense_init(KEY, 3, 2, 2)
  with pytest.raises(ValueError, match=r"rows \(B, H\) matching the B"):
    br.hyper_dense(params, jnp.ones((4, 3)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="built for num_hyper=2"):
    br.hyper_dense(params, jnp.ones((4, 3)), jnp.ones((4, 3)))
  conv = br.hyper_conv_init(KEY, 1, 2, (3, 3), 1)
  with pytest.raises(ValueError, match="of rank 4"):
    br.hyper_conv(conv, jnp.ones((4, 8, 1)), jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="integer >= 1"):
    br.hyper_dense_init(KEY, 0, 2, 1)


# ---------------------------------------------------- generic response


def test_linear_response_is_base_plus_slopes():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
  response = br.linear(2)
  phi = response.init(params)
  np.testing.assert_array_equal(response.apply(phi, jnp.asarray([3., -1.]))
                                ["w"], params["w"])
  phi["slope"] = jax.tree.map(lambda s: s + jnp.arange(2.0).reshape(
      (2,) + (1,) * (s.ndim - 1)) + 1, phi["slope"])
  out = response.apply(phi, jnp.asarray([3.0, -1.0]))
  # slopes U_0 = 1, U_1 = 2: w + 3 * 1 - 1 * 2
  np.testing.assert_allclose(out["w"], params["w"] + 1.0)
  with pytest.raises(ValueError, match="vmap it over"):
    response.apply(phi, jnp.ones((4, 2)))


def test_low_rank_response():
  params = {"w": jnp.zeros(4)}
  response = br.linear(3, rank=1)
  with pytest.raises(ValueError, match="needs a key"):
    response.init(params)
  phi = response.init(params, KEY)
  assert phi["slope"]["w"].shape == (1, 4) and phi["mixing"].shape == (3, 1)
  phi["slope"]["w"] = jnp.ones((1, 4))
  row = jnp.asarray([1.0, 2.0, 3.0])
  np.testing.assert_allclose(response.apply(phi, row)["w"],
                             float(row @ phi["mixing"][:, 0]), rtol=1e-12)


# --------------------------------------------------------- regularizers


def test_dropout_rates_per_example():
  rate = jnp.asarray([0.0, 0.25, 0.8])
  inputs = jnp.ones((3, 100_000))
  out = np.asarray(regularizers.dropout(KEY, inputs, rate))
  np.testing.assert_array_equal(out[0], 1.0)
  kept = (out != 0).mean(1)
  np.testing.assert_allclose(kept, [1.0, 0.75, 0.2], atol=5e-3)
  np.testing.assert_allclose(out.mean(1), 1.0, atol=2e-2)  # inverted
  np.testing.assert_allclose(out[1][out[1] != 0], 1 / 0.75, rtol=1e-12)
  with pytest.raises(ValueError, match="one strength per example"):
    regularizers.dropout(KEY, inputs, jnp.ones(2) * 0.1)


def test_gaussian_noise_scales_per_example():
  scale = jnp.asarray([0.0, 0.5, 2.0])
  out = regularizers.gaussian_noise(KEY, jnp.ones((3, 100_000)), scale)
  np.testing.assert_allclose(np.asarray(out).std(1), [0.0, 0.5, 2.0],
                             rtol=1e-2)


def test_random_shift_moves_a_pixel_within_the_range():
  image = jnp.zeros((8, 8)).at[4, 4].set(1.0)
  images = jnp.stack([image] * 2000)
  max_shift = jnp.asarray([0.0] * 1000 + [2.0] * 1000)
  shift = jax.jit(regularizers.random_shift, static_argnames="axes")
  out = np.asarray(shift(KEY, images, max_shift))
  assert np.all(out[:1000] == np.asarray(image))
  assert np.allclose(out.sum((1, 2)), 1.0)  # within bounds: nothing lost
  rows, cols = np.nonzero(out[1000:].sum(0))
  assert set(rows) == set(range(2, 7)) and set(cols) == set(range(2, 7))
  # Uniform over the 25 offsets.
  counts = out[1000:].sum(0)[2:7, 2:7]
  assert counts.min() > 20 and counts.max() < 65
  # Signals (B, L, C) along axis 1; zeros come in at the edges.
  signal = jnp.ones((500, 10, 1))
  moved = np.asarray(shift(KEY, signal, jnp.full(500, 3.0), axes=(1,)))
  assert set(np.unique(moved.sum((1, 2)))) <= {7.0, 8.0, 9.0, 10.0}
  with pytest.raises(ValueError, match="exclude the batch axis"):
    regularizers.random_shift(KEY, images, max_shift, axes=(0, 1))


def test_l2():
  params = {"a": jnp.ones(3), "b": 2 * jnp.ones((2, 2))}
  np.testing.assert_allclose(regularizers.l2(params, 0.1), 0.05 * 19)
  with pytest.raises(ValueError, match="scalar coefficient"):
    regularizers.l2(params, jnp.ones(3))
