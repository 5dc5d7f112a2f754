r"""Recurrent-network bilevel problems, whose smoothness is unbounded.

The three experiments of Hao, Gong & Liu (2024) train recurrent networks,
whose loss has a Hessian that grows with the gradient (relaxed,
:math:`(L_0, L_1)`-smoothness) rather than being bounded. This module builds
small offline versions of the three settings, with a recurrent encoder
:math:`\phi_w` that maps a sequence to its last hidden state and a linear
softmax head :math:`(W, c)`, both pure JAX pytrees:

* **Data hyper-cleaning** (:func:`rnn_hyper_cleaning`). A fraction of the
  training labels is corrupted once; the upper variable :math:`x \in
  \mathbb{R}^n` weighs each training sample by :math:`\sigma(x_i)`, the lower
  variable is the whole network :math:`y = (w, W, c)`:

  .. math::

     g(x, y) = \frac1n \sum_{i=1}^n \sigma(x_i)\, \ell_i(y)
               + \frac{\mu}{2} \|y\|^2, \qquad
     f(x, y) = \frac1m \sum_{j=1}^m \ell'_j(y),

  with :math:`\ell_i` the cross-entropy on noisy training row ``i`` and
  :math:`\ell'_j` on clean validation row ``j``.
* **Hyperparameter optimisation** (:func:`rnn_hyperparameter`). The upper
  variable is a scalar :math:`x`, the log of an L2 coefficient: :math:`g(x,
  y) = \frac1n \sum_i \ell_i(y) + \frac{e^x}{2}\|y\|^2` on training rows,
  :math:`f` the validation cross-entropy.
* **Hyper-representation** (:func:`rnn_hyper_representation`). Few-shot tasks
  are drawn from the dataset; the upper variable is the encoder :math:`x =
  w`, the lower one a linear head :math:`h_t = (W_t, c_t)` per task:

  .. math::

     g(x, y) = \frac1N \sum_{t=1}^N \Bigl[\frac1{|S_t|} \sum_{i \in S_t}
               \ell(h_t; \phi_x(s_i), b_i) + \frac{\mu}{2}\|h_t\|^2\Bigr],
     \qquad
     f(x, y) = \frac1N \sum_{t=1}^N \frac1{|Q_t|} \sum_{j \in Q_t}
               \ell(h_t; \phi_x(s_j), b_j),

  over the support sets :math:`S_t` and query sets :math:`Q_t`.

Only the last setting has a lower level that is strongly convex (in the heads,
for a fixed encoder), as bilevel theory assumes; in the first two, as in the
paper, the lower variable is a recurrent network and :math:`g` is nonconvex in
:math:`y`: the penalty makes it strongly convex only where the Hessian of the
data term exceeds :math:`-\mu I` (or :math:`-e^x I`), e.g. near a minimiser
where that Hessian is positive semidefinite.

Data, offline: scikit-learn's bundled digits (1797 images of 8x8 pixels) read
row by row, i.e. sequences of 8 steps of 8 features in [0, 1]
(:func:`digits_sequences`); and the MNIST-1D generator of Greydanus (2020),
sequences of 40 steps of one feature (:func:`mnist1d_sequences`). Both have 10
classes.

Measured (key 0, default sizes unless stated; float64 runs of
``bilevel.solvers.soba`` with constant steps for ``(x, y, v)``):

* hyper-cleaning, digits, Elman, ``num_train=500``, steps ``(5, 0.5,
  0.5)``, 200 iterations: test accuracy 0.10 -> 0.90, mean weight 0.66 on
  clean and 0.32 on corrupted rows (400 iterations at ``num_train=1000``:
  0.93, weights 0.65 and 0.31);
* hyperparameter optimisation, digits, Elman, ``optax.adam(1e-2)`` for ``x``
  and 0.5 for ``y`` and ``v``, 1000 iterations: test accuracy 0.97 (0.89
  with sampling key 1), the coefficient going from 1e-2 to 4e-4. With
  ``optax.adam(0.1)`` the coefficient grows to about 1.3 and the network
  collapses to ``y = 0`` (chance accuracy): the upper landscape is not
  benign;
* hyper-representation, digits, Elman, steps ``(1, 4, 4)``, 1000 iterations:
  test accuracy with fresh heads 0.81 (random encoder) -> 0.98;
* MNIST-1D is much harder for a last-state encoder: plain single-level Adam
  (3e-3, batches of 64, :math:`\mu = 10^{-3}`) takes the LSTM to 0.76 test
  accuracy in 5000 steps while the Elman network is unstable and ends at
  chance; SOBA with a step of 0.5 for ``v`` diverges (the curvature in ``y``
  exceeds 4) and needs smaller steps there.

Cost of one jitted SOBA step at the default sizes (float32, 2 CPU cores):
about 0.8 ms on digits with an Elman cell (1.3 ms for hyper-representation),
2.6 ms (3.2 ms) with an LSTM; on MNIST-1D's 40 steps, 2.9 ms (4.6 ms) with an
Elman cell and 13 ms (28 ms) with an LSTM. The cost grows about linearly with
the batch size: smaller batches make the MNIST-1D LSTM cheaper.

Pitfalls of the official BO-REP code avoided here:

* the regulariser is the *squared* L2 norm :math:`\frac{\mu}{2}\|y\|^2` (the
  code adds :math:`10^{-4}\|y\|`, neither smooth at 0 nor strongly convex);
* label noise is drawn once from the key (the code redraws it at every access
  of a sample, so labels change between epochs);
* the upper loss of hyper-cleaning uses a clean validation split, never the
  noisy training rows;
* the L2 coefficient of hyperparameter optimisation is :math:`e^x > 0` (the
  code's coefficient is unconstrained and may turn negative);
* ``evaluate`` is pure: test-time adaptation fits fresh heads and never
  changes the training state.

References:
  Hao, Gong & Liu, "Bilevel Optimization under Unbounded Smoothness: A New
  Algorithm and Convergence Analysis", ICLR 2024. Elman, "Finding structure
  in time", Cognitive Science, 1990. Hochreiter & Schmidhuber, "Long
  short-term memory", Neural Computation, 1997. Gers, Schmidhuber & Cummins,
  "Learning to forget", Neural Computation, 2000 (the forget gate). Glorot &
  Bengio, "Understanding the difficulty of training deep feedforward neural
  networks", AISTATS 2010. Greydanus, "Scaling down deep learning with
  MNIST-1D", 2020 (arXiv:2011.14439).
"""

