r"""Multi-source data reweighting tasks for ScaleBiO.

A training set made of :math:`k` sources, some clean and some corrupted, and
a clean validation set. The upper variable is the logits :math:`\lambda \in
\mathbb{R}^k` of the source weights :math:`p = \mathrm{softmax}(\lambda)`
(``x0 = 0``: uniform), the lower variable the model's parameters:

.. math::

   f(\lambda, w; V) = \frac1{|V|} \sum_{v \in V} \ell_v(w), \qquad
   g(\lambda, w; B) = \sum_{j \in B} \frac{p_{s_j}}{n_B(s_j)} \ell_j(w)

(:func:`bilevel.reweighting.source_weighted_loss`). A good :math:`p`
concentrates on the clean sources. Both models stack their repeated blocks
on a leading axis (``"blocks"`` / ``"layers"``) for :mod:`bilevel.lisa`.

- :func:`digits_sources`: scikit-learn's digits split into sources with
  per-source label noise, a residual MLP.
- :func:`text_sources_task`: the corpus of :func:`problems.transformer.
  text_sources` (clean Markov text, another chain, shuffled and random
  tokens), the transformer language model of :mod:`problems.transformer`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from bilevel.reweighting import source_weighted_loss
from problems import transformer
from problems._base import numpy_seed, split_rows

PyTree = Any
NUM_CLASSES = 10


class ReweightingTask(NamedTuple):
  """A source-reweighting problem with what retraining and evaluation need.

  Attributes:
    name: short identifier.
    problem: the :class:`bilevel.Problem` (``x`` logits, ``y`` parameters).
    data: :class:`bilevel.Data`: ``upper`` the clean validation set,
      ``lower`` the training set with its ``"source"`` (int32) per sample.
    x0: zero logits (uniform weights), shape ``(k,)``.
    y0: initial parameters.
    source_names: a name per source.
    clean: bool per source, true for the uncorrupted ones.
    train: the training arrays (``data.lower``).
    init_params: ``key -> parameters`` (fresh models for retraining).
    per_example_loss: ``(parameters, batch) -> (b,)`` losses.
    evaluate: ``parameters -> dict`` on the full held-out sets: ``val_loss``,
      ``test_loss`` and, for classification, ``test_accuracy``.
  """
  name: str
  problem: bilevel.Problem
  data: bilevel.Data
  x0: jax.Array
  y0: PyTree
  source_names: tuple
  clean: np.ndarray
  train: dict
  init_params: Callable[[jax.Array], PyTree]
  per_example_loss: Callable[[PyTree, dict], jax.Array]
  evaluate: Callable[[PyTree], dict]


def _problem(per_example_loss) -> bilevel.Problem:
  def upper(x, y, batch):
    del x
    return jnp.mean(per_example_loss(y, batch))

  def lower(x, y, batch):
    return source_weighted_loss(x, per_example_loss(y, batch),
                                batch["source"])

  return bilevel.Problem(upper=upper, lower=lower)


# ---------------------------------------------------------------------------
# Digits with per-source label noise.


def init_mlp(key: jax.Array, *, num_inputs: int = 64, width: int = 32,
             num_blocks: int = 4, dtype=None) -> dict:
  """A residual MLP: input layer, ``num_blocks`` stacked blocks, output."""
  dtype = dtype or jnp.zeros(()).dtype
  keys = jax.random.split(key, 3)
  return {
      "input": {"w": (jax.random.normal(keys[0], (num_inputs, width))
                      / np.sqrt(num_inputs)).astype(dtype),
                "b": jnp.zeros((width,), dtype)},
      "blocks": {"w": (jax.random.normal(keys[1], (num_blocks, width, width))
                       / np.sqrt(width) / np.sqrt(num_blocks)).astype(dtype),
                 "b": jnp.zeros((num_blocks, width), dtype)},
      "output": {"w": (jax.random.normal(keys[2], (width, NUM_CLASSES))
                       / np.sqrt(width)).astype(dtype),
                 "b": jnp.zeros((NUM_CLASSES,), dtype)},
  }


def mlp_logits(params: dict, features: jax.Array) -> jax.Array:
  r""":math:`h_0 = \tanh(a W_{in} + b)`, :math:`h_{l+1} = h_l + \tanh(h_l W_l
  + b_l)`, logits :math:`h_L W_{out} + b`."""
  hidden = jnp.tanh(features @ params["input"]["w"] + params["input"]["b"])

  def block(h, weights):
    return h + jnp.tanh(h @ weights[0] + weights[1]), None

  hidden, _ = jax.lax.scan(block, hidden, (params["blocks"]["w"],
                                           params["blocks"]["b"]))
  return hidden @ params["output"]["w"] + params["output"]["b"]


def mlp_losses(params: dict, batch: dict) -> jax.Array:
  """Cross-entropy of each sample, ``(b,)``."""
  logits = mlp_logits(params, batch["features"])
  picked = jnp.take_along_axis(logits, batch["labels"][:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - picked


def digits_sources_data(key: jax.Array | None = None, *,
                        noise_rates=(0.0, 0.0, 0.2, 0.5, 0.8, 1.0),
                        num_train: int = 1200, num_val: int = 200) -> dict:
  """Digits split into sources with label noise, as NumPy arrays.

  Pixels are divided by 16 and standardised with training statistics. The
  training rows are split at random into ``len(noise_rates)`` sources of
  equal size (the remainder goes to the first ones); in source ``s``,
  ``round(noise_rates[s] * n_s)`` labels, chosen at random, are replaced by
  a different class drawn uniformly. The remaining ``1797 - num_train -
  num_val`` rows are the clean test set.

  Returns:
    A dict with ``train_features``, ``train_labels`` (noisy),
    ``train_true_labels``, ``train_source``, ``flipped`` (bool per row),
    ``val_features``, ``val_labels``, ``test_features``, ``test_labels``.
  """
  from sklearn.datasets import load_digits  # optional dependency

  noise_rates = tuple(float(r) for r in noise_rates)
  if len(noise_rates) < 2:
    raise ValueError(f"Need at least 2 sources; got noise_rates="
                     f"{noise_rates}.")
  if not all(0.0 <= r <= 1.0 for r in noise_rates):
    raise ValueError(f"Every noise rate must be in [0, 1]; got {noise_rates}.")
  features, labels = load_digits(return_X_y=True)
  rng = np.random.default_rng(numpy_seed(
      jax.random.key(0) if key is None else key))
  train, val, test = split_rows(rng, features.shape[0], num_train, num_val,
                                min_train=len(noise_rates))
  features = features / 16.0
  mean, std = features[train].mean(axis=0), features[train].std(axis=0)
  features = (features - mean) / np.where(std > 0, std, 1.0)
  sources = np.array_split(rng.permutation(num_train), len(noise_rates))
  source = np.empty(num_train, np.int32)
  flipped = np.zeros(num_train, bool)
  for s, rows in enumerate(sources):
    source[rows] = s
    flipped[rows[:round(noise_rates[s] * len(rows))]] = True
  true_labels = labels[train]
  shifts = rng.integers(1, NUM_CLASSES, num_train)
  noisy = np.where(flipped, (true_labels + shifts) % NUM_CLASSES, true_labels)
  return {"train_features": features[train], "train_labels": noisy,
          "train_true_labels": true_labels, "train_source": source,
          "flipped": flipped, "val_features": features[val],
          "val_labels": labels[val], "test_features": features[test],
          "test_labels": labels[test]}


def digits_sources(key: jax.Array | None = None, *,
                   noise_rates=(0.0, 0.0, 0.2, 0.5, 0.8, 1.0),
                   num_train: int = 1200, num_val: int = 200, width: int = 32,
                   num_blocks: int = 4, upper_batch_size: int = 64,
                   lower_batch_size: int = 96) -> ReweightingTask:
  """Digits with per-source label noise, a residual MLP (see the module).

  Args:
    key: JAX key of the split, the noise and the initial parameters.
    noise_rates: fraction of flipped labels per source (clean where 0).
    num_train, num_val: training and validation rows (the rest is test).
    width, num_blocks: the MLP (blocks stacked under ``"blocks"``).
    upper_batch_size, lower_batch_size: minibatch sizes.
  """
  key = jax.random.key(0) if key is None else key
  arrays = digits_sources_data(key, noise_rates=noise_rates,
                               num_train=num_train, num_val=num_val)
  dtype = jnp.zeros(()).dtype
  train = {"features": jnp.asarray(arrays["train_features"], dtype),
           "labels": jnp.asarray(arrays["train_labels"], jnp.int32),
           "source": jnp.asarray(arrays["train_source"])}
  val = {"features": jnp.asarray(arrays["val_features"], dtype),
         "labels": jnp.asarray(arrays["val_labels"], jnp.int32)}
  test = {"features": jnp.asarray(arrays["test_features"], dtype),
          "labels": jnp.asarray(arrays["test_labels"], jnp.int32)}
  init = functools.partial(init_mlp, width=width, num_blocks=num_blocks)

  @jax.jit
  def evaluate(params):
    accuracy = jnp.mean(jnp.argmax(mlp_logits(params, test["features"]), 1)
                        == test["labels"])
    return {"val_loss": jnp.mean(mlp_losses(params, val)),
            "test_loss": jnp.mean(mlp_losses(params, test)),
            "test_accuracy": accuracy}

  return ReweightingTask(
      name="digits_sources", problem=_problem(mlp_losses),
      data=bilevel.Data(upper=val, lower=train,
                        upper_batch_size=upper_batch_size,
                        lower_batch_size=lower_batch_size),
      x0=jnp.zeros(len(noise_rates), dtype),
      y0=init(jax.random.fold_in(key, 1)),
      source_names=tuple(f"noise={r:g}" for r in noise_rates),
      clean=np.array([r == 0 for r in noise_rates]), train=train,
      init_params=init, per_example_loss=mlp_losses, evaluate=evaluate)


# ---------------------------------------------------------------------------
# Text: the transformer on the multi-source corpus.


def text_sources_task(key: jax.Array | None = None, *, vocab_size: int = 32,
                      seq_len: int = 32, num_per_source: int = 512,
                      num_val: int = 256, num_test: int = 512, dim: int = 32,
                      num_layers: int = 4, num_heads: int = 4,
                      mlp_dim: int = 64, upper_batch_size: int = 32,
                      lower_batch_size: int = 40) -> ReweightingTask:
  """The multi-source corpus with the transformer (see the module).

  ``evaluate`` adds ``entropy_rate``, the clean chain's (the best reachable
  loss).
  """
  key = jax.random.key(0) if key is None else key
  corpus = transformer.text_sources(
      key, vocab_size=vocab_size, seq_len=seq_len,
      num_per_source=num_per_source, num_val=num_val, num_test=num_test)
  train = {"tokens": jnp.asarray(corpus["train_tokens"]),
           "source": jnp.asarray(corpus["train_source"])}
  val = {"tokens": jnp.asarray(corpus["val_tokens"])}
  test = {"tokens": jnp.asarray(corpus["test_tokens"])}

  def losses(params, batch):
    return transformer.sequence_losses(params, batch["tokens"],
                                       num_heads=num_heads)

  def init(k):
    return transformer.init_transformer(
        k, vocab_size=vocab_size, seq_len=seq_len, dim=dim,
        num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)

  rate = corpus["entropy_rate"]

  @jax.jit
  def evaluate(params):
    return {"val_loss": jnp.mean(losses(params, val)),
            "test_loss": jnp.mean(losses(params, test)),
            "entropy_rate": jnp.asarray(rate)}

  return ReweightingTask(
      name="text_sources", problem=_problem(losses),
      data=bilevel.Data(upper=val, lower=train,
                        upper_batch_size=upper_batch_size,
                        lower_batch_size=lower_batch_size),
      x0=jnp.zeros(len(corpus["source_names"]), jnp.zeros(()).dtype),
      y0=init(jax.random.fold_in(key, 1)),
      source_names=corpus["source_names"], clean=corpus["clean"],
      train=train, init_params=init, per_example_loss=losses,
      evaluate=evaluate)


__all__ = ["ReweightingTask", "digits_sources", "digits_sources_data",
           "init_mlp", "mlp_logits", "mlp_losses", "text_sources_task"]
