r"""Selecting one L2 penalty per feature of a logistic regression.

The regularisation-selection problem of benchopt's bilevel benchmark
(Dagréou et al., 2022) on its ijcnn1 dataset: the upper variable holds one
log-penalty per feature, :math:`x \in \mathbb{R}^d`, the lower variable the
weights of a linear classifier, :math:`y \in \mathbb{R}^d` (``d`` counts the
intercept column, see below), and with labels :math:`b_i \in \{-1, +1\}`

.. math::

   g(x, y) &= \frac1n \sum_{i=1}^n \log\bigl(1 + e^{-b_i \langle a_i, y
              \rangle}\bigr) + \frac12 \sum_{j=1}^d e^{x_j} y_j^2
              \qquad \text{(training rows)} \\
   f(x, y) &= \frac1m \sum_{i=1}^m \log\bigl(1 + e^{-b_i \langle a_i, y
              \rangle}\bigr) \qquad \text{(validation rows)}.

Features are standardised with training statistics and then, if needed,
divided by one common factor so that :math:`\lambda_{\max}(A^\top A / n) \le
4`. By default a constant feature equal to 1 is then appended, whose weight is
an intercept with its own penalty: :math:`x` and :math:`y` get one more entry
than there are raw features. (The benchmark has no intercept,
``fit_intercept=False``; on standardised features with 10% positives such a
model does worse than predicting the majority class.) With :math:`D \preceq
I/4` the Hessian of ``g`` is :math:`A^\top D A / n + \mathrm{diag}(e^x)
\preceq (1 + \max_j e^{x_j}) I`, and it is :math:`\min_j e^{x_j}`-strongly
convex: at :math:`x_0 = 0` the lower level is at most 2-smooth and 1-strongly
convex (measured at :math:`y^*(x_0)`: :math:`L \approx 1.83`, :math:`\mu
\approx 1.05` on ``"ijcnn1_like"``, :math:`1.67` and :math:`1.00` on
``"breast_cancer"``), so default step sizes (e.g. 0.5) are stable.

Datasets:

* ``"ijcnn1_like"``: synthetic data shaped like LIBSVM's ijcnn1 (49,990
  training rows, 22 features, about 10% positives). The real ijcnn1 is not
  bundled with any installed package, so rows are drawn from a fixed
  generative model: 8 independent Gaussian features, 6 skewed ones
  (log-normal, exponential, gamma), 4 strongly correlated ones (a shared
  Gaussian factor, pairwise correlation 0.81), 2 binary and 2 uniform ones.
  The true weight vector is sparse (10 of 22 features, random signs and
  magnitudes); after standardising the true logit it is :math:`4 u - 6.1`.
  Labels are Bernoulli draws of the logistic model (about 7% positives) of
  which 3% are then flipped uniformly at random. This gives about 9.4%
  positives, about 7.3% of labels that disagree with the sign of the true
  logit (the label noise) and a best linear test accuracy of about 92%
  (majority class: 90%; linear models get about 92% on the real ijcnn1 too).
  The validation set has 10,000 rows by default (the real ``ijcnn1.t`` has
  91,701) and the test set ``NUM_TEST_IJCNN1 = 10,000``; all three are
  independent draws, so changing ``num_train`` leaves the validation and
  test rows unchanged. The data depend only on ``key``.
* ``"breast_cancer"``: scikit-learn's Wisconsin breast cancer data (569 rows,
  30 features, 37% malignant), split at random into 50% training, 25%
  validation and 25% test rows. Its features are very correlated
  (:math:`\lambda_{\max}(A^\top A/n) \approx 13` after standardising), so the
  common factor is about 1.8; malignant tumours are the positive class.

References: the lower solution is computed by 20 pure Newton steps
(``problems._base.newton_lower_solution``) from :math:`y = 0` on the full
training set; the gradient norm is below :math:`10^{-16}` in float64 at
:math:`x_0`, at random :math:`x \in [-3, 3]^d`, at :math:`x = 4` and at
:math:`x = -12` on both datasets. The hypergradient is a dense Hessian solve
at that point. There is no known minimiser (``x_star`` is ``None``): on large
training sets the validation loss keeps decreasing as penalties vanish.

``x0 = 0`` (penalty 1 on every standardised feature) is a deliberately
conservative start: strongly regularised, well conditioned (:math:`\mu = 1`
on the lower level), with a clear descent direction (the hypergradient at
``x0`` has norm about 0.085 on ``"ijcnn1_like"``, 0.025 on
``"breast_cancer"``). The benchmark draws :math:`x_0 = \log u`, :math:`u
\sim U(0, 1)` per entry, i.e. weaker, random penalties; pass such an ``x``
yourself to reproduce it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from problems._base import (Instance, dense_hypergradient,
                            newton_lower_solution, numpy_seed, split_rows,
                            value_function)

DATASETS = ("ijcnn1_like", "breast_cancer")
NUM_TRAIN_IJCNN1 = 49_990
NUM_VAL_IJCNN1 = 10_000
NUM_TEST_IJCNN1 = 10_000
NUM_FEATURES_IJCNN1 = 22
#: Newton steps of the reference lower solution.
NEWTON_ITERATIONS = 20


def _ijcnn1_features(rng: np.random.Generator, num: int) -> np.ndarray:
  """``num`` raw rows of the 22 synthetic features (before standardising)."""
  shared = rng.standard_normal((num, 1))
  blocks = [
      rng.standard_normal((num, 8)),                          # 0-7
      rng.lognormal(0.0, 0.75, (num, 2)),                     # 8-9
      rng.exponential(1.0, (num, 2)),                         # 10-11
      rng.gamma(2.0, 1.0, (num, 2)),                          # 12-13
      0.9 * shared + np.sqrt(0.19) * rng.standard_normal((num, 4)),  # 14-17
      (rng.random((num, 2)) < 0.3).astype(np.float64),        # 18-19
      rng.uniform(-1.0, 1.0, (num, 2)),                       # 20-21
  ]
  return np.concatenate(blocks, axis=1)


def _ijcnn1_like(key, num_train, num_val):
  """Raw features and ±1 labels of the synthetic train/validation/test sets."""
  weights_seed, *split_seeds = numpy_seed(key).spawn(4)
  weights_rng = np.random.default_rng(weights_seed)
  # The true logit is standardised with population moments, estimated once
  # from a large reference sample so that it does not depend on num_train.
  reference = _ijcnn1_features(weights_rng, 100_000)
  location, scale = reference.mean(axis=0), reference.std(axis=0)
  true_weights = np.zeros(NUM_FEATURES_IJCNN1)
  support = np.array([0, 1, 2, 8, 10, 12, 14, 15, 18, 20])
  true_weights[support] = (weights_rng.choice([-1.0, 1.0], support.size)
                           * weights_rng.uniform(0.5, 1.5, support.size))
  reference_logit = ((reference - location) / scale) @ true_weights
  logit_mean, logit_std = reference_logit.mean(), reference_logit.std()

  splits = []
  for seed, num in zip(split_seeds, (num_train, num_val, NUM_TEST_IJCNN1)):
    rng = np.random.default_rng(seed)
    features = _ijcnn1_features(rng, num)
    logit = ((features - location) / scale) @ true_weights
    logit = 4.0 * (logit - logit_mean) / logit_std - 6.1
    positive = rng.random(num) < 1.0 / (1.0 + np.exp(-logit))
    positive ^= rng.random(num) < 0.03  # label noise
    splits.append((features, np.where(positive, 1.0, -1.0)))
  return splits


def _breast_cancer(key, num_train, num_val):
  """Raw features and ±1 labels (malignant = +1) of a random split."""
  from sklearn.datasets import load_breast_cancer  # optional dependency
  features, target = load_breast_cancer(return_X_y=True)
  labels = np.where(target == 0, 1.0, -1.0)  # sklearn: 0 = malignant
  rows = split_rows(np.random.default_rng(numpy_seed(key)),
                    features.shape[0], num_train, num_val)
  return [(features[r], labels[r]) for r in rows]


def logistic_regularization(
    key: jax.Array | None = None, *, dataset: str = "ijcnn1_like",
    num_train: int | None = None, num_val: int | None = None,
    batch_size: int | None = None, fit_intercept: bool = True) -> Instance:
  """Builds the per-feature regularisation-selection instance.

  Args:
    key: PRNG key of the synthetic data (``"ijcnn1_like"``) or of the random
      split (``"breast_cancer"``); ``None`` uses ``jax.random.key(0)``.
    dataset: ``"ijcnn1_like"`` or ``"breast_cancer"``.
    num_train: training rows (lower level). Default: 49,990 for
      ``"ijcnn1_like"`` (any positive number is allowed), 284 (50%) for
      ``"breast_cancer"``.
    num_val: validation rows (upper level). Default: 10,000 for
      ``"ijcnn1_like"``, 142 (25%) for ``"breast_cancer"``, whose remaining
      rows form the test set.
    batch_size: minibatch size for both levels (``None``: full batch).
    fit_intercept: append a constant feature equal to 1 (after
      standardising), whose weight is the intercept, with its own penalty:
      ``x`` and ``y`` then have ``d + 1`` entries, the last for the
      intercept. ``False`` gives the benchmark's model without intercept,
      which on the standardised, imbalanced ``"ijcnn1_like"`` data does worse
      than predicting the majority class.

  Returns:
    An :class:`problems.Instance` named ``"logistic_ijcnn1"`` or
    ``"logistic_breast_cancer"`` with a Newton ``lower_solution``, a dense
    ``hypergradient`` and ``value``, ``x_star=None``, ``x0 = 0``, ``y0 = 0``
    and ``evaluate(x, y) -> {"test_accuracy", "test_loss"}`` on the test rows
    (a row is predicted positive iff :math:`\\langle a, y \\rangle > 0`).
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")
  if key is None:
    key = jax.random.key(0)
  if dataset == "ijcnn1_like":
    num_train = NUM_TRAIN_IJCNN1 if num_train is None else num_train
    num_val = NUM_VAL_IJCNN1 if num_val is None else num_val
    name = "logistic_ijcnn1"
  else:
    num_train = 284 if num_train is None else num_train
    num_val = 142 if num_val is None else num_val
    name = "logistic_breast_cancer"
  if num_train < 1 or num_val < 1:
    raise ValueError(f"num_train and num_val must be positive; got "
                     f"{num_train} and {num_val}.")
  make = _ijcnn1_like if dataset == "ijcnn1_like" else _breast_cancer
  (train_a, train_b), (val_a, val_b), (test_a, test_b) = make(
      key, num_train, num_val)

  mean, std = train_a.mean(axis=0), train_a.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  standardised = (train_a - mean) / std
  largest = np.linalg.eigvalsh(standardised.T @ standardised / num_train)[-1]
  std = std * max(1.0, np.sqrt(largest / 4.0))

  dtype = jnp.zeros(()).dtype  # float64 under jax_enable_x64
  def arrays(features, labels):
    features = (features - mean) / std
    if fit_intercept:
      features = np.concatenate([features, np.ones((len(features), 1))], 1)
    return {"features": jnp.asarray(features, dtype),
            "labels": jnp.asarray(labels, dtype)}
  train_set = arrays(train_a, train_b)
  val_set = arrays(val_a, val_b)
  test_set = arrays(test_a, test_b)
  dim = train_set["features"].shape[1]

  def mean_logistic_loss(y, batch):
    margins = batch["labels"] * (batch["features"] @ y)
    return jnp.mean(jax.nn.softplus(-margins))

  def lower(x, y, batch):
    return mean_logistic_loss(y, batch) + 0.5 * jnp.sum(jnp.exp(x) * y ** 2)

  def upper(x, y, batch):
    del x
    return mean_logistic_loss(y, batch)

  def evaluate(x, y):
    del x
    scores = test_set["features"] @ y
    predictions = jnp.where(scores > 0, 1.0, -1.0).astype(dtype)
    correct = (predictions == test_set["labels"]).astype(dtype)
    return {"test_accuracy": jnp.mean(correct),
            "test_loss": mean_logistic_loss(y, test_set)}

  problem = bilevel.Problem(upper, lower)
  data = bilevel.Data(upper=val_set, lower=train_set,
                      upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  x0 = jnp.zeros(dim, dtype)
  y0 = jnp.zeros(dim, dtype)
  lower_solution = newton_lower_solution(problem, data, y0,
                                         num_iterations=NEWTON_ITERATIONS)
  return Instance(
      name, problem, data, x0, y0, lower_solution=lower_solution,
      hypergradient=dense_hypergradient(problem, data, lower_solution),
      value=value_function(problem, data, lower_solution), x_star=None,
      evaluate=evaluate)
