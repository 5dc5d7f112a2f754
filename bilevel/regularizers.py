r"""Regularizers with per-example strengths, for hyperparameters no gradient reaches.

Each function takes the strength of every example of a batch (a ``(B,)``
array, e.g. ``hp.values["dropout"]`` of a
:class:`bilevel.best_response.Hyperparameters`) and a PRNG key, and works
inside a jitted step. The strengths carry no gradient (``stop_gradient``):
in Self-Tuning Networks the training loss is not differentiated with
respect to the hyperparameters, and the validation loss applies no
regularizer, so their gradient reaches them only through the best-response
model (the official code detaches dropout rates the same way).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def _per_example(strength: jax.Array, inputs: jax.Array,
                 name: str) -> jax.Array:
  """``strength`` as ``(B, 1, ..., 1)`` to broadcast against ``inputs``."""
  strength = jax.lax.stop_gradient(jnp.asarray(strength, inputs.dtype))
  if strength.ndim == 0:
    strength = jnp.broadcast_to(strength, inputs.shape[:1])
  if strength.shape != inputs.shape[:1]:
    raise ValueError(
        f"{name} needs one strength per example: shape ({inputs.shape[0]},) "
        f"for inputs of shape {inputs.shape}; got {strength.shape}.")
  return strength.reshape(strength.shape + (1,) * (inputs.ndim - 1))


def dropout(key: jax.Array, inputs: jax.Array, rate: jax.Array) -> jax.Array:
  r"""Inverted dropout with a rate per example.

  .. math:: \text{out}_{b,i} = x_{b,i}\, m_{b,i} / (1 - p_b), \quad
            m_{b,i} \sim \text{Bernoulli}(1 - p_b).

  Args:
    key: PRNG key of the masks.
    inputs: ``(B, ...)``.
    rate: :math:`p_b`, ``(B,)`` (or a scalar), in ``[0, 1)``.
  """
  rate = _per_example(rate, inputs, "dropout")
  keep = jax.random.uniform(key, inputs.shape, inputs.dtype) >= rate
  return jnp.where(keep, inputs / (1 - rate), jnp.zeros_like(inputs))


def gaussian_noise(key: jax.Array, inputs: jax.Array,
                   scale: jax.Array) -> jax.Array:
  r"""Additive Gaussian noise, :math:`x_b + s_b \epsilon`,
  :math:`\epsilon \sim N(0, I)`, with a scale :math:`s_b` per example."""
  scale = _per_example(scale, inputs, "gaussian_noise")
  return inputs + scale * jax.random.normal(key, inputs.shape, inputs.dtype)


def _shift_axis(values: jax.Array, offset: jax.Array, axis: int) -> jax.Array:
  """``values`` moved by ``offset`` along ``axis``, zeros filling in."""
  length = values.shape[axis]
  source = jnp.arange(length) - offset
  inside = (source >= 0) & (source < length)
  moved = jnp.take(values, jnp.clip(source, 0, length - 1), axis=axis)
  shape = [1] * values.ndim
  shape[axis] = length
  return jnp.where(inside.reshape(shape), moved, jnp.zeros_like(moved))


def random_shift(key: jax.Array, inputs: jax.Array, max_shift: jax.Array,
                 axes: Sequence[int] = (1, 2)) -> jax.Array:
  r"""Random translations with a per-example range (data augmentation).

  Example :math:`b` moves by an integer offset drawn uniformly from
  :math:`\{-m_b, \dots, m_b\}` along each of ``axes`` (independently),
  and the pixels that come in are zeros: a digit image ``(B, 8, 8)`` with
  ``axes=(1, 2)``, a signal ``(B, L, C)`` with ``axes=(1,)``.

  Args:
    key: PRNG key of the offsets.
    inputs: ``(B, ...)``.
    max_shift: :math:`m_b`, ``(B,)`` non-negative (rounded down), e.g. a
      :func:`bilevel.best_response.discrete` hyperparameter.
    axes: the axes to shift along (not 0).
  """
  max_shift = jnp.floor(_per_example(max_shift, inputs, "random_shift")
                        .reshape(inputs.shape[:1]))
  axes = tuple(int(a) % inputs.ndim for a in axes)
  if 0 in axes or len(set(axes)) != len(axes):
    raise ValueError(f"random_shift axes must be distinct and exclude the "
                     f"batch axis 0; got {axes}.")
  uniform = jax.random.uniform(key, (len(axes), inputs.shape[0]),
                               inputs.dtype)
  offsets = jnp.floor(uniform * (2 * max_shift + 1)) - max_shift
  offsets = offsets.astype(jnp.int32)

  def one(example, example_offsets):
    for i, axis in enumerate(axes):
      example = _shift_axis(example, example_offsets[i], axis - 1)
    return example

  return jax.vmap(one, in_axes=(0, 1))(inputs, offsets)


def l2(params: PyTree, coefficient: jax.Array) -> jax.Array:
  r""":math:`\frac{c}{2} \sum \|w\|^2` over the leaves of ``params``.

  Args:
    coefficient: :math:`c`, a scalar; with per-example values pass their
      mean (or, per example, combine with each example's own weights).
  """
  coefficient = jax.lax.stop_gradient(jnp.asarray(coefficient))
  if coefficient.ndim:
    raise ValueError("l2 takes a scalar coefficient (e.g. the mean of the "
                     f"per-example values); got shape {coefficient.shape}.")
  squares = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(params))
  return 0.5 * coefficient * squares