from __future__ import annotations

import functools
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from problems._base import Instance, numpy_seed, split_rows

PyTree = Any

NUM_CLASSES = 10
CELLS = ("elman", "lstm")
DATASETS = ("digits", "mnist1d")
#: Seed of the MNIST-1D generator used by the builders (the package default).
MNIST1D_SEED = 42
#: Damped Newton steps of :func:`fit_linear_heads`.
NEWTON_ITERATIONS = 20
_GATES = {"elman": 1, "lstm": 4}


# ----------------------------------------------------------------------------
# The network.


def _check_cell(cell: str) -> None:
  if cell not in CELLS:
    raise ValueError(f"cell must be one of {CELLS}; got {cell!r}.")


def init_rnn(key: jax.Array, input_dim: int, hidden_dim: int,
             cell: str = "elman", dtype=None) -> dict[str, jax.Array]:
  r"""Random weights of a one-layer recurrent encoder.

  The weights of the ``G`` gates (``G = 1`` for ``"elman"``, 4 for
  ``"lstm"``, in the order input, forget, cell, output) are stored side by
  side: ``{"input": (input_dim, G * hidden_dim), "recurrent": (hidden_dim, G
  * hidden_dim), "bias": (G * hidden_dim,)}``. Each gate's input and
  recurrent blocks are drawn from Glorot's uniform distribution,
  :math:`U(-a, a)` with :math:`a = \sqrt{6 / (\text{fan}_\text{in} +
  \text{fan}_\text{out})}`, where :math:`\text{fan}_\text{out}` is
  ``hidden_dim`` and :math:`\text{fan}_\text{in}` is ``input_dim`` or
  ``hidden_dim``. Biases are 0, except the LSTM forget gate's, set to 1 so
  that the cell state is kept at the start of training (Gers et al., 2000).

  Args:
    key: PRNG key.
    input_dim: features per time step.
    hidden_dim: size of the hidden state.
    cell: ``"elman"`` or ``"lstm"``.
    dtype: float dtype; ``None`` is JAX's default (float64 under x64).

  Returns:
    The dict of weights.
  """
  _check_cell(cell)
  return _init_rnn(key, int(input_dim), int(hidden_dim), cell,
                   jnp.zeros((), dtype).dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_rnn(key, input_dim, hidden_dim, cell, dtype):
  gates = _GATES[cell]
  input_key, recurrent_key = jax.random.split(key)

  def glorot(key, fan_in):
    limit = np.sqrt(6.0 / (fan_in + hidden_dim))
    blocks = jax.random.uniform(key, (fan_in, gates, hidden_dim), dtype,
                                -limit, limit)
    return blocks.reshape(fan_in, gates * hidden_dim)

  bias = jnp.zeros((gates, hidden_dim), dtype)
  if cell == "lstm":
    bias = bias.at[1].set(1.0)
  return {"input": glorot(input_key, input_dim),
          "recurrent": glorot(recurrent_key, hidden_dim),
          "bias": bias.reshape(-1)}


def encode(params: dict[str, jax.Array], sequences: jax.Array,
           cell: str = "elman") -> jax.Array:
  r"""The last hidden state of the recurrent network on each sequence.

  From :math:`h_0 = 0` (and :math:`c_0 = 0`), with :math:`a_t = s_t W_x + b`
  computed for all steps at once and a ``jax.lax.scan`` over time:

  * Elman (1990): :math:`h_t = \tanh(a_t + h_{t-1} W_h)`.
  * LSTM (Hochreiter & Schmidhuber, 1997, with a forget gate):
    :math:`(i, f, u, o) = a_t + h_{t-1} W_h` split in four,
    :math:`c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(u)`,
    :math:`h_t = \sigma(o) \odot \tanh(c_t)`.

  Args:
    params: weights from :func:`init_rnn`.
    sequences: ``(..., time, input_dim)``; any leading axes are batch axes.
    cell: ``"elman"`` or ``"lstm"`` (the one ``params`` were made for).

  Returns:
    The features :math:`h_T`, shaped ``(..., hidden_dim)``.
  """
  _check_cell(cell)
  hidden_dim = params["recurrent"].shape[0]
  leading = sequences.shape[:-2]
  steps = sequences.reshape((-1,) + sequences.shape[-2:])
  inputs = jnp.swapaxes(steps @ params["input"] + params["bias"], 0, 1)
  batch = steps.shape[0]
  h0 = jnp.zeros((batch, hidden_dim), inputs.dtype)

  if cell == "elman":
    def step(h, a):
      return jnp.tanh(a + h @ params["recurrent"]), None
    h, _ = jax.lax.scan(step, h0, inputs)
  else:
    def step(carry, a):
      h, c = carry
      i, f, u, o = jnp.split(a + h @ params["recurrent"], 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
      return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None
    (h, _), _ = jax.lax.scan(step, (h0, h0), inputs)
  return h.reshape(leading + (hidden_dim,))


def _logits(head, features):
  return features @ head["weights"] + head["bias"]


def _cross_entropies(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _squared_norm(tree) -> jax.Array:
  return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(tree))


def _accuracy(logits, labels, dtype):
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(dtype))


# ----------------------------------------------------------------------------
# Datasets.


def digits_sequences() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits read row by row.

  Returns:
    ``(sequences, labels)``: float64 ``(1797, 8, 8)`` (time step ``t`` is
    pixel row ``t`` of the image, pixels divided by 16 into [0, 1]) and int
    ``(1797,)`` in ``0..9``.
  """
  from sklearn.datasets import load_digits  # optional dependency

  digits = load_digits()
  return digits.images / 16.0, digits.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _mnist1d_cached(num_samples: int, seed: int):
  try:
    from mnist1d.data import get_dataset_args, make_dataset
  except ImportError as error:
    raise ImportError(
        "dataset='mnist1d' needs the mnist1d package (pip install mnist1d)."
    ) from error
  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  # make_dataset seeds and draws from the global `random` and `np.random`
  # generators; restore them so that building a problem has no side effect.
  python_state, numpy_state = random.getstate(), np.random.get_state()
  try:
    dataset = make_dataset(args)
  finally:
    random.setstate(python_state)
    np.random.set_state(numpy_state)
  sequences = np.concatenate([dataset["x"], dataset["x_test"]])[..., None]
  labels = np.concatenate([dataset["y"], dataset["y_test"]]).astype(np.int64)
  sequences.flags.writeable = False
  labels.flags.writeable = False
  return sequences, labels


def mnist1d_sequences(num_samples: int = 4000, seed: int = MNIST1D_SEED
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Sequences from the MNIST-1D generator (Greydanus, 2020), in memory.

  Calls ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads
  or writes a pickle): nothing is read from the network or the disk. The
  generator's own train/test split is undone (the rows are concatenated);
  the builders make their own splits. The generator standardises the signals
  with one mean and one standard deviation over the whole set. Results are
  cached per ``(num_samples, seed)``; the global ``random`` and
  ``np.random`` states are left as they were.

  Args:
    num_samples: rows to generate; the generator makes ``num_samples // 10``
      per class.
    seed: the generator's seed.

  Returns:
    ``(sequences, labels)``: float64 ``(10 * (num_samples // 10), 40, 1)``
    and int labels in ``0..9`` (read-only arrays).

  Raises:
    ImportError: if the ``mnist1d`` package is not installed.
    ValueError: if ``num_samples < 10``.
  """
  if num_samples < NUM_CLASSES:
    raise ValueError(f"num_samples must be at least {NUM_CLASSES}; got "
                     f"{num_samples}.")
  return _mnist1d_cached(int(num_samples), int(seed))


def _load(dataset: str, mnist1d_samples: int):
  if dataset == "digits":
    return digits_sequences()
  if dataset == "mnist1d":
    return mnist1d_sequences(mnist1d_samples, MNIST1D_SEED)
  raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")


def _default_key(key):
  return jax.random.key(0) if key is None else key


def rnn_classification_data(key: jax.Array | None = None, *,
                            dataset: str = "digits", corruption: float = 0.0,
                            num_train: int = 1000, num_val: int = 300,
                            mnist1d_samples: int = 4000
                            ) -> dict[str, np.ndarray]:
  """The split (and, optionally, corrupted) sequences, as NumPy arrays.

  :func:`rnn_hyper_cleaning` and :func:`rnn_hyperparameter` build their
  instances from this; call it with the same arguments to know the split and
  which training labels were corrupted.

  Corruption: ``round(corruption * num_train)`` training rows, drawn without
  replacement, get a label drawn uniformly among the 9 *other* classes, once
  for a given ``key``. Validation and test labels are never changed.

  Args:
    key: PRNG key of the split and the corruption; ``None`` is
      ``jax.random.key(0)``.
    dataset: ``"digits"`` or ``"mnist1d"``.
    corruption: fraction of training labels to corrupt, in ``[0, 1]``.
    num_train: training rows.
    num_val: validation rows; the rest of the dataset is the test set.
    mnist1d_samples: rows generated for ``"mnist1d"`` (ignored for digits).

  Returns:
    A dict with float64 ``"train_sequences"`` ``(num_train, T, d)``,
    ``"val_sequences"``, ``"test_sequences"``; int ``"train_labels"`` (after
    corruption), ``"train_true_labels"``, ``"val_labels"``,
    ``"test_labels"``; the boolean ``"corrupted"`` ``(num_train,)``; and the
    positions of the rows in the full dataset, ``"train_rows"``,
    ``"val_rows"``, ``"test_rows"``.
  """
  if not 0.0 <= corruption <= 1.0:
    raise ValueError(f"corruption must be in [0, 1]; got {corruption}.")
  sequences, labels = _load(dataset, mnist1d_samples)
  rng = np.random.default_rng(numpy_seed(_default_key(key)))
  train, val, test = split_rows(rng, labels.shape[0], num_train, num_val)
  true_labels = labels[train]
  corrupted = np.zeros(num_train, bool)
  corrupted[rng.permutation(num_train)[:round(corruption * num_train)]] = True
  shifts = rng.integers(1, NUM_CLASSES, num_train)  # never 0: a new class
  noisy_labels = np.where(corrupted, (true_labels + shifts) % NUM_CLASSES,
                          true_labels)
  return {
      "train_sequences": sequences[train], "train_labels": noisy_labels,
      "train_true_labels": true_labels, "corrupted": corrupted,
      "val_sequences": sequences[val], "val_labels": labels[val],
      "test_sequences": sequences[test], "test_labels": labels[test],
      "train_rows": train, "val_rows": val, "test_rows": test,
  }


def _init_network(key, input_dim, hidden_dim, cell, dtype):
  """A random encoder and a zero head: the lower variable of two settings."""
  return {"encoder": init_rnn(key, input_dim, hidden_dim, cell, dtype),
          "head": {"weights": jnp.zeros((hidden_dim, NUM_CLASSES), dtype),
                   "bias": jnp.zeros(NUM_CLASSES, dtype)}}


def _network_losses(y, sequences, labels, cell):
  return _cross_entropies(
      _logits(y["head"], encode(y["encoder"], sequences, cell)), labels)


def _check_choices(dataset, cell):
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}.")
  _check_cell(cell)


