r"""LISA: train a few randomly chosen blocks of a model at a time.

Layerwise Importance Sampled AdamW (Pan et al., "LISA: Layerwise Importance
Sampling for Memory-Efficient Large Language Model Fine-Tuning", NeurIPS
2024), as ScaleBiO uses it: of the :math:`L` blocks of a model (e.g. its
transformer layers), only :math:`n` drawn uniformly at random without
replacement are trained; every :math:`K` steps a new set is drawn. The
parameters outside the blocks (embeddings, head, final norm) are always
trained.

:func:`lisa` is an optax ``GradientTransformation`` that wraps any inner
optimizer, so every solver of the library can use it wherever it takes an
optimizer. It expects the blocks **stacked** on a leading axis, as
scan-over-layers models store them: ``blocks`` selects the leaves (e.g. the
subtree ``"layers"``), all with the same leading size :math:`L`. At step
:math:`t`, with :math:`e = \lfloor t / K \rfloor` and the active indices
:math:`A_e \subset \{0, \dots, L-1\}`, :math:`|A_e| = n`:

.. math::

   u^{\text{rest}}_t &= \text{inner}(\nabla^{\text{rest}}_t) \\
   u^{\text{blocks}}_t[A_e] &= \text{inner}(\nabla^{\text{blocks}}_t[A_e]),
   \qquad u^{\text{blocks}}_t[l] = 0 \quad (l \notin A_e).

**Memory.** The inner state of the blocks has the shape of the :math:`n`
active slices, not of all :math:`L`: frozen blocks carry no optimizer state
(AdamW's two moments cost :math:`2 n / L` of the blocks' size instead of 2).
When the active set changes, the blocks' inner state restarts from
``inner.init`` (a block that starts training starts fresh). The rest keeps
its state. Put a learning-rate schedule *outside* the transformation (as
:func:`lisa_adamw` does), so it follows the global step and not the
restarted counts. The gradient itself is still computed for every block by
``jax.grad`` and then sliced (XLA does not know which blocks are active at
compile time), so the peak gradient memory does not shrink; in PyTorch's
LISA it does, through ``requires_grad=False``.

**Randomness.** The active sets are drawn from a key in the state
(``jax.random.fold_in(key, e)``), so they are reproducible, checkpointable and
vmappable. :func:`reseed` replaces the key in an optimizer state; ScaleBiO
reseeds the two models' optimizers with independent keys.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel._validation import check_positive, check_positive_int

PyTree = Any


class LISAState(NamedTuple):
  """State of :func:`lisa`.

  Attributes:
    count: updates done.
    key: raw ``uint32[2]`` key data the active sets are drawn from.
    active: indices of the active blocks, ``int32[n]``.
    rest_state: the inner state of the parameters outside the blocks.
    block_state: the inner state of the active slices of the blocks.
  """
  count: jax.Array
  key: jax.Array
  active: jax.Array
  rest_state: PyTree
  block_state: PyTree


def _selector(blocks: str | Callable[[tuple], bool]) -> Callable[[tuple],
                                                                   bool]:
  """``path -> bool`` from a subtree name or a predicate on key paths."""
  if callable(blocks):
    return blocks
  if not isinstance(blocks, str) or not blocks:
    raise TypeError("blocks must be the name of the subtree of stacked "
                    "blocks (e.g. 'layers') or a predicate path -> bool; "
                    f"got {blocks!r}.")

  def select(path) -> bool:
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
             for k in path]
    return blocks in names
  return select


def block_mask(params: PyTree, blocks: str | Callable[[tuple], bool]
               ) -> PyTree:
  """A pytree of bools like ``params``: true on the leaves of the blocks."""
  select = _selector(blocks)
  return jax.tree_util.tree_map_with_path(lambda p, _: select(p), params)


def num_blocks(params: PyTree, blocks: str | Callable[[tuple], bool]) -> int:
  """:math:`L`, the common leading size of the block leaves.

  Raises:
    ValueError: if no leaf is selected or the leading sizes differ.
  """
  mask = block_mask(params, blocks)
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
           for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
           if m}
  if not sizes:
    raise ValueError(f"blocks={blocks!r} selects no leaf of the parameters "
                     f"{jax.tree.map(jnp.shape, params)}.")
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"The leaves selected by blocks={blocks!r} must share a leading "
        f"(block) axis; their leading sizes are {sorted(map(str, sizes))}. "
        "Stack the blocks, e.g. jax.tree.map(lambda *a: jnp.stack(a), "
        "*layers).")
  return sizes.pop()


def _split(tree: PyTree, mask: PyTree, active: jax.Array):
  """``(rest, block_slices)``: ``None`` where a leaf belongs to the other."""
  rest = jax.tree.map(lambda leaf, m: None if m else leaf, tree, mask)
  slices = jax.tree.map(lambda leaf, m: leaf[active] if m else None, tree,
                        mask)
  return rest, slices


def _is_none(value) -> bool:
  return value is None


def _merge(rest: PyTree, slices: PyTree, params: PyTree, mask: PyTree,
           active: jax.Array) -> PyTree:
  """Full-size updates: the rest's, and the slices' placed at ``active``.

  The slices are placed by a product with the one-hot matrix of ``active``
  (exact: one term per row), which XLA fuses into the consumer; a scatter
  into zeros costs one more full-size buffer per leaf (measured: 48 MiB on
  the 8-layer transformer of ``paper_repro/scalebio``).
  """
  def merge(r, s, leaf, m):
    if m:
      onehot = jax.nn.one_hot(active, leaf.shape[0], dtype=leaf.dtype)
      return jnp.tensordot(onehot, s.astype(leaf.dtype), axes=([0], [0]))
    return r
  return jax.tree.map(merge, rest, slices, params, mask, is_leaf=_is_none)


def draw_active(key_data: jax.Array, epoch: jax.Array, num_blocks_: int,
                num_active: int) -> jax.Array:
  """The active blocks of period ``epoch``: ``num_active`` of ``range(L)``."""
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), epoch)
  if num_active == num_blocks_:
    return jnp.arange(num_blocks_, dtype=jnp.int32)
  return jnp.sort(jax.random.choice(key, num_blocks_, (num_active,),
                                    replace=False)).astype(jnp.int32)


def lisa(inner: optax.GradientTransformation, *,
         blocks: str | Callable[[tuple], bool], num_active: int,
         period: int, seed: int = 0) -> optax.GradientTransformation:
  r"""Trains ``num_active`` random blocks at a time (see the module doc).

  Args:
    inner: the optimizer of the trained parameters, e.g.
      ``optax.scale_by_adam()``; a learning-rate schedule belongs outside
      (``optax.chain(lisa(...), optax.scale_by_learning_rate(schedule))``).
    blocks: the name of the subtree holding the stacked blocks (any key on
      a leaf's path equal to it), or a predicate ``path -> bool`` on
      ``jax.tree_util`` key paths.
    num_active: :math:`n`, blocks trained at a time (``1 <= n <= L``;
      :math:`n = L` trains everything and never restarts the state).
    period: :math:`K`, updates between two draws.
    seed: seed of the key of the draws (:func:`reseed` replaces it).

  Returns:
    An optax ``GradientTransformation`` with :class:`LISAState`. Updates of
    the frozen blocks are exactly zero. ``update`` needs ``params``.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError("lisa wraps an optax optimizer (e.g. "
                    f"optax.scale_by_adam()); got {type(inner).__name__}.")
  check_positive_int("num_active", num_active)
  check_positive_int("period", period)
  _selector(blocks)
  key_data = jax.random.key_data(jax.random.key(seed))

  def init(params):
    size = num_blocks(params, blocks)
    if num_active > size:
      raise ValueError(f"num_active={num_active} exceeds the number of "
                       f"blocks ({size}).")
    mask = block_mask(params, blocks)
    active = draw_active(key_data, jnp.zeros((), jnp.int32), size,
                         num_active)
    rest, slices = _split(params, mask, active)
    return LISAState(count=jnp.zeros((), jnp.int32), key=key_data,
                     active=active, rest_state=inner.init(rest),
                     block_state=inner.init(slices))

  def update(updates, state: LISAState, params=None):
    if params is None:
      raise ValueError("lisa needs params in update(updates, state, "
                       "params).")
    size = num_blocks(params, blocks)
    mask = block_mask(params, blocks)
    epoch = state.count // period
    active = draw_active(state.key, epoch, size, num_active)
    rest_params, slice_params = _split(params, mask, active)
    if num_active == size:
      block_state = state.block_state
    else:
      block_state = jax.lax.cond(
          state.count % period == 0, lambda: inner.init(slice_params),
          lambda: state.block_state)
    rest_grads, slice_grads = _split(updates, mask, active)
    rest_updates, rest_state = inner.update(rest_grads, state.rest_state,
                                            rest_params)
    slice_updates, block_state = inner.update(slice_grads, block_state,
                                              slice_params)
    full = _merge(rest_updates, slice_updates, params, mask, active)
    return full, LISAState(state.count + 1, state.key, active, rest_state,
                           block_state)

  return optax.GradientTransformation(init, update)


def lisa_adamw(learning_rate: Any, *, blocks: str | Callable[[tuple], bool],
               num_active: int, period: int, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, seed: int = 0
               ) -> optax.GradientTransformation:
  r"""AdamW under LISA: ``optax.adamw`` with only the active blocks trained.

  ``chain(lisa(chain(scale_by_adam, add_decayed_weights)),
  scale_by_learning_rate)``: the same chain as ``optax.adamw``, so with
  ``num_active`` equal to the number of blocks it *is* AdamW. Frozen blocks
  get no weight decay.

  Args:
    learning_rate: a number or an optax schedule of the global step.
    blocks, num_active, period, seed: as for :func:`lisa`.
    b1, b2, eps, weight_decay: as for ``optax.adamw``.
  """
  check_positive("weight_decay", weight_decay, allow_zero=True)
  inner = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                      optax.add_decayed_weights(weight_decay))
  return optax.chain(
      lisa(inner, blocks=blocks, num_active=num_active, period=period,
           seed=seed),
      optax.scale_by_learning_rate(learning_rate))


def reseed(opt_state: PyTree, key: jax.Array) -> PyTree:
  """``opt_state`` with the key of every :class:`LISAState` replaced.

  Nested LISA states get keys folded from ``key`` in the order they appear.
  The active set of the first period is redrawn at the first update.

  Args:
    opt_state: an optax state that may contain :class:`LISAState` nodes.
    key: a JAX key (typed or raw).
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  counter = iter(range(1 << 30))

  def replace(node):
    if isinstance(node, LISAState):
      data = jax.random.key_data(jax.random.fold_in(key, next(counter)))
      return node._replace(key=data.astype(node.key.dtype))
    return node

  return jax.tree.map(replace, opt_state,
                      is_leaf=lambda n: isinstance(n, LISAState))


def active_blocks(opt_state: PyTree) -> list[jax.Array]:
  """The active indices of every :class:`LISAState` in ``opt_state``."""
  found = []
  jax.tree.map(lambda n: found.append(n.active) if isinstance(n, LISAState)
               else None, opt_state,
               is_leaf=lambda n: isinstance(n, LISAState))
  return found


__all__ = ["LISAState", "active_blocks", "block_mask", "draw_active", "lisa",
           "lisa_adamw", "num_blocks", "reseed"]
