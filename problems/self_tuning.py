r"""Problems for Self-Tuning Networks (:func:`bilevel.solvers.stn`).

**Ridge regression with a linear best response** (:func:`stn_ridge`). A
low-dimensional linear regression, training rows :math:`(A, t)` and
validation rows :math:`(A_v, t_v)`, whose L2 coefficient
:math:`\lambda = \mathrm{softplus}(\tilde\lambda)` is tuned. With
:math:`H = A^\top A / n` and :math:`b = A^\top t / n`, everything is in
closed form:

.. math::

   w^*(\lambda) = (H + \lambda I)^{-1} b, \qquad
   \frac{dw^*}{d\tilde\lambda} = -\sigma(\tilde\lambda)
       (H + \lambda I)^{-1} w^*, \qquad
   L_V(\lambda) = \tfrac{1}{2m} \|A_v w^*(\lambda) - t_v\|^2.

The best response is :func:`bilevel.best_response.linear`,
:math:`\hat w(\tilde\lambda) = w_0 + u \tilde\lambda`, and STN's training
phase minimises :math:`E_\epsilon L_T(w_0 + u(\tilde\lambda + \sigma
\epsilon), \lambda(\tilde\lambda + \sigma\epsilon))`, a quadratic in
:math:`(w_0, u)` whose minimiser :meth:`RidgeSTN.linear_fit` computes by
Gauss-Hermite quadrature.

**Classifiers with structured best responses** (:func:`stn_classifier`):
an MLP (two :func:`bilevel.best_response.hyper_dense` hidden layers) or a
small CNN (two :func:`bilevel.best_response.hyper_conv` layers) on
scikit-learn's digits (8x8 images) or MNIST-1D (signals of 40 steps),
tuning per-layer dropout, input dropout, Gaussian input noise, the range of
random shifts (an integer) and the L2 coefficient; the final layer is a
plain dense layer, as in the paper's models. The same functions train
plain networks at fixed hyperparameters (the grid and random search
baselines).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from bilevel import best_response as br
from bilevel import regularizers
from problems.rnn import digits_sequences, mnist1d_sequences

PyTree = Any


# --------------------------------------------------------------------------
# Ridge regression.


class RidgeSTN(NamedTuple):
  """A ridge problem for STN, with its closed forms.

  Attributes:
    problem: ``f``, ``g`` over :class:`bilevel.best_response.Hyperparameters`.
    space: one hyperparameter ``"l2"`` (positive).
    data: full-batch training (lower) and validation (upper) rows.
    x0: :class:`bilevel.best_response.HyperVariables` at the initial value.
    y0: the linear response at 0.
    response: the :func:`bilevel.best_response.linear` response.
    train, val: ``(A, t)`` and ``(A_v, t_v)`` as NumPy float64 arrays.
  """
  problem: bilevel.Problem
  space: br.HyperparameterSpace
  data: bilevel.Data
  x0: br.HyperVariables
  y0: PyTree
  response: br.BestResponse
  train: tuple
  val: tuple

  def _moments(self):
    a, t = self.train
    return a.T @ a / len(t), a.T @ t / len(t)

  def best_response(self, lam: float) -> np.ndarray:
    """:math:`w^*(\\lambda)` (NumPy, float64)."""
    h, b = self._moments()
    return np.linalg.solve(h + lam * np.eye(len(b)), b)

  def best_response_slope(self, unconstrained: float) -> np.ndarray:
    """:math:`dw^*/d\\tilde\\lambda` at :math:`\\tilde\\lambda`."""
    h, _ = self._moments()
    lam = float(np.logaddexp(0.0, unconstrained))
    w = self.best_response(lam)
    sigmoid = 1.0 / (1.0 + np.exp(-unconstrained))
    return -sigmoid * np.linalg.solve(h + lam * np.eye(len(w)), w)

  def validation_loss(self, lam: float) -> float:
    """:math:`L_V(w^*(\\lambda))`."""
    a, t = self.val
    return float(0.5 * np.mean((a @ self.best_response(lam) - t) ** 2))

  def grid_optimum(self, low: float = 1e-3, high: float = 10.0,
                   num: int = 20001) -> tuple[float, float]:
    """``(lambda, L_V)`` minimising :math:`L_V` on a log grid (NumPy)."""
    grid = np.exp(np.linspace(np.log(low), np.log(high), num))
    values = np.array([self.validation_loss(lam) for lam in grid])
    best = int(np.argmin(values))
    return float(grid[best]), float(values[best])

  def linear_fit(self, unconstrained: float, scale: float,
                 num_nodes: int = 80) -> tuple[np.ndarray, np.ndarray]:
    r"""The exact minimiser ``(w0, u)`` of STN's training objective.

    :math:`E_\epsilon L_T(w_0 + u \ell, \mathrm{softplus}(\ell))` with
    :math:`\ell = \tilde\lambda + \sigma \epsilon`, by Gauss-Hermite
    quadrature over :math:`\epsilon` (NumPy, float64).
    """
    h, b = self._moments()
    d = len(b)
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = weights / weights.sum()
    ell = unconstrained + scale * nodes
    lam = np.logaddexp(0.0, ell)

    def mean(values):
      return float(np.sum(weights * values))

    eye = np.eye(d)
    block = lambda p: h * mean(ell ** p) + eye * mean(lam * ell ** p)
    system = np.block([[block(0), block(1)], [block(1), block(2)]])
    rhs = np.concatenate([b, b * mean(ell)])
    solution = np.linalg.solve(system, rhs)
    return solution[:d], solution[d:]


  def stn_fixed_point(self, scale: float, low: float = -6.0,
                      high: float = 3.0) -> float:
    r"""The :math:`\lambda` at which STN with a fixed :math:`\sigma` stops.

    Where the validation gradient through the exactly trained response
    vanishes: :math:`u^\top \nabla L_V(w_0 + u \tilde\lambda) = 0` with
    :math:`(w_0, u)` = :meth:`linear_fit` at :math:`(\tilde\lambda,
    \sigma)` (brentq on ``[low, high]`` in :math:`\tilde\lambda`). It
    tends to the validation optimum as :math:`\sigma \to 0`.
    """
    import scipy.optimize  # pylint: disable=import-outside-toplevel
    a, t = self.val

    def slope_of_val(ell):
      base, slope = self.linear_fit(ell, scale)
      residual = a @ (base + slope * ell) - t
      return float(slope @ (a.T @ residual) / len(t))

    ell = scipy.optimize.brentq(slope_of_val, low, high, xtol=1e-12)
    return float(np.logaddexp(0.0, ell))


def stn_ridge(seed: int = 5, *, num_train: int = 24, num_val: int = 4000,
              dim: int = 4, noise: float = 2.0, init: float = 1.0,
              scale: float = 0.5, draws_per_row: int = 1) -> RidgeSTN:
  """A ridge regression whose L2 coefficient STN tunes.

  ``t = A w + noise * N(0, 1)`` with ``w``, ``A`` standard normal. The
  default (seed 5) has its validation optimum inside the grid, at
  :math:`\\lambda \\approx 0.256`, with :math:`L_V` 0.02 above the optimum
  at half and 0.04 at twice that value.

  Args:
    seed: NumPy seed of the weights, rows and noise.
    num_train, num_val: rows of the two sets.
    dim: features.
    noise: standard deviation of the target noise.
    init: initial :math:`\\lambda`.
    scale: initial perturbation scale :math:`\\sigma_0`.
    draws_per_row: copies of each training row in ``data.lower`` (the
      training loss is unchanged; each copy gets its own perturbation, so
      STN's estimate of the expectation over :math:`\\epsilon` has that
      many times less variance).
  """
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=dim)
  a = rng.normal(size=(num_train, dim))
  t = a @ w_true + noise * rng.normal(size=num_train)
  a_val = rng.normal(size=(num_val, dim))
  t_val = a_val @ w_true + noise * rng.normal(size=num_val)
  space = br.HyperparameterSpace({"l2": br.positive(init)})
  response = br.linear(1)

  def weights(phi, rows):
    return jax.vmap(response.apply, (None, 0))(phi, rows)

  def lower(hp, phi, batch):
    features, targets = batch
    w = weights(phi, hp.unconstrained)
    residual = jnp.sum(features * w, axis=1) - targets
    return jnp.mean(0.5 * residual ** 2 +
                    0.5 * hp.values["l2"] * jnp.sum(w ** 2, axis=1))

  def upper(hp, phi, batch):
    features, targets = batch
    w = weights(phi, hp.unconstrained)
    return 0.5 * jnp.mean((jnp.sum(features * w, axis=1) - targets) ** 2)

  data = bilevel.Data(upper=(jnp.asarray(a_val), jnp.asarray(t_val)),
                      lower=(jnp.asarray(np.tile(a, (draws_per_row, 1))),
                             jnp.asarray(np.tile(t, draws_per_row))))
  return RidgeSTN(bilevel.Problem(upper, lower), space, data,
                  br.init_variables(space, scale=scale),
                  response.init(jnp.zeros(dim)), response, (a, t),
                  (a_val, t_val))


# --------------------------------------------------------------------------
# Classifiers.

DATASETS = ("digits", "mnist1d")
ARCHITECTURES = ("mlp", "cnn")
NUM_CLASSES = 10


def classification_splits(dataset: str = "digits", seed: int = 0, *,
                          num_train: int | None = None,
                          num_val: int | None = None,
                          mnist1d_samples: int = 4000) -> dict:
  """Training, validation and test splits of digits or MNIST-1D.

  Digits are ``(N, 8, 8, 1)`` images in [0, 1]; MNIST-1D signals ``(N, 40,
  1)``. Defaults: digits 600/300/897 rows, MNIST-1D 1500/1000/1500 rows
  (small training sets, so regularization matters).

  Returns:
    ``{"train": (inputs, labels), "val": ..., "test": ...}`` of NumPy
    arrays (inputs float64, labels int32).
  """
  if dataset == "digits":
    inputs, labels = digits_sequences()
    inputs = inputs[..., None]
    num_train = 600 if num_train is None else num_train
    num_val = 300 if num_val is None else num_val
  elif dataset == "mnist1d":
    inputs, labels = mnist1d_sequences(mnist1d_samples)
    num_train = 1500 if num_train is None else num_train
    num_val = 1000 if num_val is None else num_val
  else:
    raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")
  if num_train < 1 or num_val < 1 or num_train + num_val >= len(labels):
    raise ValueError(f"Need 1 <= num_train, 1 <= num_val and num_train + "
                     f"num_val < {len(labels)}; got {num_train}, {num_val}.")
  order = np.random.default_rng(seed).permutation(len(labels))
  parts = np.split(order, [num_train, num_train + num_val])
  return {name: (np.asarray(inputs[rows]), labels[rows].astype(np.int32))
          for name, rows in zip(("train", "val", "test"), parts)}


def classifier_space(dataset: str, architecture: str, *,
                     dropout: float = 0.05, input_dropout: float = 0.05,
                     input_noise: float = 0.05, shift: int = 0,
                     l2: float = 1e-4) -> br.HyperparameterSpace:
  """The tuned hyperparameters, at the paper's start values (0.05).

  Per-layer dropout ``dropout0``, ``dropout1`` and the input dropout in
  (0, 0.9) (the paper's range), input noise in (0, 1), the shift range an
  integer in [0, 2] pixels (digits) or [0, 8] steps (MNIST-1D), the L2
  coefficient positive and shared by a batch.
  """
  _check_choice(dataset, architecture)
  max_shift = 2 if dataset == "digits" else 8
  return br.HyperparameterSpace({
      "dropout0": br.interval(dropout, 0.0, 0.9),
      "dropout1": br.interval(dropout, 0.0, 0.9),
      "input_dropout": br.interval(input_dropout, 0.0, 0.9),
      "input_noise": br.interval(input_noise, 0.0, 1.0),
      "shift": br.discrete(shift, 0, max_shift),
      "l2": br.positive(l2, per_example=False),
  })


def _check_choice(dataset, architecture):
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {ARCHITECTURES}; got "
                     f"{architecture!r}.")


def _plain_dense_init(key, fan_in, fan_out, dtype):
  bound = 1.0 / math.sqrt(fan_in)
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.uniform(k1, (fan_in, fan_out), dtype, -bound,
                                       bound),
          "bias": jax.random.uniform(k2, (fan_out,), dtype, -bound, bound)}


def classifier_init(key: jax.Array, dataset: str, architecture: str,
                    num_hyper: int, *, width: int = 128,
                    channels: tuple[int, int] = (16, 32),
                    dtype: Any = jnp.float32) -> dict:
  """Parameters of :func:`classifier_apply` (hyper layers and a plain head).

  MLP: ``in -> width -> width -> 10``. CNN: two convolutions (3x3 on
  digits, 5 on MNIST-1D) with ``channels``, each followed by ReLU and a
  2x max-pool, then a dense head.
  """
  _check_choice(dataset, architecture)
  keys = jax.random.split(key, 3)
  spatial = (8, 8) if dataset == "digits" else (40,)
  if architecture == "mlp":
    fan_in = int(np.prod(spatial))
    return {"layer0": br.hyper_dense_init(keys[0], fan_in, width, num_hyper,
                                          dtype),
            "layer1": br.hyper_dense_init(keys[1], width, width, num_hyper,
                                          dtype),
            "head": _plain_dense_init(keys[2], width, NUM_CLASSES, dtype)}
  kernel = (3, 3) if dataset == "digits" else (5,)
  pooled = int(np.prod([s // 4 for s in spatial]))
  return {"layer0": br.hyper_conv_init(keys[0], 1, channels[0], kernel,
                                       num_hyper, dtype),
          "layer1": br.hyper_conv_init(keys[1], channels[0], channels[1],
                                       kernel, num_hyper, dtype),
          "head": _plain_dense_init(keys[2], pooled * channels[1],
                                    NUM_CLASSES, dtype)}


def _layer(params, inputs, rows, conv):
  if conv:
    return br.hyper_conv(params, inputs, rows)
  return br.hyper_dense(params, inputs, rows)


def _max_pool(inputs):
  spatial = inputs.ndim - 2
  window = (1,) + (2,) * spatial + (1,)
  return jax.lax.reduce_window(inputs, -jnp.inf, jax.lax.max, window, window,
                               "VALID")


def classifier_apply(params: dict, inputs: jax.Array, rows: jax.Array | None,
                     values: dict | None = None, key: jax.Array | None = None
                     ) -> jax.Array:
  """Logits; with ``key``, the regularizers at ``values`` (training).

  Args:
    params: from :func:`classifier_init`.
    inputs: ``(B, 8, 8, 1)`` or ``(B, 40, 1)``.
    rows: ``(B, H)`` unconstrained hyperparameter rows for the hyper
      layers, or ``None`` for a plain network.
    values: per-example constrained values (``(B,)`` each) of
      :func:`classifier_space`; needed with ``key``.
    key: PRNG key of the regularizers; ``None``: no regularizer
      (evaluation).

  In training: random shift, input noise and input dropout on the inputs,
  ``dropout0`` after the first and ``dropout1`` after the second layer.
  """
  conv = params["layer0"]["kernel"].ndim > 2
  hidden = inputs
  keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
  if key is not None:
    axes = tuple(range(1, inputs.ndim - 1))
    hidden = regularizers.random_shift(keys[0], hidden, values["shift"],
                                       axes=axes)
    hidden = regularizers.gaussian_noise(keys[1], hidden,
                                         values["input_noise"])
    hidden = regularizers.dropout(keys[2], hidden, values["input_dropout"])
  if not conv:
    hidden = hidden.reshape(hidden.shape[0], -1)
  for index in range(2):
    hidden = jax.nn.relu(_layer(params[f"layer{index}"], hidden, rows, conv))
    if conv:
      hidden = _max_pool(hidden)
    if key is not None:
      hidden = regularizers.dropout(keys[3 + index], hidden,
                                    values[f"dropout{index}"])
  hidden = hidden.reshape(hidden.shape[0], -1)
  return hidden @ params["head"]["kernel"] + params["head"]["bias"]


def _kernels(params):
  return [layer[name] for layer in params.values()
          for name in ("kernel", "hyper_kernel") if name in layer]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(logits.dtype))


def training_loss(params, inputs, labels, rows, values, key):
  """Cross-entropy with the regularizers on, plus the L2 term on kernels."""
  logits = classifier_apply(params, inputs, rows, values, key)
  return (cross_entropy(logits, labels) +
          regularizers.l2(_kernels(params), jnp.mean(values["l2"])))


class ClassifierSTN(NamedTuple):
  """An STN classification problem (see :func:`stn_classifier`).

  Attributes:
    problem: ``g`` the regularized training loss, ``f`` the validation
      cross-entropy (no regularizer).
    space: the hyperparameters (:func:`classifier_space`).
    data: training rows (lower) and validation rows (upper) in minibatches.
    x0: the initial hyperparameter variables.
    y0: the initial hypernetwork parameters.
    splits: the NumPy splits (``train``, ``val``, ``test``).
    evaluate: ``(x, y) -> {"val_loss", "test_loss", "test_accuracy"}`` of
      the best response at the current hyperparameters (no regularizer).
  """
  problem: bilevel.Problem
  space: br.HyperparameterSpace
  data: bilevel.Data
  x0: br.HyperVariables
  y0: dict
  splits: dict
  evaluate: Callable[[Any, Any], dict]


def stn_classifier(dataset: str = "digits", architecture: str = "mlp",
                   seed: int = 0, *, batch_size: int = 128,
                   scale: float = 0.5, dtype: Any = jnp.float32,
                   space: br.HyperparameterSpace | None = None,
                   **model_kwargs) -> ClassifierSTN:
  """An MLP or CNN on digits or MNIST-1D whose regularization STN tunes.

  Args:
    dataset: ``"digits"`` or ``"mnist1d"``.
    architecture: ``"mlp"`` or ``"cnn"``.
    seed: of the split and the initial parameters.
    batch_size: of both levels (the paper's 128).
    scale: :math:`\\sigma_0`.
    dtype: of the parameters and data.
    space: the hyperparameters (default :func:`classifier_space`).
    **model_kwargs: ``width`` or ``channels`` of :func:`classifier_init`.
  """
  splits = classification_splits(dataset, seed)
  space = classifier_space(dataset, architecture) if space is None else space
  params = classifier_init(jax.random.key(seed), dataset, architecture,
                           space.size, dtype=dtype, **model_kwargs)

  def lower(hp, phi, batch):
    inputs, labels = batch
    return training_loss(phi, inputs, labels, hp.unconstrained, hp.values,
                         hp.key)

  def upper(hp, phi, batch):
    inputs, labels = batch
    return cross_entropy(classifier_apply(phi, inputs, hp.unconstrained),
                         labels)

  def as_jax(pair):
    return jnp.asarray(pair[0], dtype), jnp.asarray(pair[1])

  data = bilevel.Data(upper=as_jax(splits["val"]),
                      lower=as_jax(splits["train"]),
                      upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  val_inputs, val_labels = as_jax(splits["val"])
  test_inputs, test_labels = as_jax(splits["test"])

  @jax.jit
  def evaluate(x, phi):
    def at(inputs):
      rows = jnp.broadcast_to(x.unconstrained, (inputs.shape[0], space.size))
      return classifier_apply(phi, inputs, rows)
    val_logits, test_logits = at(val_inputs), at(test_inputs)
    return {"val_loss": cross_entropy(val_logits, val_labels),
            "test_loss": cross_entropy(test_logits, test_labels),
            "test_accuracy": accuracy(test_logits, test_labels)}

  return ClassifierSTN(bilevel.Problem(upper, lower), space, data,
                       br.init_variables(space, scale=scale, dtype=dtype),
                       params, splits, evaluate)
