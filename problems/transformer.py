r"""A small decoder-only transformer and a multi-source text corpus.

**Model.** Plain JAX, no framework: the parameters are a dict, so
:mod:`bilevel.lisa` and :mod:`bilevel.sharding` address the layers by their
path, and the layers are **stacked** on a leading axis and applied by one
``jax.lax.scan`` (one compiled layer whatever the depth; LISA freezes slices
of the stack)::

    {"embed": (V, D), "position": (T, D),
     "layers": {"attn_norm": (L, D), "qkv": (L, D, 3D), "attn_out": (L, D, D),
                "mlp_norm": (L, D), "mlp_in": (L, D, F), "mlp_out": (L, F, D)},
     "final_norm": (D,), "head": (D, V)}

Pre-norm blocks (RMSNorm with a learned scale), causal multi-head attention
and a GELU MLP, each added to the residual stream:

.. math::

   h \leftarrow h + \mathrm{Attn}(\mathrm{RMS}(h)), \qquad
   h \leftarrow h + W_{\text{out}}\,\mathrm{gelu}(W_{\text{in}}
   \mathrm{RMS}(h)).

Initialisation: normal with standard deviation 0.02, the two projections
into the residual stream scaled by :math:`1/\sqrt{2L}` (GPT-2's scheme).
A sequence of :math:`T + 1` tokens gives :math:`T` predictions: the model
reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``;
:func:`sequence_losses` is the mean next-token cross-entropy of each
sequence (nats).

**Corpus.** Generated offline by sparse Markov chains over a vocabulary of
:math:`V` tokens: from each token, :math:`m` successors drawn at random, with
probabilities from a Dirichlet distribution. The clean chain's entropy rate

.. math::

   H = -\sum_i \pi_i \sum_j P_{ij} \log P_{ij}

(:math:`\pi` its stationary distribution) is the best mean loss any model
can reach on long clean sequences; the first prediction of a sequence, whose
context is one token, is no harder than the others since sequences start from
:math:`\pi`. Sources: two clean ones (the clean chain), ``other_chain`` (an
independent chain of the same kind: fluent text from another domain),
``shuffled`` (clean sequences with their tokens permuted at random: the
right unigram statistics, no order) and ``random`` (uniform tokens). Held-out
validation and test sets come from the clean chain.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from problems._base import numpy_seed

SOURCE_NAMES = ("clean_a", "clean_b", "other_chain", "shuffled", "random")
CLEAN = (True, True, False, False, False)


def init_transformer(key: jax.Array, *, vocab_size: int, seq_len: int,
                     dim: int = 32, num_layers: int = 4, num_heads: int = 4,
                     mlp_dim: int = 64, dtype=None) -> dict:
  """Parameters of the transformer (see the module docstring).

  Args:
    key: JAX key.
    vocab_size: :math:`V`.
    seq_len: :math:`T`, the longest input (predictions per sequence).
    dim: :math:`D`, divisible by ``num_heads``.
    num_layers: :math:`L`.
    num_heads: attention heads.
    mlp_dim: :math:`F`.
    dtype: parameter dtype (default: JAX's default float).
  """
  if dim % num_heads:
    raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
  for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                      ("num_layers", num_layers), ("mlp_dim", mlp_dim)):
    if value < 1:
      raise ValueError(f"{name} must be positive; got {value}.")
  dtype = dtype or jnp.zeros(()).dtype
  keys = jax.random.split(key, 7)
  std = 0.02
  residual = std / math.sqrt(2 * num_layers)

  def normal(k, shape, scale):
    return (scale * jax.random.normal(k, shape)).astype(dtype)

  return {
      "embed": normal(keys[0], (vocab_size, dim), std),
      "position": normal(keys[1], (seq_len, dim), std),
      "layers": {
          "attn_norm": jnp.ones((num_layers, dim), dtype),
          "qkv": normal(keys[2], (num_layers, dim, 3 * dim), std),
          "attn_out": normal(keys[3], (num_layers, dim, dim), residual),
          "mlp_norm": jnp.ones((num_layers, dim), dtype),
          "mlp_in": normal(keys[4], (num_layers, dim, mlp_dim), std),
          "mlp_out": normal(keys[5], (num_layers, mlp_dim, dim), residual),
      },
      "final_norm": jnp.ones((dim,), dtype),
      "head": normal(keys[6], (dim, vocab_size), std),
  }


def _rms_norm(h, scale):
  return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6
                           ) * scale


def _attention(h, qkv, out, num_heads):
  batch, length, dim = h.shape
  head_dim = dim // num_heads
  q, k, v = jnp.split(h @ qkv, 3, axis=-1)

  def heads(a):
    return a.reshape(batch, length, num_heads, head_dim)

  scores = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / math.sqrt(
      head_dim)
  causal = jnp.tril(jnp.ones((length, length), bool))
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v))
  return mixed.reshape(batch, length, dim) @ out


def transformer_logits(params: dict, tokens: jax.Array, *,
                       num_heads: int) -> jax.Array:
  """Next-token logits, ``(b, t, V)``, for ``tokens`` of shape ``(b, t)``,
  ``t <= T``; position ``i`` sees tokens ``0..i`` only."""
  length = tokens.shape[1]
  h = params["embed"][tokens] + params["position"][:length]

  def layer(h, weights):
    h = h + _attention(_rms_norm(h, weights["attn_norm"]), weights["qkv"],
                       weights["attn_out"], num_heads)
    hidden = jax.nn.gelu(_rms_norm(h, weights["mlp_norm"]) @ weights["mlp_in"])
    return h + hidden @ weights["mlp_out"], None

  h, _ = jax.lax.scan(layer, h, params["layers"])
  return _rms_norm(h, params["final_norm"]) @ params["head"]


def sequence_losses(params: dict, tokens: jax.Array, *,
                    num_heads: int) -> jax.Array:
  """Mean next-token cross-entropy of each sequence, ``(b,)``, in nats.

  ``tokens`` has shape ``(b, T + 1)``: the model reads the first ``T`` and
  predicts the last ``T``.
  """
  logits = transformer_logits(params, tokens[:, :-1], num_heads=num_heads)
  targets = tokens[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)


def sparse_chain(rng: np.random.Generator, vocab_size: int, *,
                 num_successors: int = 3, concentration: float = 0.5
                 ) -> np.ndarray:
  """A transition matrix with ``num_successors`` nonzeros per row.

  Redrawn until the chain is irreducible and aperiodic (a positive power),
  so its stationary distribution is unique and every token is reached.
  """
  for _ in range(100):
    matrix = np.zeros((vocab_size, vocab_size))
    for row in range(vocab_size):
      successors = rng.choice(vocab_size, num_successors, replace=False)
      matrix[row, successors] = rng.dirichlet(
          np.full(num_successors, concentration))
    # Boolean powers by repeated squaring: P^(2^k) > 0 everywhere for some
    # k with 2^k >= V^2 (Wielandt's bound) iff the chain is primitive.
    reach = matrix > 0
    for _ in range(2 * max(1, int(np.ceil(np.log2(vocab_size)))) + 1):
      reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    if reach.all():
      return matrix
  raise RuntimeError("no irreducible aperiodic chain found")  # pragma: no cover


def stationary(matrix: np.ndarray) -> np.ndarray:
  """The stationary distribution :math:`\\pi = \\pi P`."""
  values, vectors = np.linalg.eig(matrix.T)
  vector = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
  return vector / vector.sum()


def entropy_rate(matrix: np.ndarray) -> float:
  """:math:`-\\sum_i \\pi_i \\sum_j P_{ij} \\log P_{ij}` in nats."""
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.where(matrix > 0, np.log(matrix), 0.0)
  return float(-stationary(matrix) @ np.sum(matrix * logs, axis=1))


def sample_chain(rng: np.random.Generator, matrix: np.ndarray,
                 num_sequences: int, length: int) -> np.ndarray:
  """``(num_sequences, length)`` int32 tokens, starting from :math:`\\pi`."""
  vocab_size = matrix.shape[0]
  cumulative = np.cumsum(matrix, axis=1)
  tokens = np.empty((num_sequences, length), np.int32)
  tokens[:, 0] = rng.choice(vocab_size, num_sequences, p=stationary(matrix))
  for t in range(1, length):
    draws = rng.random(num_sequences)[:, None]
    rows = cumulative[tokens[:, t - 1]]
    tokens[:, t] = np.minimum((draws > rows).sum(axis=1), vocab_size - 1)
  return tokens


def text_sources(key: jax.Array | None = None, *, vocab_size: int = 32,
                 seq_len: int = 32, num_per_source: int = 512,
                 num_val: int = 256, num_test: int = 512,
                 num_successors: int = 3) -> dict:
  """The multi-source corpus of the module docstring.

  Args:
    key: JAX key (default ``jax.random.key(0)``).
    vocab_size: :math:`V`.
    seq_len: :math:`T`; every sequence has ``T + 1`` tokens.
    num_per_source: training sequences per source.
    num_val: clean validation sequences.
    num_test: clean test sequences.
    num_successors: nonzero transitions per token of both chains.

  Returns:
    A dict: ``train_tokens`` ``(5 n, T + 1)`` int32, ``train_source``
    ``(5 n,)`` int32 (in the order of ``source_names``), ``val_tokens``,
    ``test_tokens``, ``source_names``, ``clean`` (bool per source),
    ``entropy_rate`` (of the clean chain, nats) and ``chain`` (its matrix).
  """
  if num_successors < 1 or num_successors > vocab_size:
    raise ValueError(f"num_successors must be in [1, vocab_size]; got "
                     f"{num_successors}.")
  rng = np.random.default_rng(numpy_seed(
      jax.random.key(0) if key is None else key))
  clean = sparse_chain(rng, vocab_size, num_successors=num_successors)
  other = sparse_chain(rng, vocab_size, num_successors=num_successors)
  length = seq_len + 1
  shuffled = sample_chain(rng, clean, num_per_source, length)
  shuffled = np.take_along_axis(
      shuffled, np.argsort(rng.random(shuffled.shape), axis=1), axis=1)
  parts = [sample_chain(rng, clean, num_per_source, length),
           sample_chain(rng, clean, num_per_source, length),
           sample_chain(rng, other, num_per_source, length),
           shuffled,
           rng.integers(0, vocab_size, (num_per_source, length))]
  return {
      "train_tokens": np.concatenate(parts).astype(np.int32),
      "train_source": np.repeat(np.arange(len(parts)),
                                num_per_source).astype(np.int32),
      "val_tokens": sample_chain(rng, clean, num_val, length),
      "test_tokens": sample_chain(rng, clean, num_test, length),
      "source_names": SOURCE_NAMES, "clean": np.array(CLEAN),
      "entropy_rate": entropy_rate(clean), "chain": clean,
  }


__all__ = ["entropy_rate", "init_transformer", "sample_chain",
           "sequence_losses", "sparse_chain", "stationary", "text_sources",
           "transformer_logits"]
