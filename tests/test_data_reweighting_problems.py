"""The multi-source reweighting tasks: data, models and objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import reweighting
from problems import data_reweighting, transformer


def test_digits_sources_realise_the_noise_rates_exactly():
  rates = (0.0, 0.0, 0.2, 0.5, 0.8, 1.0)
  arrays = data_reweighting.digits_sources_data(noise_rates=rates)
  source, flipped = arrays["train_source"], arrays["flipped"]
  assert np.bincount(source).tolist() == [200] * 6
  for s, rate in enumerate(rates):
    assert flipped[source == s].mean() == rate
  changed = arrays["train_labels"] != arrays["train_true_labels"]
  np.testing.assert_array_equal(changed, flipped)  # a flip always changes
  assert arrays["test_features"].shape == (1797 - 1200 - 200, 64)
  with pytest.raises(ValueError, match="noise rate"):
    data_reweighting.digits_sources_data(noise_rates=(0.0, 1.5))
  with pytest.raises(ValueError, match="2 sources"):
    data_reweighting.digits_sources_data(noise_rates=(0.0,))


def test_digits_task_objectives():
  task = data_reweighting.digits_sources()
  assert task.clean.tolist() == [True, True, False, False, False, False]
  assert task.y0["blocks"]["w"].shape == (4, 32, 32)
  batch = jax.tree.map(lambda a: a[:50], task.train)
  losses = data_reweighting.mlp_losses(task.y0, batch)
  # Initial logits of order 1: the loss is a little above log(10) = 2.30
  # (measured 2.85).
  assert 2.0 < float(jnp.mean(losses)) < 3.5
  x = jnp.array([0.5, -0.5, 0.0, 1.0, -1.0, 0.2])
  p = jax.nn.softmax(x)
  sources = np.asarray(batch["source"])
  expected = sum(p[s] * losses[sources == s].mean() for s in set(sources))
  np.testing.assert_allclose(task.problem.lower(x, task.y0, batch), expected,
                             rtol=1e-12)
  grads = jax.grad(task.problem.lower, (0, 1))(x, task.y0, batch)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # The weights' gradient sums to zero (softmax).
  assert abs(float(jnp.sum(grads[0]))) < 1e-12
  metrics = task.evaluate(task.y0)
  assert 0.0 <= float(metrics["test_accuracy"]) <= 1.0


def test_transformer_is_causal_and_starts_near_uniform():
  params = transformer.init_transformer(jax.random.key(0), vocab_size=17,
                                        seq_len=12, dim=16, num_layers=2,
                                        num_heads=2, mlp_dim=24)
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 17)
  logits = transformer.transformer_logits(params, tokens, num_heads=2)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 17)
  other = transformer.transformer_logits(params, changed, num_heads=2)
  np.testing.assert_allclose(logits[:, :7], other[:, :7], atol=1e-12)
  assert float(jnp.max(jnp.abs(logits[:, 7:] - other[:, 7:]))) > 1e-6
  losses = transformer.sequence_losses(
      params, jnp.concatenate([tokens, tokens[:, :1]], axis=1), num_heads=2)
  assert losses.shape == (3,)
  np.testing.assert_allclose(losses, np.log(17), atol=0.05)
  with pytest.raises(ValueError, match="divisible"):
    transformer.init_transformer(jax.random.key(0), vocab_size=5, seq_len=4,
                                 dim=10, num_heads=3)


def test_text_sources_and_the_entropy_rate():
  corpus = transformer.text_sources(num_per_source=64, num_val=8,
                                    num_test=400, seq_len=64)
  assert corpus["train_tokens"].shape == (5 * 64, 65)
  assert np.bincount(corpus["train_source"]).tolist() == [64] * 5
  assert corpus["clean"].tolist() == [True, True, False, False, False]
  chain = corpus["chain"]
  np.testing.assert_allclose(chain.sum(axis=1), 1.0)
  assert ((chain > 0).sum(axis=1) == 3).all()
  # Monte-Carlo estimate of the entropy rate from the clean test sequences:
  # the mean of -log P(next | current).
  tokens = corpus["test_tokens"]
  logs = -np.log(chain[tokens[:, :-1], tokens[:, 1:]])
  estimate = logs.mean()
  error = logs.std() / np.sqrt(logs.size)
  assert abs(estimate - corpus["entropy_rate"]) < 4 * error
  assert corpus["entropy_rate"] < 0.5 * np.log(32)
  # Shuffled sequences keep each sequence's tokens, not their order.
  shuffled = corpus["train_tokens"][corpus["train_source"] == 3]
  transitions = chain[shuffled[:, :-1], shuffled[:, 1:]]
  assert (transitions == 0).mean() > 0.5


def test_transformer_learns_the_clean_chain():
  task = data_reweighting.text_sources_task(
      num_per_source=256, num_val=32, num_test=256, seq_len=16, dim=16,
      mlp_dim=32, num_layers=2)
  import optax  # pylint: disable=import-outside-toplevel
  clean_rows = jnp.flatnonzero(task.train["source"] < 2)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def body(carry, key):
      params_, state = carry
      rows = clean_rows[jax.random.randint(key, (32,), 0, len(clean_rows))]
      batch = {"tokens": task.train["tokens"][rows]}
      grads = jax.grad(lambda p: jnp.mean(task.per_example_loss(p, batch)))(
          params_)
      updates, state = optimizer.update(grads, state, params_)
      return (optax.apply_updates(params_, updates), state), None
    keys = jax.random.split(jax.random.key(0), 300)
    return jax.lax.scan(body, (params, optimizer.init(params)), keys)[0][0]

  metrics = task.evaluate(train(task.y0))
  rate = float(metrics["entropy_rate"])
  # Measured: from log(32) = 3.47 to 0.78 against an entropy rate of 0.65.
  assert float(metrics["test_loss"]) < rate + 0.3
  assert float(metrics["test_loss"]) > rate - 0.05


def test_resampled_indices_respect_the_task_sources():
  task = data_reweighting.digits_sources()
  p = jnp.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
  rows = reweighting.resample(jax.random.key(0), p, task.train["source"],
                              1000)
  assert set(np.asarray(task.train["source"][rows]).tolist()) == {0, 1}
