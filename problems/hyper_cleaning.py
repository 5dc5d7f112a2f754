r"""Data hyper-cleaning (Franceschi et al., 2017) on scikit-learn's digits.

The 1797 handwritten digits (8x8 pixels, 10 classes) are split at random into
training, clean validation and held-out test rows, and a fixed fraction of the
*training* labels is corrupted. The upper variable :math:`x \in
\mathbb{R}^n` holds one weight per training example, used as
:math:`\sigma(x_i)`; the lower variable is a linear softmax classifier
:math:`y = (W, c)`, ``{"weights": (64, 10), "bias": (10,)}``:

.. math::

   g(x, y) &= \frac1n \sum_{i=1}^n \sigma(x_i)\,
              \ell(W^\top a_i + c, b_i)
              + \frac{\lambda}{2} \bigl(\|W\|^2 + \|c\|^2\bigr)
              \qquad \text{(corrupted training rows)} \\
   f(x, y) &= \frac1m \sum_{j=1}^m \ell(W^\top a'_j + c, b'_j)
              \qquad \text{(clean validation rows)},

with the cross-entropy :math:`\ell(z, b) = \log\sum_k e^{z_k} - z_b`. A
minibatch of the lower level carries the positions of its rows in the
training set (``batch["index"]``) so that ``g`` picks their weights
:math:`x_i`.

The bias is penalised too: the softmax is invariant to adding one constant to
every logit, so with an unpenalised bias the lower level would not be strongly
convex (its Hessian would be singular along :math:`c \propto \mathbf 1`).
With the penalty it is :math:`\lambda`-strongly convex, and the smallest
Hessian eigenvalue is exactly :math:`\lambda`: on those invariant directions
(:math:`c \propto \mathbf 1` and :math:`W = u \mathbf 1^\top`) and on the
rows of :math:`W` of pixels that are constant on the training rows. No
gradient of ``f`` or ``g`` ever has a component along them, so from ``y0 = 0``
solvers never move there; the next eigenvalue is only slightly larger,
though (about 0.0102 at ``x0``).

Preprocessing: pixels are divided by 16, then standardised with training
statistics (pixels constant on the training rows are only centred, i.e. become
0). The softmax cross-entropy has curvature at most 1/2 and
:math:`\sigma \le 1`, so ``g`` is at most :math:`(\lambda_{\max}(\tilde
A^\top \tilde A / n) / 2 + \lambda)`-smooth for every ``x``, where
:math:`\tilde A` is the training matrix with a column of ones (the bound is
about 3.6 for the default split); in practice it is much smoother: at ``x0 =
0`` (every :math:`\sigma = 1/2`) and :math:`y^*(x_0)` the largest Hessian
eigenvalue is about 0.50 and the smallest :math:`\lambda = 0.01`.

Corruption: ``round(corruption * n)`` training rows, drawn without
replacement, get a label drawn uniformly among the 9 *other* classes, once for
a given ``key``: corrupted labels always differ from the true ones. With the
defaults (1000 training rows, ``l2=0.01``) the lower solution reaches about
95% test accuracy on clean labels, 84% with uniform weights on the 50%
corrupted labels, and 95% again with weights close to the ideal 1 (clean) / 0
(corrupted). The hypergradient at ``x0`` points the right way on average: it
is negative on clean rows and positive on corrupted ones.

References: ``lower_solution`` runs 20 Newton steps with a backtracking line
search from ``y = 0``, with the dense 650 x 650 Hessian of
:func:`lower_hessian` (pure Newton, as in
``problems._base.newton_lower_solution``, cycles here at ``x0``). The gradient
norm is below :math:`10^{-15}` in float64 at ``x0``, at random :math:`x \in
[-3, 3]^n`, at :math:`x = \pm 6` and at the ideal weights; 13 steps suffice on
all of them. ``hypergradient`` is a dense Hessian solve at that point,
``value`` the validation loss; ``x_star`` is unknown (``None``). benchopt's
bilevel benchmark starts its hyper-cleaning runs from :math:`x_0 = -2`; here
``x0 = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from problems._base import (Instance, dense_hypergradient, full_batches,
                            numpy_seed, split_rows, value_function)

NUM_CLASSES = 10
#: Newton steps of the reference lower solution.
NEWTON_ITERATIONS = 20


def hyper_cleaning_data(key: jax.Array | None = None, *,
                        corruption: float = 0.5, num_train: int = 1000,
                        num_val: int = 400) -> dict[str, np.ndarray]:
  """The split, preprocessed and corrupted digits data, as NumPy arrays.

  :func:`hyper_cleaning` builds its instance from this; call it with the same
  arguments to know which training labels were corrupted.

  Args:
    key: PRNG key of the split and of the corruption; ``None`` uses
      ``jax.random.key(0)``.
    corruption: fraction of training labels to corrupt, in ``[0, 1]``.
    num_train: training rows; default 1000.
    num_val: clean validation rows; default 400. The remaining ``1797 -
      num_train - num_val`` rows (at least one) are the test set.

  Returns:
    A dict with float64 ``"train_features"`` (n, 64), ``"val_features"``,
    ``"test_features"``; int ``"train_labels"`` (after corruption),
    ``"train_true_labels"``, ``"val_labels"``, ``"test_labels"``; and the
    boolean ``"corrupted"`` (n,), true where the training label was changed.
  """
  from sklearn.datasets import load_digits  # optional dependency

  if not 0.0 <= corruption <= 1.0:
    raise ValueError(f"corruption must be in [0, 1]; got {corruption}.")
  features, labels = load_digits(return_X_y=True)
  if key is None:
    key = jax.random.key(0)
  rng = np.random.default_rng(numpy_seed(key))
  train, val, test = split_rows(rng, features.shape[0], num_train, num_val)

  features = features / 16.0
  mean, std = features[train].mean(axis=0), features[train].std(axis=0)
  features = (features - mean) / np.where(std > 0, std, 1.0)

  true_labels = labels[train]
  corrupted = np.zeros(num_train, bool)
  corrupted[rng.permutation(num_train)[:round(corruption * num_train)]] = True
  shifts = rng.integers(1, NUM_CLASSES, num_train)  # never 0: a new class
  noisy_labels = np.where(corrupted, (true_labels + shifts) % NUM_CLASSES,
                          true_labels)
  return {
      "train_features": features[train], "train_labels": noisy_labels,
      "train_true_labels": true_labels, "corrupted": corrupted,
      "val_features": features[val], "val_labels": labels[val],
      "test_features": features[test], "test_labels": labels[test],
  }


def _cross_entropies(y, features, labels):
  """Per-row softmax cross-entropy of the linear model ``y``."""
  logits = features @ y["weights"] + y["bias"]
  log_probabilities = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)
  return -picked[:, 0]


def _stack(y):
  """``y`` as one (65, 10) matrix: the bias, then the rows of ``W``."""
  return jnp.concatenate([y["bias"][None], y["weights"]], axis=0)


def _unstack(matrix):
  return {"weights": matrix[1:], "bias": matrix[0]}


def lower_hessian(x, y, batch, l2):
  r"""The Hessian of ``g`` in ``y``, analytically, on the stacked ``y``.

  With :math:`\tilde a_i = (1, a_i)`, :math:`p_i` the predicted
  probabilities and :math:`w_i = \sigma(x_i)/n`,

  .. math::

     H = \sum_i w_i\, (\tilde a_i \tilde a_i^\top) \otimes
         (\mathrm{diag}(p_i) - p_i p_i^\top) + \lambda I,

  an array of shape ``(65, 10, 65, 10)`` indexed like ``_stack(y)`` twice
  (reshape to ``(650, 650)`` for ``_stack(y).ravel()``). About 100 times
  faster than ``jax.hessian``, which needs 650 Hessian-vector products.
  """
  features = jnp.concatenate(
      [jnp.ones_like(batch["features"][:, :1]), batch["features"]], axis=1)
  probabilities = jax.nn.softmax(features @ _stack(y), axis=-1)
  weights = jax.nn.sigmoid(x[batch["index"]]) / features.shape[0]
  weighted = features * weights[:, None]
  diagonal = jnp.einsum("si,sj,sk->ikj", weighted, features, probabilities)
  outer = jnp.einsum("si,sk,sj,sl->ikjl", weighted, probabilities, features,
                     probabilities)
  rows, classes = diagonal.shape[:2]
  eye = jnp.eye(classes, dtype=diagonal.dtype)
  hessian = diagonal[:, :, :, None] * eye[None, :, None, :] - outer
  return hessian + l2 * jnp.eye(rows * classes, dtype=hessian.dtype).reshape(
      hessian.shape)


def _damped_newton_lower_solution(problem, data, y_init, l2, num_iterations):
  """``x -> y*(x)`` by Newton's method with a line search, from ``y_init``.

  Pure Newton (``problems._base.newton_lower_solution``) can cycle on this
  softmax regression when the penalty is small against the data term. Here
  each Newton direction ``d`` is scaled by the largest step ``t`` in ``1, 1/2,
  ..., 2^-15`` that decreases ``g`` by at least ``1e-4 t <grad, d>``
  (Armijo), or by 1 if none does (for a strongly convex ``g`` this happens
  only near convergence, where rounding hides the decrease). Once close, full
  steps are taken and the convergence is quadratic. The Hessian is
  :func:`lower_hessian`. Steps are skipped once the gradient norm falls below
  ``100 eps`` times its value at ``y_init``.
  """
  _, lower_batch = full_batches(data)
  shape = _stack(y_init).shape
  flat_init = _stack(y_init).ravel()
  steps = 2.0 ** -jnp.arange(16, dtype=flat_init.dtype)

  def flat_lower(x, flat_y):
    return problem.lower(x, _unstack(flat_y.reshape(shape)), lower_batch)

  def newton_step(x, flat_y, value, grad):
    hess = lower_hessian(x, _unstack(flat_y.reshape(shape)), lower_batch, l2)
    direction = jnp.linalg.solve(hess.reshape(flat_y.size, flat_y.size), grad)
    trials = jax.vmap(lambda t: flat_lower(x, flat_y - t * direction))(steps)
    armijo = trials <= value - 1e-4 * steps * jnp.vdot(grad, direction)
    index = jnp.argmax(armijo)  # the first step that passes; 0 if none
    return flat_y - steps[index] * direction

  @jax.jit
  def solve(x):
    # Steps are skipped once the gradient is at rounding level (a saving
    # only: further Newton steps would not change y).
    tolerance = 100 * jnp.finfo(flat_init.dtype).eps * jnp.linalg.norm(
        jax.grad(flat_lower, 1)(x, flat_init))

    def body(flat_y, _):
      value, grad = jax.value_and_grad(flat_lower, 1)(x, flat_y)
      flat_y = jax.lax.cond(jnp.linalg.norm(grad) <= tolerance,
                            lambda: flat_y,
                            lambda: newton_step(x, flat_y, value, grad))
      return flat_y, None
    flat_y, _ = jax.lax.scan(body, flat_init, None, length=num_iterations)
    return _unstack(flat_y.reshape(shape))

  return solve


def hyper_cleaning(key: jax.Array | None = None, *, corruption: float = 0.5,
                   num_train: int = 1000, num_val: int = 400,
                   batch_size: int | None = None,
                   l2: float = 1e-2) -> Instance:
  """Builds the data hyper-cleaning instance on the digits data.

  Args:
    key: PRNG key of the split and of the corruption; ``None`` uses
      ``jax.random.key(0)``.
    corruption: fraction of training labels replaced by a different class.
    num_train: training rows (lower level, and the dimension of ``x``).
    num_val: clean validation rows (upper level); the rest is the test set.
    batch_size: minibatch size for both levels (``None``: full batch).
    l2: the penalty :math:`\\lambda` on the weights and the bias; also the
      lower level's strong-convexity constant.

  Returns:
    An :class:`problems.Instance` named ``"hyper_cleaning"`` with a Newton
    ``lower_solution``, a dense ``hypergradient`` and ``value``,
    ``x_star=None``, ``x0 = 0`` (every weight :math:`\\sigma(0) = 1/2`),
    ``y0 = 0``, and ``evaluate(x, y)`` returning ``"test_accuracy"``,
    ``"weight_clean"`` and ``"weight_corrupted"`` (mean :math:`\\sigma(x_i)`
    over the clean and the corrupted training rows; NaN if there are none)
    and ``"clean_weight_fraction"`` (the share of the total weight on clean
    rows). Which rows are corrupted: :func:`hyper_cleaning_data` with the
    same arguments.
  """
  arrays = hyper_cleaning_data(key, corruption=corruption,
                               num_train=num_train, num_val=num_val)
  dtype = jnp.zeros(()).dtype  # float64 under jax_enable_x64
  lower_set = {"features": jnp.asarray(arrays["train_features"], dtype),
               "labels": jnp.asarray(arrays["train_labels"], jnp.int32),
               "index": jnp.arange(num_train, dtype=jnp.int32)}
  upper_set = {"features": jnp.asarray(arrays["val_features"], dtype),
               "labels": jnp.asarray(arrays["val_labels"], jnp.int32)}
  test_features = jnp.asarray(arrays["test_features"], dtype)
  test_labels = jnp.asarray(arrays["test_labels"], jnp.int32)
  corrupted = jnp.asarray(arrays["corrupted"])
  dim = test_features.shape[1]

  def lower(x, y, batch):
    weights = jax.nn.sigmoid(x[batch["index"]])
    losses = _cross_entropies(y, batch["features"], batch["labels"])
    penalty = jnp.sum(y["weights"] ** 2) + jnp.sum(y["bias"] ** 2)
    return jnp.mean(weights * losses) + 0.5 * l2 * penalty

  def upper(x, y, batch):
    del x
    return jnp.mean(_cross_entropies(y, batch["features"], batch["labels"]))

  def evaluate(x, y):
    logits = test_features @ y["weights"] + y["bias"]
    correct = (jnp.argmax(logits, axis=-1) == test_labels).astype(dtype)
    weights = jax.nn.sigmoid(x)
    clean_total = jnp.sum(jnp.where(corrupted, 0.0, weights))
    corrupted_total = jnp.sum(jnp.where(corrupted, weights, 0.0))
    num_corrupted = jnp.sum(corrupted)
    return {
        "test_accuracy": jnp.mean(correct),
        "weight_clean": clean_total / (num_train - num_corrupted),
        "weight_corrupted": corrupted_total / num_corrupted,
        "clean_weight_fraction": clean_total / (clean_total
                                                + corrupted_total),
    }

  problem = bilevel.Problem(upper, lower)
  data = bilevel.Data(upper=upper_set, lower=lower_set,
                      upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  x0 = jnp.zeros(num_train, dtype)
  y0 = {"weights": jnp.zeros((dim, NUM_CLASSES), dtype),
        "bias": jnp.zeros(NUM_CLASSES, dtype)}
  lower_solution = _damped_newton_lower_solution(problem, data, y0, l2,
                                                 NEWTON_ITERATIONS)
  return Instance(
      "hyper_cleaning", problem, data, x0, y0, lower_solution=lower_solution,
      hypergradient=dense_hypergradient(problem, data, lower_solution),
      value=value_function(problem, data, lower_solution), x_star=None,
      evaluate=evaluate)
