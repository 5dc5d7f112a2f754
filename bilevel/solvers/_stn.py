r"""Self-Tuning Networks: hyperparameters tuned through a best-response model.

Hyperparameter optimisation :math:`\min_\lambda L_V(w^*(\lambda))`,
:math:`w^*(\lambda) = \arg\min_w L_T(w, \lambda)`, where the training loss
:math:`L_T` may depend on :math:`\lambda` through no gradient at all
(dropout rates, augmentation, discrete choices). STN fits a best-response
model :math:`\hat w_\phi(\tilde\lambda)` (a hypernetwork over the
unconstrained hyperparameters :math:`\tilde\lambda`,
:mod:`bilevel.best_response`) on hyperparameters drawn around the current
ones, and moves :math:`\tilde\lambda` along the validation loss of that
model. One **cycle** (one ``step``), with the Gaussian perturbation scale
:math:`\sigma = \mathrm{softplus}(\rho)`:

.. math::

   &\textbf{for } t = 1..T_{\text{train}}: \quad
      \tilde\lambda_b = \tilde\lambda + \sigma \odot \epsilon_b, \
      \epsilon_b \sim N(0, I) \text{ per example } b \text{ of a training
      batch} \\
   &\qquad \phi \leftarrow \phi - \mathrm{opt}_\phi\bigl(\nabla_\phi
      L_T(\hat w_\phi(\tilde\lambda_b), \lambda_b)\bigr)
      \quad \text{(regularizers on, at the constrained } \lambda_b) \\
   &\textbf{for } t = 1..T_{\text{val}}: \quad
      \tilde\lambda_b = \tilde\lambda + \sigma \odot \epsilon_b \text{ (or }
      \tilde\lambda \text{ without tuning } \sigma) \text{ per example of a
      validation batch} \\
   &\qquad (\tilde\lambda, \rho) \leftarrow (\tilde\lambda, \rho) -
      \mathrm{opt}\Bigl(\nabla_{\tilde\lambda, \rho}\bigl[
      L_V(\hat w_\phi(\tilde\lambda_b)) - \tau \textstyle\sum_h
      \log(\sigma_h \sqrt{2 \pi e})\bigr]\Bigr)
      \quad \text{(regularizers off; } \phi \text{ fixed)}

The first cycles, until ``num_warmup_steps`` training steps are done, skip
the validation phase (the hypernetwork first learns a response).

**Library contract.** ``x`` is a
:class:`bilevel.best_response.HyperVariables` :math:`(\tilde\lambda,
\rho)` (build it with :func:`bilevel.best_response.init_variables`), ``y``
is :math:`\phi`. The objectives receive, in place of ``x``, a
:class:`bilevel.best_response.Hyperparameters` record: ``g(hp, phi,
batch)`` is the training loss, with ``hp.unconstrained`` ``(B, H)`` rows for
the hypernetwork, ``hp.values`` the constrained per-example values for the
regularizers (:mod:`bilevel.regularizers`) and ``hp.key`` their randomness;
``f(hp, phi, batch)`` is the validation loss and must apply **no**
regularizer (``hp.key`` is ``None``). ``B`` is the leading size of the
batch (1 without data). The values carry no gradient: :math:`\tilde\lambda`
moves only through :math:`\hat w_\phi`, as in the paper (the official code
detaches dropout rates; a floor has no gradient anyway).

**Cost.** A cycle costs ``T_val Gf + T_train Gg`` (each gradient one
backward pass of the hypernetwork; no second derivatives), about twice a
plain network's cost per pass with the structured layers.

**Defaults** are the paper's CNN settings (the argparse defaults of
``cnn/hypertrain.py`` and the command of the README in the official code,
https://github.com/asteroidhouse/self-tuning-networks, commit 3c42049):
:math:`\phi` by SGD 0.01 with momentum 0.9, :math:`\tilde\lambda` and
:math:`\rho` by Adam 3e-3,
:math:`T_{\text{train}} = 2`, :math:`T_{\text{val}} = 1`, a warm-up of 5
epochs of the training data, :math:`\tau = 10^{-3}` (the code's README
setting with tuned scales; its argparse default 1e-5 is for fixed scales),
:math:`\sigma_0 = 0.5` (in ``init_variables``). The code's learning-rate
decay on a validation plateau is left to the caller (an optax schedule or
``optax.contrib.reduce_on_plateau`` in ``lower_optimizer``).

**Against the official code** (the same repository: ``cnn/hypertrain.py``,
``cnn/hypermodels``, ``cnn/util/hyperparameter.py``,
``cnn/datasets/loaders.py``):
the validation phase perturbs its rows only when it tunes :math:`\sigma`
(as the code; the paper's text leaves it open); every regularizer,
augmentation included, is applied inside the compiled step at that step's
values, so no prefetched batch carries stale hyperparameters (the code
pushes augmentation strengths into a PyTorch ``Dataset`` whose workers may
prefetch); the gated layers keep the code's extra learnable scalar
:math:`s`; discrete hyperparameters give each integer of their range an
equal share of the sigmoid (the code's cutout length starts from a range
of 25 values for a range of 24).

References:
  MacKay, Vicol, Lorraine, Duvenaud & Grosse, "Self-Tuning Networks: Bilevel
  optimization of hyperparameters using structured best-response
  functions", ICLR 2019, arXiv 1903.03088.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, best_response
from bilevel._problem import Problem, _check_float_tree, _check_objective
from bilevel._validation import (as_optimizer, check_bool, check_positive,
                                 check_positive_int)

PyTree = Any

# Salt of the perturbation and regularizer stream (the sampler uses the key
# itself).
_STN_SALT = 0x57A11


class STNState(NamedTuple):
  """State of :func:`stn`.

  Attributes:
    x: :class:`bilevel.best_response.HyperVariables`
      :math:`(\\tilde\\lambda, \\rho)`.
    y: :math:`\\phi`, the best-response model's parameters.
    upper_opt_state, scale_opt_state, lower_opt_state: optimizer states of
      :math:`\\tilde\\lambda`, :math:`\\rho` and :math:`\\phi`.
    sampler: minibatch sampler.
    key: PRNG key of the perturbations and the regularizers.
    num_train_steps: training steps taken (warm-up included).
    num_steps: cycles taken.
  """
  x: best_response.HyperVariables
  y: PyTree
  upper_opt_state: PyTree
  scale_opt_state: PyTree
  lower_opt_state: PyTree
  sampler: _data.SamplerState
  key: jax.Array
  num_train_steps: jax.Array
  num_steps: jax.Array


class STNInfo(NamedTuple):
  """Diagnostics of one :func:`stn` cycle.

  Attributes:
    train_loss: mean of :math:`L_T` over the cycle's training steps (at the
      perturbed hyperparameters, regularizers on).
    val_loss: :math:`L_V` at the last validation step (without the entropy
      term); in a warm-up cycle, at :math:`\\tilde\\lambda` on one
      validation batch (a forward pass only).
    hypergradient_norm: :math:`\\|\\nabla_{\\tilde\\lambda}\\|` of the last
      validation step (0 in warm-up).
    lower_grad_norm: :math:`\\|\\nabla_\\phi L_T\\|` of the last training
      step.
    hyperparameters: ``{name: value}`` at :math:`\\tilde\\lambda` after the
      cycle (the schedule, over a run's history).
    scale: :math:`\\sigma` after the cycle, ``(H,)``.
    warmup: whether the cycle was a warm-up cycle.
  """
  train_loss: jax.Array
  val_loss: jax.Array
  hypergradient_norm: jax.Array
  lower_grad_norm: jax.Array
  hyperparameters: dict
  scale: jax.Array
  warmup: jax.Array


def _num_rows(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  return 1 if not leaves else int(jnp.shape(leaves[0])[0])


def _warmup_steps(num_warmup_steps, num_warmup_epochs, data) -> int:
  if num_warmup_steps is not None:
    return num_warmup_steps
  if data is None or data.lower is None:
    return 0
  size = _data.num_samples(data.lower, "Data.lower")
  batch = data.lower_batch_size or size
  return math.ceil(num_warmup_epochs * size / batch)


def _check_variables(space, x) -> None:
  hint = ("Build it with bilevel.best_response.init_variables(space), "
          "e.g. init_variables(space, scale=0.5).")
  if not isinstance(x, best_response.HyperVariables):
    raise TypeError("stn's upper variable x must be a bilevel.best_response."
                    f"HyperVariables; got {type(x).__name__}. {hint}")
  _check_float_tree("x", "x (the hyperparameter variables)", x)
  for name in ("unconstrained", "raw_scale"):
    shape = jnp.shape(getattr(x, name))
    if shape != (space.size,):
      raise ValueError(
          f"x.{name} must have shape ({space.size},), one entry per "
          f"hyperparameter ({', '.join(space.names)}); got {shape}. {hint}")


def stn(problem: Problem, space: best_response.HyperparameterSpace, *,
        lower_optimizer: Any = None, upper_optimizer: Any = None,
        scale_optimizer: Any = None, num_train_steps: int = 2,
        num_val_steps: int = 1, num_warmup_steps: int | None = None,
        num_warmup_epochs: float = 5.0, entropy_weight: float = 1e-3,
        tune_scales: bool = True) -> _base.BilevelSolver:
  r"""Self-Tuning Networks (see the module docstring for a cycle).

  Args:
    problem: ``g(hp, phi, batch)`` the training loss with regularizers at
      ``hp.values``, ``f(hp, phi, batch)`` the validation loss without,
      both reading ``hp.unconstrained`` through the best-response model.
    space: the :class:`bilevel.best_response.HyperparameterSpace`.
    lower_optimizer: optax optimizer or step size for :math:`\phi`; default
      ``optax.sgd(0.01, momentum=0.9)``.
    upper_optimizer: for :math:`\tilde\lambda`; default
      ``optax.adam(3e-3)``.
    scale_optimizer: for :math:`\rho`; default ``optax.adam(3e-3)``.
    num_train_steps: :math:`T_{\text{train}}`, training steps per cycle.
    num_val_steps: :math:`T_{\text{val}}`, validation steps per cycle.
    num_warmup_steps: training steps before the first validation step;
      default ``None``: ``num_warmup_epochs`` epochs of ``Data.lower`` (0
      without data). Counted in whole cycles.
    num_warmup_epochs: the warm-up in epochs when ``num_warmup_steps`` is
      ``None`` (the paper: 5).
    entropy_weight: :math:`\tau \ge 0`; must be positive when tuning
      :math:`\sigma` (else :math:`\sigma` collapses to 0 and the model
      stops learning a local response).
    tune_scales: whether :math:`\rho` is trained (and the validation rows
      are perturbed); otherwise :math:`\sigma` stays at its initial value.

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`STNState` and
    :class:`STNInfo`; one cycle costs ``T_val Gf + T_train Gg``.
  """
  _base.require_unconstrained(problem, "stn")
  if not isinstance(space, best_response.HyperparameterSpace):
    raise TypeError(
        "stn's second argument must be a bilevel.best_response."
        f"HyperparameterSpace; got {type(space).__name__}. Build one with "
        "HyperparameterSpace({'dropout': interval(0.05, 0.0, 0.9), ...}).")
  lower_optimizer = as_optimizer(
      "lower_optimizer", optax.sgd(0.01, momentum=0.9)
      if lower_optimizer is None else lower_optimizer)
  upper_optimizer = as_optimizer(
      "upper_optimizer", optax.adam(3e-3)
      if upper_optimizer is None else upper_optimizer)
  scale_optimizer = as_optimizer(
      "scale_optimizer", optax.adam(3e-3)
      if scale_optimizer is None else scale_optimizer)
  check_positive_int("num_train_steps", num_train_steps)
  check_positive_int("num_val_steps", num_val_steps)
  if num_warmup_steps is not None:
    check_positive_int("num_warmup_steps", num_warmup_steps, allow_zero=True)
  check_positive("num_warmup_epochs", num_warmup_epochs, allow_zero=True)
  check_positive("entropy_weight", entropy_weight, allow_zero=True)
  check_bool("tune_scales", tune_scales)
  if tune_scales and entropy_weight == 0:
    raise ValueError(
        "stn with tune_scales=True needs entropy_weight > 0: without the "
        "entropy bonus the validation loss drives the perturbation scale "
        "sigma to 0 and the best-response model stops seeing a "
        "neighbourhood. Pass e.g. entropy_weight=1e-3, or tune_scales=False.")

  def training_rows(key, x, batch, regularizer_key):
    return best_response.perturb(space, x.unconstrained, x.scale, key,
                                 _num_rows(batch), regularizer_key)

  def validation_loss(x, phi, batch, key):
    scale = x.scale if tune_scales else None
    hp = best_response.perturb(space, x.unconstrained, scale, key,
                               _num_rows(batch))
    loss = problem.upper(hp, phi, batch)
    objective = loss - (entropy_weight * best_response.entropy(x.scale)
                        if tune_scales else 0.0)
    return objective, loss

  def init(x, y, *, key=None, data=None) -> STNState:
    _data.validate_data(data)
    _check_variables(space, x)
    _check_float_tree("y", "y (the best-response parameters)", y)
    sampler = _data.init_sampler(data, key)
    stream = jax.random.fold_in(
        jax.random.key(0) if key is None else key, _STN_SALT)
    upper_spec = None if data is None else _data.batch_spec(
        data.upper, data.upper_batch_size)
    lower_spec = None if data is None else _data.batch_spec(
        data.lower, data.lower_batch_size)
    lower_hp = jax.eval_shape(training_rows, stream, x, lower_spec, stream)
    upper_hp = jax.eval_shape(
        lambda x_, b: best_response.perturb(
            space, x_.unconstrained, None, None, _num_rows(b)), x, upper_spec)
    _check_objective("upper objective f (validation loss)", problem.upper,
                     upper_hp, y, upper_spec)
    _check_objective("lower objective g (training loss)", problem.lower,
                     lower_hp, y, lower_spec)
    return STNState(
        x=x, y=y, upper_opt_state=upper_optimizer.init(x.unconstrained),
        scale_opt_state=scale_optimizer.init(x.raw_scale),
        lower_opt_state=lower_optimizer.init(y), sampler=sampler,
        key=stream, num_train_steps=jnp.zeros((), jnp.int32),
        num_steps=jnp.zeros((), jnp.int32))

  def train_phase(state: STNState, data):
    """T_train steps on phi at perturbed hyperparameters."""
    x = state.x

    def one(carry, _):
      phi, opt_state, sampler, key = carry
      key, noise_key, regularizer_key = jax.random.split(key, 3)
      batch, sampler = _data.sample(sampler, data, "lower")
      hp = training_rows(noise_key, x, batch, regularizer_key)
      loss, grad = jax.value_and_grad(
          lambda p: problem.lower(hp, p, batch))(phi)
      updates, opt_state = lower_optimizer.update(grad, opt_state, phi)
      phi = problem.projected_y(optax.apply_updates(phi, updates))
      return (phi, opt_state, sampler, key), (loss, optax.tree.norm(grad))

    carry = (state.y, state.lower_opt_state, state.sampler, state.key)
    carry, (losses, grad_norms) = jax.lax.scan(one, carry, None,
                                               length=num_train_steps)
    phi, lower_opt_state, sampler, key = carry
    state = state._replace(y=phi, lower_opt_state=lower_opt_state,
                           sampler=sampler, key=key,
                           num_train_steps=state.num_train_steps +
                           num_train_steps)
    return state, jnp.mean(losses), grad_norms[-1]

  def val_phase(state: STNState, data):
    """T_val steps on (lambda~, rho) through the best-response model."""
    def one(carry, _):
      x, upper_opt_state, scale_opt_state, sampler, key = carry
      key, noise_key = jax.random.split(key)
      batch, sampler = _data.sample(sampler, data, "upper")
      (_, loss), grad = jax.value_and_grad(validation_loss, has_aux=True)(
          x, state.y, batch, noise_key)
      updates, upper_opt_state = upper_optimizer.update(
          grad.unconstrained, upper_opt_state, x.unconstrained)
      unconstrained = optax.apply_updates(x.unconstrained, updates)
      raw_scale = x.raw_scale
      if tune_scales:
        updates, scale_opt_state = scale_optimizer.update(
            grad.raw_scale, scale_opt_state, raw_scale)
        raw_scale = optax.apply_updates(raw_scale, updates)
      x = problem.projected_x(
          best_response.HyperVariables(unconstrained, raw_scale))
      return ((x, upper_opt_state, scale_opt_state, sampler, key),
              (loss, optax.tree.norm(grad.unconstrained)))

    carry = (state.x, state.upper_opt_state, state.scale_opt_state,
             state.sampler, state.key)
    carry, (losses, norms) = jax.lax.scan(one, carry, None,
                                          length=num_val_steps)
    x, upper_opt_state, scale_opt_state, sampler, key = carry
    state = state._replace(x=x, upper_opt_state=upper_opt_state,
                           scale_opt_state=scale_opt_state, sampler=sampler,
                           key=key)
    return state, losses[-1], norms[-1]

  def warmup_phase(state: STNState, data):
    """Warm-up: the validation loss at lambda~, no update."""
    batch, sampler = _data.sample(state.sampler, data, "upper")
    hp = best_response.perturb(space, state.x.unconstrained, None, None,
                               _num_rows(batch))
    loss = problem.upper(hp, state.y, batch)
    return state._replace(sampler=sampler), loss, jnp.zeros_like(loss)

  def step(state: STNState, data=None):
    _base.check_step_data(state.sampler, data)
    warmup = _warmup_steps(num_warmup_steps, num_warmup_epochs, data)
    state, train_loss, lower_grad_norm = train_phase(state, data)
    in_warmup = state.num_train_steps <= warmup
    state, val_loss, hypergradient_norm = jax.lax.cond(
        in_warmup, warmup_phase, val_phase, state, data)
    info = STNInfo(
        train_loss=train_loss, val_loss=val_loss.astype(train_loss.dtype),
        hypergradient_norm=hypergradient_norm.astype(train_loss.dtype),
        lower_grad_norm=lower_grad_norm,
        hyperparameters=space.constrain(state.x.unconstrained),
        scale=state.x.scale, warmup=in_warmup)
    return state._replace(num_steps=state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=num_val_steps,
                                   lower_grads=num_train_steps, hvps=0,
                                   cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
