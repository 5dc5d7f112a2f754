r"""ScaleBiO: first-order minimax bilevel optimization for data reweighting.

The bilevel problem :math:`\min_\lambda L_1(w^*(\lambda))`,
:math:`w^*(\lambda) = \arg\min_w L_2(w, \lambda)` is replaced by the minimax
value-function penalty

.. math::

   \min_{w, \lambda}\ \max_u\ L_1(w) + \alpha \bigl(L_2(w, \lambda)
       - L_2(u, \lambda)\bigr),

where :math:`u` tracks :math:`\arg\min_u L_2(u, \lambda)` and :math:`\alpha`
is the penalty. In the library's names: ``x`` is :math:`\lambda`, ``y`` is
:math:`u` (the model of the lower problem alone, which never sees the
validation data: ``result.y``), ``y_penalized`` is :math:`w` (the model
trained on the penalised objective, validation loss included:
``result.y_penalized``), ``f = L_1`` and ``g = L_2``. For data
reweighting, :math:`\lambda` holds the logits of the source weights
:math:`p = \mathrm{softmax}(\lambda)` and ``g`` is
:func:`bilevel.reweighting.source_weighted_loss` (the per-batch, per-source
normalisation :math:`p_s / n_B(s)`); the solver itself works for any
problem. One step, at :math:`(\lambda_t, u_t, w_t)` with one training batch
:math:`B` and one validation batch :math:`V`, all gradients at the current
point and the three updates simultaneous (as the official code):

.. math::

   d_u &= \alpha_t \nabla_u L_2(u_t, \lambda_t; B) \\
   d_w &= \nabla_w L_1(w_t; V) + \alpha_t \nabla_w L_2(w_t, \lambda_t; B) \\
   d_\lambda &= \nabla_\lambda L_1(w_t; V) + \alpha_t \bigl(
        \nabla_\lambda L_2(w_t, \lambda_t; B)
        - \nabla_\lambda L_2(u_t, \lambda_t; B)\bigr) \\
   u_{t+1} &= u_t + \mathrm{opt}_u(d_u), \quad
   w_{t+1} = w_t + \mathrm{opt}_w(d_w), \quad
   \lambda_{t+1} = \lambda_t + \mathrm{opt}_\lambda(d_\lambda),

each ``opt`` an optax optimizer (AdamW by default, as the paper;
:math:`\mathrm{opt}_w` is ``lower_optimizer``, :math:`\mathrm{opt}_u` is
``z_optimizer``). ``u`` and ``w`` see the **same** batch :math:`B`:
:math:`d_\lambda` is a difference of two gradients, and common samples keep
its variance small. One backward pass
of ``g`` at ``w`` gives both :math:`\nabla_w L_2` and :math:`\nabla_\lambda
L_2` (likewise at ``u``): a step costs ``1 Gf + 2 Gg``, no second
derivatives, and two copies of the model.

**Against the official code** (``python/minmax.py`` of
https://github.com/2003pro/ScaleBiO, commit 8ddf5c2, and
``math/dev_scalebio/python/minmax.py`` of
https://github.com/research4pan/scalebio, commit b9ccce8):

- the code updates :math:`u` with a ``maximize=True`` optimizer on
  :math:`-\alpha L_2(u)`, i.e. by *descent* on :math:`\alpha L_2(u)`: here
  it is written as descent;
- with Adam the :math:`\alpha` scaling of :math:`d_u` and :math:`d_\lambda`
  cancels (Adam is scale invariant up to its :math:`\epsilon`); it still
  sets the balance of :math:`L_1` and :math:`L_2` in :math:`d_w`. With SGD
  (a step size given as a number, the setting of the theory) :math:`\alpha`
  also scales the steps;
- the code's AdamW of :math:`\lambda` inherits PyTorch's default weight
  decay 0.01, a shrinkage of the logits toward uniform weights that the
  paper does not mention: the default here has none (pass
  ``optax.adamw(1e-2, weight_decay=0.01)`` to reproduce the code);
- the code's second version clips the gradient norms of :math:`u` and
  :math:`w` at :math:`\alpha`; chain ``optax.clip_by_global_norm`` into the
  optimizers for that.

**LISA** (:mod:`bilevel.lisa`): pass ``bilevel.lisa.lisa_adamw(...)`` (or any
optimizer wrapped by :func:`bilevel.lisa.lisa`) as ``lower_optimizer``; the
optimizers of ``u`` and ``w`` are then reseeded at ``init`` from the key, so
their active blocks are drawn independently, as in the paper.

**Output.** The learned weights :math:`p = \mathrm{softmax}(\lambda)` (in
``ScaleBiOInfo.weights``); the paper's gains come from a second training run
on data resampled with :math:`p` (:func:`bilevel.reweighting.resample`), not
from :math:`w` itself, which has trained on the validation data through
:math:`L_1` (evaluate :math:`u`, ``result.y``, if a model of this run is
wanted).

**Bias.** ScaleBiO minimises the value-function penalty with weight alpha;
for a mu-strongly convex lower level its minimiser is O(1/(alpha mu)) away
from x*, as for :func:`bilevel.solvers.f2sa`, and AdamW's constant steps do
not settle on it. On the quadratics of ``tests/conformance/quadratics.py``
(x in R^50, y in R^40, lower level 1-smooth and mu = 1/kappa strongly
convex), the defaults (alpha = 10, AdamW) stop after 5000 steps at relative
error 0.15 (kappa = 2) and 0.97 (kappa = 100), with or without minibatches;
the penalty's own minimiser is at 0.14 and 0.69, falling like 1.7/alpha and
23/alpha. SGD steps with a large alpha remove the bias: ``penalty=1e8,
lower_optimizer=5e-9, upper_optimizer=0.2`` reach 1.7e-8 and 2.3e-7 after
20000 steps. Take alpha >= 1/(eps mu), in float64
(``tests/test_defaults.py``).

References:
  Pan, Zhang, Pi, Liu, Zhang, Yang & Zhang, "ScaleBiO: Scalable bilevel
  optimization for LLM data reweighting", arXiv 2406.19976 (ACL 2025).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, lisa
from bilevel._problem import Problem
from bilevel._validation import as_optimizer, as_schedule

PyTree = Any

# Salt of the key the LISA draws of u and w are folded from (independent of
# the sampler's use of the same key).
_LISA_SALT = 0x5CA1EB10


class ScaleBiOState(NamedTuple):
  """State of :func:`scalebio`.

  Attributes:
    x: :math:`\\lambda` (the logits of the source weights).
    y: :math:`u`, the model that tracks :math:`\\arg\\min L_2` (trained on
      the weighted training loss alone; ``result.y``).
    y_penalized: :math:`w`, the model trained on the penalised objective
      :math:`L_1 + \\alpha L_2` (``result.y_penalized``).
    upper_opt_state, y_opt_state, y_penalized_opt_state: the optimizer
      states of ``x`` (``upper_optimizer``), ``y`` (``z_optimizer``) and
      ``y_penalized`` (``lower_optimizer``).
    sampler: minibatch sampler.
    num_steps: steps taken.
  """
  x: PyTree
  y: PyTree
  y_penalized: PyTree
  upper_opt_state: PyTree
  y_opt_state: PyTree
  y_penalized_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


class ScaleBiOInfo(NamedTuple):
  """Diagnostics of one :func:`scalebio` step (on that step's batches).

  Attributes (:math:`w` is ``y_penalized``, :math:`u` is ``y``):
    upper_loss: :math:`L_1(w_t; V)`.
    lower_loss: :math:`L_2(w_t, \\lambda_t; B)`.
    lower_gap: :math:`L_2(w_t) - L_2(u_t)` on ``B`` (the penalty's argument).
    lower_grad_norm: :math:`\\|\\nabla_u L_2(u_t)\\|`.
    hypergradient_norm: :math:`\\|d_\\lambda\\|`.
    penalty: :math:`\\alpha_t`.
    weights: :math:`\\mathrm{softmax}(\\lambda_{t+1})` when ``x`` is a
      vector of logits, else an empty array (a NaN there would read as a
      divergence to ``bilevel.run``).
  """
  upper_loss: jax.Array
  lower_loss: jax.Array
  lower_gap: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  penalty: jax.Array
  weights: jax.Array


def _weights(x: PyTree, dtype) -> jax.Array:
  if isinstance(x, jax.Array) and x.ndim == 1:
    return jax.nn.softmax(x)
  return jnp.zeros((0,), dtype)


def scalebio(problem: Problem, *, upper_optimizer: Any = None,
             lower_optimizer: Any = None, z_optimizer: Any = None,
             penalty: Any = 10.0) -> _base.BilevelSolver:
  r"""ScaleBiO (see the module docstring for the update rule).

  **Which y to use.** ``y`` (:math:`u`; ``state.y``, ``result.y``) descends
  :math:`L_2` alone and never saw the validation data: it is the model to
  evaluate or deploy. ``y_penalized`` (:math:`w`; ``state.y_penalized``,
  ``result.y_penalized``) descends :math:`L_1 + \alpha L_2`, so it has
  trained on the validation data; it approaches the optimistic lower
  solution (the minimiser of :math:`L_2` best for :math:`L_1`) as
  :math:`\alpha` grows, the one to report when the lower solutions are not
  unique. ``init(x, y0)`` starts both at ``y0``.

  Args:
    problem: the bilevel problem; ``x`` the upper variable (the logits
      :math:`\lambda` for data reweighting), ``f`` the validation loss
      :math:`L_1`, ``g`` the weighted training loss :math:`L_2`.
    upper_optimizer: optax optimizer, step size or schedule for
      :math:`\lambda`; default ``optax.adamw(1e-2, weight_decay=0.0)`` (the
      paper's step size).
    lower_optimizer: the same for :math:`w` (``y_penalized``); default
      ``optax.adamw(1e-3,
      weight_decay=5e-4)`` (the code's weight decay; its step size 1e-5 is
      for fine-tuning pretrained LLMs, 1e-3 suits the small models trained
      from scratch here). A :mod:`bilevel.lisa` optimizer enables LISA.
    z_optimizer: the same for :math:`u` (``y``; the argument keeps the
      name of the iterate's former field ``z``); default:
      ``lower_optimizer`` (its own state, and with LISA its own key).
    penalty: :math:`\alpha_t`, a positive number or a schedule of the step
      (the paper multiplies it by :math:`\tau` per outer epoch, with
      :math:`\tau = 1` in every script); default 10 (the GPT-2 demo).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`ScaleBiOState` and
    :class:`ScaleBiOInfo`; one step costs ``1 Gf + 2 Gg``.
  """
  _base.require_unconstrained(problem, "scalebio")
  upper_optimizer = as_optimizer(
      "upper_optimizer", optax.adamw(1e-2, weight_decay=0.0)
      if upper_optimizer is None else upper_optimizer)
  lower_optimizer = as_optimizer(
      "lower_optimizer", optax.adamw(1e-3, weight_decay=5e-4)
      if lower_optimizer is None else lower_optimizer)
  z_optimizer = (lower_optimizer if z_optimizer is None
                 else as_optimizer("z_optimizer", z_optimizer))
  penalty_fn = as_schedule("penalty", penalty)

  def init(x, y, *, key=None, data=None) -> ScaleBiOState:
    sampler = _base.prepare(problem, x, y, data, key)
    lisa_key = jax.random.fold_in(
        jax.random.key(0) if key is None else key, _LISA_SALT)
    return ScaleBiOState(
        x=x, y=y, y_penalized=y, upper_opt_state=upper_optimizer.init(x),
        y_opt_state=lisa.reseed(z_optimizer.init(y),
                                jax.random.fold_in(lisa_key, 1)),
        y_penalized_opt_state=lisa.reseed(lower_optimizer.init(y),
                                          jax.random.fold_in(lisa_key, 0)),
        sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: ScaleBiOState, data=None):
    _base.check_step_data(state.sampler, data)
    # u is y, w is y_penalized.
    x, y, y_penalized = state.x, state.y, state.y_penalized
    alpha = penalty_fn(state.num_steps)
    lower_batch, sampler = _data.sample(state.sampler, data, "lower")
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    # One backward pass each: L2 at u and at w (same batch B), L1 at w.
    lower_at_y, (gx_y, gy_y) = jax.value_and_grad(problem.lower, (0, 1))(
        x, y, lower_batch)
    lower_at_penalized, (gx_penalized, gy_penalized) = jax.value_and_grad(
        problem.lower, (0, 1))(x, y_penalized, lower_batch)
    upper_loss, (fx, fy) = jax.value_and_grad(problem.upper, (0, 1))(
        x, y_penalized, upper_batch)
    d_y = jax.tree.map(lambda g: (alpha * g).astype(g.dtype), gy_y)
    d_penalized = jax.tree.map(lambda f, g: (f + alpha * g).astype(f.dtype),
                               fy, gy_penalized)
    d_x = jax.tree.map(lambda f, a, b: (f + alpha * (a - b)).astype(f.dtype),
                       fx, gx_penalized, gx_y)
    y_updates, y_opt_state = z_optimizer.update(d_y, state.y_opt_state, y)
    penalized_updates, y_penalized_opt_state = lower_optimizer.update(
        d_penalized, state.y_penalized_opt_state, y_penalized)
    y = problem.projected_y(optax.apply_updates(y, y_updates))
    y_penalized = problem.projected_y(
        optax.apply_updates(y_penalized, penalized_updates))
    x, upper_opt_state = _base.update_x(problem, upper_optimizer, d_x,
                                        state.upper_opt_state, x)
    info = ScaleBiOInfo(
        upper_loss=upper_loss, lower_loss=lower_at_penalized,
        lower_gap=lower_at_penalized - lower_at_y,
        lower_grad_norm=optax.tree.norm(gy_y),
        hypergradient_norm=optax.tree.norm(d_x),
        penalty=jnp.asarray(alpha, upper_loss.dtype),
        weights=_weights(x, upper_loss.dtype))
    return ScaleBiOState(
        x=x, y=y, y_penalized=y_penalized, upper_opt_state=upper_opt_state,
        y_opt_state=y_opt_state, y_penalized_opt_state=y_penalized_opt_state,
        sampler=sampler, num_steps=state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1, lower_grads=2, hvps=0,
                                   cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