# ----------------------------------------------------------------------------
# Data hyper-cleaning.


def rnn_hyper_cleaning(key: jax.Array | None = None, *,
                       dataset: str = "digits", cell: str = "elman",
                       hidden_dim: int = 32, corruption: float = 0.3,
                       num_train: int = 1000, num_val: int = 300,
                       batch_size: int | None = 64, l2: float = 1e-3,
                       mnist1d_samples: int = 4000) -> Instance:
  r"""Data hyper-cleaning of a recurrent classifier.

  .. math::

     g(x, y) = \frac1n \sum_{i=1}^n \sigma(x_i)\, \ell(y; s_i, \tilde b_i)
               + \frac{\mu}{2} \|y\|^2, \qquad
     f(x, y) = \frac1m \sum_{j=1}^m \ell(y; s'_j, b'_j),

  where :math:`y = (w, W, c)` is the whole network (encoder weights ``w`` and
  linear head), :math:`\ell(y; s, b)` the cross-entropy of the logits
  :math:`\phi_w(s) W + c` (:func:`encode`) for label ``b``,
  :math:`\tilde b_i` the (partly corrupted) training labels and
  :math:`(s'_j, b'_j)` the clean validation rows. :math:`\|y\|^2` sums the
  squares of every weight, biases included. A lower minibatch carries the
  positions of its rows in the training set (``batch["index"]``) so that
  ``g`` picks their weights :math:`x_i`.

  Args:
    key: PRNG key of the split, the corruption (as in
      :func:`rnn_classification_data` with the same key) and the initial
      encoder; ``None`` is ``jax.random.key(0)``.
    dataset: ``"digits"`` (8 steps of 8 features) or ``"mnist1d"`` (40 steps
      of 1 feature).
    cell: ``"elman"`` or ``"lstm"``.
    hidden_dim: size of the hidden state.
    corruption: fraction of training labels replaced by another class.
    num_train: training rows (lower level; the dimension of ``x``).
    num_val: clean validation rows (upper level); the rest is the test set.
    batch_size: minibatch size of both levels (``None``: full batch).
    l2: :math:`\mu`, the coefficient of the squared norm.
    mnist1d_samples: rows generated for ``"mnist1d"``.

  Returns:
    An :class:`problems.Instance` named ``"rnn_hyper_cleaning"`` with ``x0 =
    0`` (every weight :math:`\sigma(0) = 1/2`, as in
    :func:`problems.hyper_cleaning`), ``y0`` a Glorot-initialised encoder
    (:func:`init_rnn`) with a zero head, no references (the lower level is
    nonconvex) and ``evaluate(x, y)`` returning ``"test_accuracy"``,
    ``"test_loss"`` (clean test rows), ``"weight_clean"``,
    ``"weight_corrupted"`` (mean :math:`\sigma(x_i)` over the clean and the
    corrupted training rows; NaN if there are none) and
    ``"clean_weight_fraction"``.
  """
  _check_choices(dataset, cell)
  key = _default_key(key)
  arrays = rnn_classification_data(key, dataset=dataset,
                                   corruption=corruption, num_train=num_train,
                                   num_val=num_val,
                                   mnist1d_samples=mnist1d_samples)
  dtype = jnp.zeros(()).dtype
  lower_set = {"sequences": jnp.asarray(arrays["train_sequences"], dtype),
               "labels": jnp.asarray(arrays["train_labels"], jnp.int32),
               "index": jnp.arange(num_train, dtype=jnp.int32)}
  upper_set = {"sequences": jnp.asarray(arrays["val_sequences"], dtype),
               "labels": jnp.asarray(arrays["val_labels"], jnp.int32)}
  test_set = {"sequences": jnp.asarray(arrays["test_sequences"], dtype),
              "labels": jnp.asarray(arrays["test_labels"], jnp.int32)}
  corrupted = jnp.asarray(arrays["corrupted"])

  def lower(x, y, batch):
    weights = jax.nn.sigmoid(x[batch["index"]])
    losses = _network_losses(y, batch["sequences"], batch["labels"], cell)
    return jnp.mean(weights * losses) + 0.5 * l2 * _squared_norm(y)

  def upper(x, y, batch):
    del x
    return jnp.mean(_network_losses(y, batch["sequences"], batch["labels"],
                                    cell))

  @jax.jit
  def _evaluate(x, y, test, corrupted):
    logits = _logits(y["head"], encode(y["encoder"], test["sequences"], cell))
    weights = jax.nn.sigmoid(x)
    clean_total = jnp.sum(jnp.where(corrupted, 0.0, weights))
    corrupted_total = jnp.sum(jnp.where(corrupted, weights, 0.0))
    num_corrupted = jnp.sum(corrupted)
    return {
        "test_accuracy": _accuracy(logits, test["labels"], dtype),
        "test_loss": jnp.mean(_cross_entropies(logits, test["labels"])),
        "weight_clean": clean_total / (corrupted.size - num_corrupted),
        "weight_corrupted": corrupted_total / num_corrupted,
        "clean_weight_fraction": clean_total / (clean_total
                                                + corrupted_total),
    }

  problem = bilevel.Problem(upper, lower)
  data = bilevel.Data(upper=upper_set, lower=lower_set,
                      upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  input_dim = lower_set["sequences"].shape[-1]
  y0 = _init_network(jax.random.fold_in(key, 1), input_dim, hidden_dim, cell,
                     dtype)
  return Instance("rnn_hyper_cleaning", problem, data,
                  jnp.zeros(num_train, dtype), y0,
                  evaluate=lambda x, y: _evaluate(x, y, test_set, corrupted))


# ----------------------------------------------------------------------------
# Hyperparameter optimisation.


def rnn_hyperparameter(key: jax.Array | None = None, *,
                       dataset: str = "digits", cell: str = "elman",
                       hidden_dim: int = 32, num_train: int = 500,
                       num_val: int = 300, batch_size: int | None = 64,
                       initial_l2: float = 1e-2,
                       mnist1d_samples: int = 4000) -> Instance:
  r"""Learning the L2 coefficient of a recurrent classifier.

  .. math::

     g(x, y) = \frac1n \sum_{i=1}^n \ell(y; s_i, b_i)
               + \frac{e^x}{2} \|y\|^2, \qquad
     f(x, y) = \frac1m \sum_{j=1}^m \ell(y; s'_j, b'_j),

  with :math:`y = (w, W, c)` the whole network, :math:`\ell` the
  cross-entropy of :math:`\phi_w(s) W + c`, training rows :math:`(s_i, b_i)`
  and validation rows :math:`(s'_j, b'_j)`; :math:`x` is a scalar, so the
  coefficient :math:`e^x` stays positive. Labels are clean.

  Args:
    key: PRNG key of the split (as in :func:`rnn_classification_data` with
      the same key) and of the initial encoder; ``None`` is
      ``jax.random.key(0)``.
    dataset: ``"digits"`` or ``"mnist1d"``.
    cell: ``"elman"`` or ``"lstm"``.
    hidden_dim: size of the hidden state.
    num_train: training rows (lower level).
    num_val: validation rows (upper level); the rest is the test set.
    batch_size: minibatch size of both levels (``None``: full batch).
    initial_l2: the coefficient at ``x0 = log(initial_l2)``.
    mnist1d_samples: rows generated for ``"mnist1d"``.

  Returns:
    An :class:`problems.Instance` named ``"rnn_hyperparameter"``, ``x0`` a
    scalar array, ``y0`` a Glorot-initialised encoder with a zero head, no
    references, and ``evaluate(x, y)`` returning ``"test_accuracy"``,
    ``"test_loss"`` and ``"l2"`` (:math:`e^x`).
  """
  _check_choices(dataset, cell)
  if not initial_l2 > 0:
    raise ValueError(f"initial_l2 must be positive; got {initial_l2}.")
  key = _default_key(key)
  arrays = rnn_classification_data(key, dataset=dataset, num_train=num_train,
                                   num_val=num_val,
                                   mnist1d_samples=mnist1d_samples)
  dtype = jnp.zeros(()).dtype
  lower_set = {"sequences": jnp.asarray(arrays["train_sequences"], dtype),
               "labels": jnp.asarray(arrays["train_labels"], jnp.int32)}
  upper_set = {"sequences": jnp.asarray(arrays["val_sequences"], dtype),
               "labels": jnp.asarray(arrays["val_labels"], jnp.int32)}
  test_set = {"sequences": jnp.asarray(arrays["test_sequences"], dtype),
              "labels": jnp.asarray(arrays["test_labels"], jnp.int32)}

  def lower(x, y, batch):
    losses = _network_losses(y, batch["sequences"], batch["labels"], cell)
    return jnp.mean(losses) + 0.5 * jnp.exp(x) * _squared_norm(y)

  def upper(x, y, batch):
    del x
    return jnp.mean(_network_losses(y, batch["sequences"], batch["labels"],
                                    cell))

  @jax.jit
  def _evaluate(x, y, test):
    logits = _logits(y["head"], encode(y["encoder"], test["sequences"], cell))
    return {"test_accuracy": _accuracy(logits, test["labels"], dtype),
            "test_loss": jnp.mean(_cross_entropies(logits, test["labels"])),
            "l2": jnp.exp(x)}

  problem = bilevel.Problem(upper, lower)
  data = bilevel.Data(upper=upper_set, lower=lower_set,
                      upper_batch_size=batch_size,
                      lower_batch_size=batch_size)
  input_dim = lower_set["sequences"].shape[-1]
  y0 = _init_network(jax.random.fold_in(key, 1), input_dim, hidden_dim, cell,
                     dtype)
  x0 = jnp.asarray(np.log(initial_l2), dtype)
  return Instance("rnn_hyperparameter", problem, data, x0, y0,
                  evaluate=lambda x, y: _evaluate(x, y, test_set))


# ----------------------------------------------------------------------------
# Hyper-representation.


def rnn_tasks_data(key: jax.Array | None = None, *, dataset: str = "digits",
                   num_tasks: int = 200, num_test_tasks: int = 100,
                   ways: int = 5, shots: int = 5, test_fraction: float = 0.3,
                   mnist1d_samples: int = 4000) -> dict[str, np.ndarray]:
  """Few-shot classification tasks drawn from a sequence dataset.

  The rows are split at random into a training pool and a test pool
  (``round(test_fraction * rows)`` rows): training tasks are drawn from the
  first, test tasks from the second, so no sequence of a test task is ever
  seen in training. A task draws ``ways`` distinct classes uniformly, relabels
  them ``0..ways-1`` in the order drawn and, for each, ``2 * shots`` distinct
  rows of its pool: the first ``shots`` go to the support set, the others to
  the query set (support and query are disjoint; tasks may share rows).

  Args:
    key: PRNG key; ``None`` is ``jax.random.key(0)``.
    dataset: ``"digits"`` or ``"mnist1d"``.
    num_tasks: training tasks.
    num_test_tasks: test tasks.
    ways: classes per task, in ``2..10``.
    shots: support (and query) rows per class.
    test_fraction: share of the rows in the test pool.
    mnist1d_samples: rows generated for ``"mnist1d"``.

  Returns:
    A dict with, for ``prefix`` in ``""`` (training tasks) and ``"test_"``:
    float64 ``prefix + "support_sequences"`` ``(tasks, ways * shots, T, d)``,
    int ``prefix + "support_labels"`` ``(tasks, ways * shots)`` in
    ``0..ways-1``, the same for ``"query"``, ``prefix + "classes"`` ``(tasks,
    ways)`` (the original class of each new label), and ``prefix +
    "support_rows"``, ``prefix + "query_rows"`` (positions in the full
    dataset).

  Raises:
    ValueError: on bad sizes, or if a class has fewer than ``2 * shots`` rows
      in a pool.
  """
  if not 2 <= ways <= NUM_CLASSES:
    raise ValueError(f"ways must be in [2, {NUM_CLASSES}]; got {ways}.")
  if shots < 1 or num_tasks < 1 or num_test_tasks < 1:
    raise ValueError("shots, num_tasks and num_test_tasks must be positive; "
                     f"got {shots}, {num_tasks}, {num_test_tasks}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
  sequences, labels = _load(dataset, mnist1d_samples)
  rng = np.random.default_rng(numpy_seed(_default_key(key)))
  rows = rng.permutation(labels.shape[0])
  num_test_rows = round(test_fraction * labels.shape[0])
  pools = {"": rows[num_test_rows:], "test_": rows[:num_test_rows]}
  counts = {"": num_tasks, "test_": num_test_tasks}
  out = {}
  for prefix, pool in pools.items():
    by_class = [pool[labels[pool] == k] for k in range(NUM_CLASSES)]
    smallest = min(len(members) for members in by_class)
    if smallest < 2 * shots:
      pool_name = "test" if prefix else "training"
      raise ValueError(
          f"A class has only {smallest} rows in the {pool_name} pool; "
          f"{2 * shots} are needed for shots={shots}.")
    classes = np.stack([rng.choice(NUM_CLASSES, ways, replace=False)
                        for _ in range(counts[prefix])])
    picked = np.stack([
        np.stack([rng.choice(by_class[k], 2 * shots, replace=False)
                  for k in task_classes]) for task_classes in classes])
    support_rows = picked[:, :, :shots].reshape(len(classes), -1)
    query_rows = picked[:, :, shots:].reshape(len(classes), -1)
    new_labels = np.broadcast_to(np.repeat(np.arange(ways), shots),
                                 support_rows.shape).copy()
    out.update({
        prefix + "support_sequences": sequences[support_rows],
        prefix + "support_labels": new_labels,
        prefix + "query_sequences": sequences[query_rows],
        prefix + "query_labels": new_labels.copy(),
        prefix + "classes": classes,
        prefix + "support_rows": support_rows,
        prefix + "query_rows": query_rows,
    })
  return out


def _stack_head(head):
  """``(..., H + 1, K)``: the bias row, then the rows of ``W``."""
  return jnp.concatenate([head["bias"][..., None, :], head["weights"]],
                         axis=-2)


def _unstack_head(matrix):
  return {"weights": matrix[..., 1:, :], "bias": matrix[..., 0, :]}


def _augmented(features):
  """``(..., n, H + 1)``: a column of ones, then the features."""
  return jnp.concatenate([jnp.ones_like(features[..., :1]), features], axis=-1)


def _head_hessian(augmented, matrix, l2):
  r"""Hessian of one task's regularised softmax regression, dense.

  :math:`\frac1n \sum_i (\tilde\phi_i \tilde\phi_i^\top) \otimes
  (\mathrm{diag}(p_i) - p_i p_i^\top) + \mu I` for the stacked head
  ``matrix`` ``(H + 1, K)`` (:func:`_stack_head`), as a ``((H + 1) K, (H + 1)
  K)`` matrix indexed like ``matrix.ravel()``.
  """
  n, rows = augmented.shape
  num_classes = matrix.shape[-1]
  size = rows * num_classes
  p = jax.nn.softmax(augmented @ matrix, axis=-1)
  diagonal = jnp.einsum("si,sj,sk->ikj", augmented, augmented, p) / n
  scaled = (augmented[:, :, None] * p[:, None, :]).reshape(n, size)
  eye = jnp.eye(num_classes, dtype=matrix.dtype)
  full = (diagonal[:, :, :, None] * eye[None, :, None, :]).reshape(size, size)
  return (full - scaled.T @ scaled / n
          + l2 * jnp.eye(size, dtype=matrix.dtype))


def fit_linear_heads(features: jax.Array, labels: jax.Array,
                     num_classes: int, l2: float,
                     num_iterations: int = NEWTON_ITERATIONS) -> dict:
  r"""L2-regularised softmax regressions, one per task, by damped Newton.

  For each task ``t``, minimises the strongly convex

  .. math::

     \frac1n \sum_{i=1}^n \ell(\phi_i W + c, b_i)
     + \frac{\mu}{2}\bigl(\|W\|^2 + \|c\|^2\bigr)

  (cross-entropy :math:`\ell`) from :math:`W = 0, c = 0`. Each step solves
  with the analytic Hessian :math:`\frac1n \sum_i (\tilde\phi_i
  \tilde\phi_i^\top) \otimes (\mathrm{diag}(p_i) - p_i p_i^\top) + \mu I`,
  :math:`\tilde\phi_i = (1, \phi_i)`, and scales the direction by the largest
  of :math:`1, 1/2, \dots, 2^{-15}` that passes Armijo's test (1 if none
  does, which only happens at rounding level); iterates whose gradient is
  already below :math:`100\,\varepsilon` times the initial one are kept.
  Tasks are vmapped.

  Args:
    features: ``(tasks, n, H)``.
    labels: int ``(tasks, n)`` in ``0..num_classes-1``.
    num_classes: classes per task.
    l2: :math:`\mu > 0`.
    num_iterations: Newton steps.

  Returns:
    ``{"weights": (tasks, H, num_classes), "bias": (tasks, num_classes)}``.
  """
  dtype = features.dtype
  steps = 2.0 ** -jnp.arange(16, dtype=dtype)
  eps = jnp.finfo(dtype).eps

  def fit(phi, b):
    augmented = _augmented(phi)

    def loss(matrix):
      return (jnp.mean(_cross_entropies(augmented @ matrix, b))
              + 0.5 * l2 * jnp.sum(matrix ** 2))

    init = jnp.zeros((augmented.shape[1], num_classes), dtype)
    tolerance = 100 * eps * jnp.linalg.norm(jax.grad(loss)(init))

    def body(matrix, _):
      value, grad = jax.value_and_grad(loss)(matrix)
      direction = jnp.linalg.solve(_head_hessian(augmented, matrix, l2),
                                   grad.ravel()).reshape(matrix.shape)
      trials = jax.vmap(lambda t: loss(matrix - t * direction))(steps)
      armijo = trials <= value - 1e-4 * steps * jnp.vdot(grad, direction)
      step = steps[jnp.argmax(armijo)]  # the first that passes; 1 if none
      done = jnp.linalg.norm(grad) <= tolerance
      return jnp.where(done, matrix, matrix - step * direction), None

    matrix, _ = jax.lax.scan(body, init, None, length=num_iterations)
    return matrix

  return _unstack_head(jax.vmap(fit)(features, labels))


def _task_losses(heads, features, labels):
  """Mean cross-entropy per task, and the logits.

  Heads ``(B, H, K)``, features ``(B, n, H)``, labels ``(B, n)``.
  """
  logits = (jnp.einsum("bnh,bhk->bnk", features, heads["weights"])
            + heads["bias"][:, None, :])
  return jnp.mean(_cross_entropies(logits, labels), axis=-1), logits


def rnn_hyper_representation(key: jax.Array | None = None, *,
                             dataset: str = "digits", cell: str = "elman",
                             hidden_dim: int = 32, num_tasks: int = 200,
                             num_test_tasks: int = 100, ways: int = 5,
                             shots: int = 5, task_batch_size: int | None = 8,
                             l2: float = 1e-2, test_fraction: float = 0.3,
                             mnist1d_samples: int = 4000) -> Instance:
  r"""Hyper-representation: a shared recurrent encoder, one head per task.

  .. math::

     g(x, y) = \frac1N \sum_{t=1}^N \Bigl[\frac1{|S_t|} \sum_{i \in S_t}
               \ell(\phi_x(s_i) W_t + c_t, b_i)
               + \frac{\mu}{2}\bigl(\|W_t\|^2 + \|c_t\|^2\bigr)\Bigr],
     \qquad
     f(x, y) = \frac1N \sum_{t=1}^N \frac1{|Q_t|} \sum_{j \in Q_t}
               \ell(\phi_x(s_j) W_t + c_t, b_j),

  with :math:`x` the encoder's weights (:func:`encode`), :math:`y = (W_t,
  c_t)_{t \le N}` stacked as ``{"weights": (N, H, ways), "bias": (N,
  ways)}``, support sets :math:`S_t` and query sets :math:`Q_t` (see
  :func:`rnn_tasks_data`). The data's sample axis is the task axis: a
  minibatch is a batch of tasks, each with its support (lower) or query
  (upper) rows and its index ``batch["task"]``, and the sums over ``t``
  become means over the batch. For a fixed encoder ``g`` is :math:`\mu/N`
  strongly convex in ``y`` and separable across tasks.

  Minibatches: the upper and the lower minibatches are drawn independently,
  so they hold different tasks, and the minibatch Hessian of ``g`` is zero
  on the heads of the tasks it does not hold. Solvers that take damped steps
  on the linear system (SOBA, BO-REP, StocBiO's Neumann series) are
  unaffected; a few CG iterations on that singular system blow up (AID
  diverged within 5 steps at every step size tried, see
  ``paper_repro/borep/README.md``).

  Scale: on a batch of ``B`` tasks, the gradient of ``g`` with respect to one
  head is :math:`1/B` times that of its task's own loss, and each head is in
  a batch with probability ``B / N``; a lower step size ``B`` times larger
  than for one task is therefore the natural one.

  Args:
    key: PRNG key of the tasks (as in :func:`rnn_tasks_data` with the same
      key) and of the initial encoder; ``None`` is ``jax.random.key(0)``.
    dataset: ``"digits"`` or ``"mnist1d"``.
    cell: ``"elman"`` or ``"lstm"``.
    hidden_dim: size of the hidden state (the features of the heads).
    num_tasks: training tasks ``N``.
    num_test_tasks: held-out tasks, drawn from held-out rows, for
      ``evaluate``.
    ways: classes per task.
    shots: support (and query) rows per class.
    task_batch_size: tasks per minibatch of both levels (``None``: all).
    l2: :math:`\mu`.
    test_fraction: share of the rows reserved for the test tasks.
    mnist1d_samples: rows generated for ``"mnist1d"``.

  Returns:
    An :class:`problems.Instance` named ``"rnn_hyper_representation"`` with
    ``x0`` a Glorot-initialised encoder (:func:`init_rnn`), ``y0 = 0``,
    ``lower_solution`` (:func:`fit_linear_heads` on every training task: the
    lower level is separable and strongly convex, so damped Newton gives
    :math:`y^*(x)` to rounding accuracy), ``value`` and ``hypergradient``
    (block-diagonal Hessian solves, one per task) on the full data,
    ``x_star=None``, and ``evaluate(x, y)`` returning ``"test_accuracy"``
    (mean query accuracy of the test tasks after fitting fresh heads on their
    support sets with the encoder ``x`` by :func:`fit_linear_heads`, i.e.
    solving their lower problem exactly), ``"test_loss"`` (their query
    cross-entropy) and ``"train_query_accuracy"`` (mean query accuracy of
    the training tasks with the heads ``y``).
  """
  _check_choices(dataset, cell)
  key = _default_key(key)
  arrays = rnn_tasks_data(key, dataset=dataset, num_tasks=num_tasks,
                          num_test_tasks=num_test_tasks, ways=ways,
                          shots=shots, test_fraction=test_fraction,
                          mnist1d_samples=mnist1d_samples)
  dtype = jnp.zeros(()).dtype
  task = jnp.arange(num_tasks, dtype=jnp.int32)

  def level(prefix, part):
    return {"sequences": jnp.asarray(arrays[prefix + part + "_sequences"],
                                     dtype),
            "labels": jnp.asarray(arrays[prefix + part + "_labels"],
                                  jnp.int32)}

  lower_set = dict(level("", "support"), task=task)
  upper_set = dict(level("", "query"), task=task)
  test_set = {"support": level("test_", "support"),
              "query": level("test_", "query")}

  def heads_of(y, batch):
    return jax.tree.map(lambda leaf: leaf[batch["task"]], y)

  def lower(x, y, batch):
    heads = heads_of(y, batch)
    features = encode(x, batch["sequences"], cell)
    losses, _ = _task_losses(heads, features, batch["labels"])
    penalties = (jnp.sum(heads["weights"] ** 2, axis=(1, 2))
                 + jnp.sum(heads["bias"] ** 2, axis=1))
    return jnp.mean(losses + 0.5 * l2 * penalties)

  def upper(x, y, batch):
    features = encode(x, batch["sequences"], cell)
    losses, _ = _task_losses(heads_of(y, batch), features, batch["labels"])
    return jnp.mean(losses)

  # The Newton solves are compiled once per number of tasks, and called
  # (not inlined) by the value, the hypergradient and the evaluation.
  @jax.jit
  def solve_heads(x, support):
    return fit_linear_heads(encode(x, support["sequences"], cell),
                            support["labels"], ways, l2)

  def lower_solution(x):
    return solve_heads(x, lower_set)

  @jax.jit
  def metrics(x, y, test_heads, test, train_query):
    query = test["query"]
    losses, logits = _task_losses(
        test_heads, encode(x, query["sequences"], cell), query["labels"])
    _, train_logits = _task_losses(
        y, encode(x, train_query["sequences"], cell), train_query["labels"])
    return {"test_accuracy": _accuracy(logits, query["labels"], dtype),
            "test_loss": jnp.mean(losses),
            "train_query_accuracy": _accuracy(
                train_logits, train_query["labels"], dtype)}

  def evaluate(x, y):
    test_heads = solve_heads(x, test_set["support"])
    return metrics(x, y, test_heads, test_set, upper_set)

  upper_value = jax.jit(upper)

  def value(x):
    return upper_value(x, lower_solution(x), upper_set)

  @jax.jit
  def hypergradient_at(x, y, lower_data, upper_data):
    # With g = mean_t g_t and f = mean_t f_t, the Hessian of g is block
    # diagonal, H = diag(H_t) / N, and grad_y f stacks grad f_t / N, so
    # v = H^{-1} grad_y f has blocks v_t = H_t^{-1} grad f_t: one small
    # solve per task, with the Hessian of fit_linear_heads' objective.
    grad_x_f, grad_y_f = jax.grad(upper, (0, 1))(x, y, upper_data)
    augmented = _augmented(encode(x, lower_data["sequences"], cell))

    def solve(augmented_t, head, grad_head):
      hessian = _head_hessian(augmented_t, head, l2)
      return jnp.linalg.solve(hessian, num_tasks * grad_head.ravel()
                              ).reshape(head.shape)

    v = _unstack_head(jax.vmap(solve)(augmented, _stack_head(y),
                                      _stack_head(grad_y_f)))
    cross = jax.grad(lambda x_: optax.tree.vdot(
        jax.grad(lower, 1)(x_, y, lower_data), v))(x)
    return jax.tree.map(jnp.subtract, grad_x_f, cross)

  def hypergradient(x):
    return hypergradient_at(x, lower_solution(x), lower_set, upper_set)

  problem = bilevel.Problem(upper, lower)
  data = bilevel.Data(upper=upper_set, lower=lower_set,
                      upper_batch_size=task_batch_size,
                      lower_batch_size=task_batch_size)
  input_dim = lower_set["sequences"].shape[-1]
  x0 = init_rnn(jax.random.fold_in(key, 1), input_dim, hidden_dim, cell,
                dtype)
  y0 = {"weights": jnp.zeros((num_tasks, hidden_dim, ways), dtype),
        "bias": jnp.zeros((num_tasks, ways), dtype)}
  return Instance(
      "rnn_hyper_representation", problem, data, x0, y0,
      lower_solution=lower_solution, hypergradient=hypergradient,
      value=value, x_star=None, evaluate=evaluate)
