"""The minibatch sampler: exact epochs, independence of levels, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
from bilevel import _data


def _draw_indices(n, batch_size, num_batches, level="lower"):
  arrays = {"index": jnp.arange(n)}
  data = bilevel.Data(upper=arrays, lower=arrays, upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  sampler = _data.init_sampler(data, jax.random.key(0))

  @jax.jit
  def draw(s):
    return _data.sample(s, data, level)

  out = []
  for _ in range(num_batches):
    batch, sampler = draw(sampler)
    out.append(np.asarray(batch["index"]))
  return np.concatenate(out), sampler


@pytest.mark.parametrize("n,batch_size", [(10, 3), (12, 4), (7, 7), (9, 1),
                                          (10, 9)])
def test_every_epoch_visits_every_sample_once(n, batch_size):
  num_batches = 5 * n // batch_size + 1
  stream, sampler = _draw_indices(n, batch_size, num_batches)
  num_epochs = len(stream) // n
  assert num_epochs >= 4
  for epoch in range(num_epochs):
    np.testing.assert_array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]),
                                  np.arange(n))
  assert int(sampler.lower.epoch) == num_epochs
  # Epochs are shuffled differently.
  assert any(not np.array_equal(stream[:n], stream[e * n:(e + 1) * n])
             for e in range(1, num_epochs))


def test_levels_draw_independent_streams():
  arrays = {"index": jnp.arange(50)}
  data = bilevel.Data(upper=arrays, lower=arrays, upper_batch_size=5,
                      lower_batch_size=5)
  sampler = _data.init_sampler(data, jax.random.key(0))
  upper, _ = _data.sample(sampler, data, "upper")
  lower, _ = _data.sample(sampler, data, "lower")
  assert not np.array_equal(upper["index"], lower["index"])


def test_full_batch_and_no_data():
  arrays = {"a": jnp.arange(6.0)}
  data = bilevel.Data(upper=arrays, lower=arrays, upper_batch_size=None,
                      lower_batch_size=2)
  sampler = _data.init_sampler(data, jax.random.key(0))
  assert sampler.upper is None and sampler.lower is not None
  batch, same = _data.sample(sampler, data, "upper")
  np.testing.assert_array_equal(batch["a"], arrays["a"])
  assert same is sampler
  none_sampler = _data.init_sampler(None, None)
  batch, _ = _data.sample(none_sampler, None, "lower")
  assert batch is None


def test_data_is_a_pytree_with_static_batch_sizes():
  data = bilevel.Data(upper={"a": jnp.ones(3)}, lower={"a": jnp.ones(4)},
                      upper_batch_size=2, lower_batch_size=3)
  leaves, treedef = jax.tree.flatten(data)
  assert len(leaves) == 2
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.upper_batch_size == 2 and rebuilt.lower_batch_size == 3


@pytest.mark.parametrize("data,match", [
    (bilevel.Data(lower={"a": jnp.ones(5), "b": jnp.ones(4)},
                  lower_batch_size=2), "disagree in length"),
    (bilevel.Data(lower={"a": jnp.ones(5)}, lower_batch_size=6),
     "larger than"),
    (bilevel.Data(lower={"a": jnp.ones(5)}, lower_batch_size=0),
     "positive"),
    (bilevel.Data(lower={"a": jnp.ones(5)}, upper_batch_size=2),
     "Data.upper is None"),
    (bilevel.Data(lower={"a": jnp.ones(())}), "leading sample axis"),
])
def test_bad_data_is_rejected(data, match):
  with pytest.raises(ValueError, match=match):
    _data.validate_data(data)


def test_key_required_for_minibatches():
  data = bilevel.Data(lower={"a": jnp.ones(5)}, lower_batch_size=2)
  with pytest.raises(ValueError, match="key"):
    _data.init_sampler(data, None)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 49990])
def test_index_shuffle_is_a_bijection(n):
  for seed in range(3):
    image = _data.index_shuffle(jnp.arange(n), jax.random.key(seed), n)
    np.testing.assert_array_equal(np.sort(np.asarray(image)), np.arange(n))


@pytest.mark.parametrize("n", [10, 1000])
def test_index_shuffle_is_close_to_uniform(n):
  """Where indices 0, 1, 2 land over 20,000 keys: chi-square tests."""
  num_keys, bins = 20000, 10
  keys = jax.random.split(jax.random.key(0), num_keys)
  images = np.asarray(jax.vmap(
      lambda k: _data.index_shuffle(jnp.arange(3), k, n))(keys))
  expected = num_keys / bins
  for column in range(3):
    counts = np.bincount(images[:, column] * bins // n, minlength=bins)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9, (column, counts)  # 99.9% quantile, 9 dof
  # Index 0 and index 1 land in independent places: the 90 ordered pairs of
  # bins (n = 10: of values) are equally likely.
  pairs = (images[:, 0] * bins // n) * bins + images[:, 1] * bins // n
  counts = np.bincount(pairs, minlength=bins * bins).reshape(bins, bins)
  if n == bins:
    counts = counts[~np.eye(bins, dtype=bool)]
    expected = num_keys / (bins * (bins - 1))
    quantile = 137.0  # 99.9%, 89 dof
  else:
    counts = counts.ravel()
    expected = num_keys / bins ** 2
    quantile = 148.2  # 99.9%, 99 dof (approximately independent)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < quantile, chi2


def test_sample_many_equals_repeated_sample():
  arrays = {"index": jnp.arange(23)}
  data = bilevel.Data(lower=arrays, lower_batch_size=5)
  sampler = _data.init_sampler(data, jax.random.key(4))
  stacked, after_many = _data.sample_many(sampler, data, "lower", 11)
  one_by_one = []
  for _ in range(11):
    batch, sampler = _data.sample(sampler, data, "lower")
    one_by_one.append(batch["index"])
  np.testing.assert_array_equal(stacked["index"], np.stack(one_by_one))
  chex.assert_trees_all_equal(after_many, sampler)
  # 55 draws from 23 samples: epochs 0 and 1 complete, 9 of epoch 2 read.
  assert int(sampler.lower.epoch) == 2 and int(sampler.lower.position) == 9
