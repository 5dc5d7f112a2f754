r"""Data reweighting over sources: the weighted loss and resampling.

A training set made of :math:`k` sources (datasets, domains, generators) is
reweighted by a distribution :math:`p = \mathrm{softmax}(\lambda)` over the
sources, parameterised by logits :math:`\lambda \in \mathbb{R}^k` (the upper
variable of :func:`bilevel.solvers.scalebio`). On a minibatch :math:`B` whose
samples :math:`j` come from sources :math:`s_j`, the weighted loss is

.. math::

   L_2(\theta, \lambda; B) = \sum_{j \in B}
       \frac{p_{s_j}}{n_B(s_j)}\, \ell_j(\theta), \qquad
   n_B(s) = |\{j \in B : s_j = s\}|,

the mean loss of each source present in the batch, weighted by its
probability (ScaleBiO, Pan et al. 2024). A source absent from the batch
contributes nothing, so the weights of one batch sum to less than one when
some source is missing; in expectation over uniformly drawn batches each
source's mean loss is weighted by :math:`p_s` (up to the probability that it
appears). Under data-parallel sharding the counts are those of the global
batch (the arrays are global under ``jax.jit``).

After the weights are learned, the paper trains a fresh model on data
resampled with :math:`p` (:func:`resample`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def source_counts(sources: jax.Array, num_sources: int) -> jax.Array:
  """:math:`n_B(s)`: the number of samples of each source, shape ``(k,)``."""
  return jnp.zeros((num_sources,), jnp.int32).at[sources].add(1)


def source_weighted_loss(logits: jax.Array, losses: jax.Array,
                         sources: jax.Array) -> jax.Array:
  r""":math:`\sum_j \mathrm{softmax}(\lambda)_{s_j} \ell_j / n_B(s_j)`.

  Args:
    logits: :math:`\lambda`, shape ``(k,)``.
    losses: per-sample losses :math:`\ell_j`, shape ``(b,)``.
    sources: source index of each sample in ``[0, k)``, integers, shape
      ``(b,)``.

  Returns:
    The scalar weighted loss, differentiable in ``logits`` and ``losses``.
  """
  if logits.ndim != 1 or losses.ndim != 1 or sources.shape != losses.shape:
    raise ValueError(
        "source_weighted_loss expects logits of shape (k,) and losses and "
        f"sources of one shape (b,); got {logits.shape}, {losses.shape} and "
        f"{sources.shape}.")
  if not jnp.issubdtype(sources.dtype, jnp.integer):
    raise TypeError(f"sources must be integers; got {sources.dtype}.")
  counts = source_counts(sources, logits.shape[0])
  probabilities = jax.nn.softmax(logits)
  weights = probabilities[sources] / counts[sources].astype(losses.dtype)
  return jnp.sum(weights.astype(losses.dtype) * losses)


def source_probabilities(logits: jax.Array) -> jax.Array:
  r""":math:`p = \mathrm{softmax}(\lambda)`."""
  return jax.nn.softmax(logits)


def resample(key: jax.Array, probabilities: jax.Array, sources: jax.Array,
             num_samples: int) -> jax.Array:
  r"""Indices of a training set drawn with source probabilities :math:`p`.

  Each index is drawn independently, with replacement: first a source
  :math:`s \sim p`, then a sample uniformly among that source's samples,
  i.e. sample :math:`j` has probability :math:`p_{s_j} / n(s_j)`. Sources
  without samples get no mass (the others are renormalised).

  Args:
    key: JAX key.
    probabilities: :math:`p`, shape ``(k,)``, nonnegative.
    sources: source of each training sample, shape ``(n,)``.
    num_samples: number of indices to draw.

  Returns:
    ``int32`` indices into the training set, shape ``(num_samples,)``.
  """
  counts = source_counts(sources, probabilities.shape[0])
  per_sample = probabilities[sources] / jnp.maximum(counts[sources], 1)
  per_sample = per_sample / jnp.sum(per_sample)
  return jax.random.choice(key, sources.shape[0], (num_samples,),
                           p=per_sample).astype(jnp.int32)


__all__ = ["resample", "source_counts", "source_probabilities",
           "source_weighted_loss"]
