r"""Bilevel problems whose lower level has constraints coupling x and y.

The instances of the LV-HBA paper (Yao et al., ICLR 2024), for
:func:`bilevel.solvers.lvhba` and the constraint-penalty baseline
(:func:`bilevel.constraints.penalize`):

* :func:`llc_toy`: lower-level coupled constraint, known optimistic solution;
* :func:`llsc_toy`: lower-level set constraint :math:`Ay + Hx = 0` with
  generated matrices, exact lower solution;
* :func:`svm_hyperparameter` and :func:`svm_hyper_cleaning`: a linear
  soft-margin SVM in its constrained primal form, with one penalty per
  training sample as the hyperparameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from bilevel import projections
from problems._base import Instance, numpy_seed, split_rows

PyTree = Any


def llc_toy(*, dim: int = 100, as_inequalities: bool = False,
            joint_projection: bool = False, start: float = 10.0) -> Instance:
  r"""The LV-HBA toy with a lower-level coupled constraint (LLC).

  .. math::

     \min_{x} \tfrac12 \|y_1 - \mathbf 1\|^2 + \tfrac12 \|x - y_2\|^2
     \quad \text{s.t.} \quad (y_1, y_2) \in \arg\min_{y_1, y_2}
     \bigl\{ \tfrac12 \|y_1\|^2 - x^\top y_1 + \mathbf 1^\top y_2 :
     \mathbf 1^\top x + \mathbf 1^\top y_1 + \mathbf 1^\top y_2 = 0 \bigr\}

  with :math:`x, y_1, y_2 \in \mathbb R^n`. The lower solutions are
  :math:`y_1 = x + \mathbf 1` and any :math:`y_2` with
  :math:`\mathbf 1^\top y_2 = -2\,\mathbf 1^\top x - n`: not unique. The
  optimistic choice is :math:`y_2 = x + t\mathbf 1`,
  :math:`t = -(3\,\mathbf 1^\top x + n)/n`, which gives
  :math:`\Phi(x) = \tfrac12\|x\|^2 + \tfrac n2 t^2` and the solution
  :math:`x^* = -0.3\,\mathbf 1`, :math:`y_1^* = 0.7\,\mathbf 1`,
  :math:`y_2^* = -0.4\,\mathbf 1`.

  Args:
    dim: :math:`n` (the paper uses 100).
    as_inequalities: write the equality as the two inequalities
      :math:`s \le 0,\ -s \le 0` (``lower_constraints``) instead of
      ``lower_equality_constraints``.
    joint_projection: also set ``project_xy`` to the projection onto
      :math:`\{\mathbf 1^\top x + \mathbf 1^\top y = 0\}`, as the official
      code does. Without it the problem is as written from the paper's math;
      :func:`bilevel.solvers.lvhba` then builds the same projection from the
      affine coupling.
    start: the initial point is ``start`` in every coordinate (the code's 10).

  Returns:
    An :class:`Instance` with ``y = (y1, y2)``, the optimistic
    ``lower_solution``, ``value``, ``hypergradient`` and ``x_star``.
  """
  if dim < 1:
    raise ValueError(f"dim must be >= 1; got {dim}.")
  n = dim

  def upper(x, y, batch=None):
    y1, y2 = y
    return 0.5 * jnp.sum((y1 - 1.0) ** 2) + 0.5 * jnp.sum((x - y2) ** 2)

  def lower(x, y, batch=None):
    y1, y2 = y
    return 0.5 * jnp.sum(y1 ** 2) - x @ y1 + jnp.sum(y2)

  def coupling(x, y):
    y1, y2 = y
    return jnp.reshape(jnp.sum(x) + jnp.sum(y1) + jnp.sum(y2), (1,))

  def as_two_inequalities(x, y):
    s = coupling(x, y)
    return jnp.concatenate([s, -s])

  def shift(x):
    return -(3.0 * jnp.sum(x) + n) / n

  def lower_solution(x):
    return x + 1.0, x + shift(x)

  def value(x):
    return 0.5 * jnp.sum(x ** 2) + 0.5 * n * shift(x) ** 2

  def hypergradient(x):
    return x - 3.0 * shift(x)

  problem = bilevel.Problem(
      upper=upper, lower=lower,
      lower_constraints=as_two_inequalities if as_inequalities else None,
      lower_equality_constraints=None if as_inequalities else coupling,
      project_xy=(projections.joint(projections.affine(np.ones((1, 3 * n))))
                  if joint_projection else None))
  ones = jnp.ones(n)
  return Instance(
      name="llc_toy", problem=problem, data=None, x0=start * ones,
      y0=(start * ones, start * ones), lower_solution=lower_solution,
      hypergradient=hypergradient, value=value, x_star=-0.3 * ones)


def llsc_toy(key: jax.Array | None = None, *, dim: int = 100,
             num_constraints: int = 90,
             num_upper_constraints: int = 90) -> Instance:
  r"""The LV-HBA toy with a lower-level set constraint (LLSC).

  .. math::

     \min_{x : Bx = 0} \sin(c^\top x + d^\top y) + \log(\|x + y\|^2 + 1)
     \quad \text{s.t.} \quad y \in \arg\min_{y'} \bigl\{
     \tfrac12 \|x - y'\|^2 : A y' + H x = 0 \bigr\}

  with :math:`A, H \in \mathbb R^{m \times n}`,
  :math:`B \in \mathbb R^{m_B \times n}` and :math:`c, d \in \mathbb R^n`
  drawn uniformly from :math:`[0, 1)` (as the paper's ``.npy`` files were).
  The lower solution is the projection of :math:`x` onto the affine set,
  :math:`y^*(x) = x - A^+(A + H)x`; the upper objective is nonconvex, so
  no closed-form :math:`x^*` is given. The constraint is written
  :math:`W(Ay + Hx) = 0` with :math:`W = (AA^\top)^{-1/2}` (the same set, with
  orthonormal rows in :math:`y`; the raw rows make the multipliers' step
  stiff). ``project_xy`` is the exact
  projection onto :math:`C = \{(x, y) : Hx + Ay = 0,\ Bx = 0\}`, as in the
  official code.

  Args:
    key: JAX key for the matrices (default ``PRNGKey(0)``).
    dim: :math:`n`.
    num_constraints: :math:`m < n`, rows of :math:`A` and :math:`H`.
    num_upper_constraints: :math:`m_B < n`, rows of :math:`B`.

  Returns:
    An :class:`Instance` with the exact ``lower_solution``, ``value`` and
    ``hypergradient`` (by autodiff through :math:`y^*`).
  """
  if not 0 < num_constraints < dim or not 0 <= num_upper_constraints < dim:
    raise ValueError(
        "Need 0 < num_constraints < dim and 0 <= num_upper_constraints < dim; "
        f"got dim={dim}, num_constraints={num_constraints}, "
        f"num_upper_constraints={num_upper_constraints}.")
  key = jax.random.PRNGKey(0) if key is None else key
  rng = np.random.default_rng(numpy_seed(key))
  a, h = rng.random((2, num_constraints, dim))
  b = rng.random((num_upper_constraints, dim))
  c, d = rng.random((2, dim))
  lower_map = np.eye(dim) - np.linalg.pinv(a) @ (a + h)
  # The same set with orthonormal rows in y: W (A y + H x) = 0 with
  # W = (A A')^{-1/2}. The raw rows (entries in [0, 1)) have A A' with a
  # condition number near 1e4, too stiff for a descent-ascent step.
  eigenvalues, eigenvectors = np.linalg.eigh(a @ a.T)
  whiten = eigenvectors @ np.diag(eigenvalues ** -0.5) @ eigenvectors.T
  a_white, h_white = whiten @ a, whiten @ h
  joint_matrix = np.block([[h, a], [b, np.zeros_like(b)]])
  project_joint = projections.affine(joint_matrix)

  def upper(x, y, batch=None):
    return (jnp.sin(c @ x + d @ y)
            + jnp.log(jnp.sum((x + y) ** 2) + 1.0))

  def lower(x, y, batch=None):
    return 0.5 * jnp.sum((x - y) ** 2)

  def coupling(x, y):
    return a_white @ y + h_white @ x

  def project_xy(x, y):
    v = project_joint(jnp.concatenate([x, y]))
    return v[:dim], v[dim:]

  def lower_solution(x):
    return jnp.asarray(lower_map, x.dtype) @ x

  def value(x):
    return upper(x, lower_solution(x))

  problem = bilevel.Problem(upper=upper, lower=lower,
                            lower_equality_constraints=coupling,
                            project_xy=project_xy)
  x0, y0 = project_xy(10.0 * jnp.ones(dim), 10.0 * jnp.ones(dim))
  return Instance(
      name="llsc_toy", problem=problem, data=None, x0=x0, y0=y0,
      lower_solution=lower_solution, hypergradient=jax.grad(value),
      value=value)


# ---------------------------------------------------------------------------
# Linear SVM with per-sample penalties.


def fourclass_like(key: jax.Array | None = None, *, num_samples: int = 862):
  """Two-feature, two-class data shaped like LIBSVM's ``fourclass``.

  ``fourclass`` (862 points in the plane, classes interleaved so that a
  linear classifier reaches about 0.8 accuracy and a kernel one about 1.0)
  is not shipped by any package. This generator draws points uniformly in
  :math:`[-1, 1]^2` and labels them by a sine band with a blob of the other
  class cut out: a linear SVM scores 0.77 to 0.80 on held-out points, an
  RBF SVM 0.96 to 0.99 (scikit-learn, 3 splits).

  Returns:
    ``(features, labels)``: float64 ``(num_samples, 2)`` and labels in
    ``{-1, +1}``.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  rng = np.random.default_rng(numpy_seed(key))
  points = rng.uniform(-1.0, 1.0, size=(num_samples, 2))
  band = points[:, 1] > 0.55 * np.sin(2.6 * points[:, 0] + 0.4)
  blob = (points[:, 0] - 0.55) ** 2 + (points[:, 1] + 0.55) ** 2 < 0.09
  return points, np.where(band ^ blob, 1.0, -1.0)


def _svm_dataset(name: str, key):
  if name == "breast_cancer":
    from sklearn.datasets import load_breast_cancer  # pylint: disable=g-import-not-at-top
    features, labels = load_breast_cancer(return_X_y=True)
    return features, np.where(labels == 1, 1.0, -1.0)
  if name == "fourclass":
    return fourclass_like(key)
  raise ValueError(f"dataset must be 'breast_cancer' or 'fourclass'; got "
                   f"{name!r}.")


def _squared_hinge_newton(rows, weights, targets, metric, centre, *,
                          num_iterations: int = 50):
  r"""Minimises a strongly convex squared-hinge objective by semismooth Newton.

  .. math:: \min_u \tfrac12 (u - u_0)^\top D (u - u_0)
     + \tfrac12 \sum_i \omega_i [t_i - r_i^\top u]_+^2

  with :math:`D` diagonal (``metric``) and a backtracking line search on 12
  halvings evaluated at once. On one piece (a fixed set of active hinges)
  the objective is quadratic, so a full Newton step whose end has the same
  active set lands on the minimiser: the loop stops there (finite
  convergence), or after ``num_iterations``.
  """
  dtype = centre.dtype

  def objective(u):
    hinge = jnp.maximum(targets - rows @ u, 0.0)
    return (0.5 * jnp.sum(metric * (u - centre) ** 2)
            + 0.5 * jnp.sum(weights * hinge ** 2))

  def newton(carry):
    u, count, _ = carry
    active = targets - rows @ u > 0
    hinge = jnp.where(active, targets - rows @ u, 0.0)
    grad = metric * (u - centre) - rows.T @ (weights * hinge)
    hessian = jnp.diag(metric) + (rows.T * (weights * active)) @ rows
    direction = -jnp.linalg.solve(hessian, grad)
    steps = 0.5 ** jnp.arange(12, dtype=dtype)
    values = jax.vmap(lambda t: objective(u + t * direction))(steps)
    accept = values <= objective(u) + 1e-4 * steps * (grad @ direction)
    # The largest accepted step; the smallest one if none is (at working
    # precision near the minimum, where Armijo's test is all rounding).
    step = jnp.where(jnp.any(accept), steps[jnp.argmax(accept)], steps[-1])
    new = u + step * direction
    same_piece = jnp.all((targets - rows @ new > 0) == active)
    return new, count + 1, (step == 1.0) & same_piece

  def keep_going(carry):
    _, count, done = carry
    return (count < num_iterations) & ~done

  u, _, _ = jax.lax.while_loop(
      keep_going, newton, (centre, jnp.zeros((), jnp.int32),
                           jnp.zeros((), bool)))
  return u


def _signed_rows(features, labels):
  """Rows :math:`y_i (a_i, 1)`: margins are ``rows @ (w, b)``."""
  return np.concatenate([features, np.ones((len(labels), 1))], 1) * (
      labels[:, None])


def svm_margin_projection(features, labels, *, num_iterations: int = 50):
  r"""The exact projection onto the soft-margin polyhedron of a linear SVM.

  Projects :math:`(w_0, b_0, \xi_0)` onto
  :math:`P = \{(w, b, \xi) : 1 - \xi_i - y_i (w^\top a_i + b) \le 0\}`. For
  fixed :math:`u = (w, b)` the best slack is
  :math:`\xi_i = \max(\xi_{0,i}, 1 - y_i \tilde a_i^\top u)`, with
  :math:`\tilde a_i = (a_i, 1)`, so the projection reduces to the strongly
  convex piecewise quadratic

  .. math:: \min_u \tfrac12 \|u - u_0\|^2
     + \tfrac12 \sum_i [1 - \xi_{0,i} - y_i \tilde a_i^\top u]_+^2

  in :math:`d + 1` variables, solved by semismooth Newton with a backtracking
  line search (finite convergence once the active set is found). Cost per
  iteration: :math:`O(n d^2 + d^3)`, against a QP in :math:`n + d + 1`
  variables with :math:`n` constraints.

  Args:
    features: :math:`a_i`, shape ``(n, d)``.
    labels: :math:`y_i \in \{-1, +1\}`, shape ``(n,)``.
    num_iterations: Newton iterations at most.

  Returns:
    ``params -> params`` for ``params = {"w": (d,), "b": (), "xi": (n,)}``.
  """
  signed = _signed_rows(features, labels)

  def project(params):
    dtype = params["w"].dtype
    rows = jnp.asarray(signed, dtype)
    centre = jnp.concatenate([params["w"], params["b"][None]])
    u = _squared_hinge_newton(rows, jnp.ones(rows.shape[0], dtype),
                              1.0 - params["xi"], jnp.ones_like(centre),
                              centre, num_iterations=num_iterations)
    xi = jnp.maximum(params["xi"], 1.0 - rows @ u)
    return {"w": u[:-1], "b": u[-1], "xi": xi}

  return project


def svm_margin_qp_projection(features, labels, **kwargs):
  r"""The projection of :func:`svm_margin_projection` as a generic QP.

  :func:`bilevel.projections.polyhedron` on
  :math:`\{v = (w, b, \xi) : G v \le -\mathbf 1\}` with
  :math:`G = -[\,y \odot a,\ y,\ I\,]`: what a user without the structure
  would write, and what the official code solves with cvxpy/ECOS on the CPU
  at every iteration. ``kwargs`` go to ``polyhedron`` (``tol``,
  ``maxiter``).
  """
  n, d = features.shape
  matrix = -np.concatenate([features * labels[:, None], labels[:, None],
                            np.eye(n)], 1)
  project_flat = projections.polyhedron(matrix, -np.ones(n), **kwargs)

  def project(params):
    v = project_flat(jnp.concatenate([params["w"], params["b"][None],
                                      params["xi"]]))
    return {"w": v[:d], "b": v[d], "xi": v[d + 1:]}

  return project


def _svm(name: str, key, *, dataset: str, num_train: int, num_val: int,
         label_noise: float, projection: str) -> Instance:
  key = jax.random.PRNGKey(0) if key is None else key
  data_key, split_key, init_key = jax.random.split(key, 3)
  features, labels = _svm_dataset(dataset, data_key)
  rng = np.random.default_rng(numpy_seed(split_key))
  train, val, test = split_rows(rng, len(labels), num_train, num_val)
  mean, std = features[train].mean(0), features[train].std(0) + 1e-12
  features = (features - mean) / std
  a_train, a_val, a_test = features[train], features[val], features[test]
  clean_train = labels[train]
  flipped = rng.random(num_train) < label_noise
  b_train = np.where(flipped, -clean_train, clean_train)
  b_val, b_test = labels[val], labels[test]

  def margins(y, a, b):
    return b * (a @ y["w"] + y["b"])

  def upper(x, y, batch=None):
    # A smooth count of misclassified validation points (the paper's loss,
    # averaged instead of summed).
    norm = jnp.sqrt(jnp.sum(y["w"] ** 2) + 1e-12)
    soft_error = 2.0 * jax.nn.sigmoid(-5.0 * margins(y, a_val, b_val) / norm
                                      ) - 1.0
    return jnp.mean(jax.nn.leaky_relu(soft_error, 0.01))

  def lower(x, y, batch=None):
    return (0.5 * jnp.sum(y["w"] ** 2)
            + 0.5 * jnp.sum(jnp.exp(x) * y["xi"] ** 2))

  def margin_constraints(x, y):
    return 1.0 - y["xi"] - margins(y, a_train, b_train)

  if projection == "exact":
    project_y = svm_margin_projection(a_train, b_train)
  elif projection == "qp":
    project_y = svm_margin_qp_projection(a_train, b_train)
  elif projection == "none":
    project_y = None
  else:
    raise ValueError("projection must be 'exact', 'qp' or 'none'; got "
                     f"{projection!r}.")

  signed = _signed_rows(a_train, b_train)

  def lower_solution(x):
    # The lower level is the weighted squared-hinge SVM
    # 1/2 |w|^2 + 1/2 sum_i e^{x_i} [1 - y_i (w'a_i + b)]_+^2 (the slack at
    # its best, xi_i = [1 - margin_i]_+); b is unregularised (a 1e-10
    # ridge keeps Newton's matrix invertible when no margin is active).
    rows = jnp.asarray(signed, x.dtype)
    metric = jnp.ones(rows.shape[1], x.dtype).at[-1].set(1e-10)
    u = _squared_hinge_newton(rows, jnp.exp(x), jnp.ones_like(x), metric,
                              jnp.zeros(rows.shape[1], x.dtype))
    return {"w": u[:-1], "b": u[-1], "xi": jnp.maximum(1.0 - rows @ u, 0.0)}

  def value(x):
    return upper(x, lower_solution(x))

  def accuracy(y, a, b):
    return jnp.mean(margins(y, a, b) > 0)

  def evaluate(x, y):
    out = {"val_loss": upper(x, y), "val_accuracy": accuracy(y, a_val, b_val),
           "test_accuracy": accuracy(y, a_test, b_test),
           "train_violation": jnp.max(jnp.maximum(
               margin_constraints(x, y), 0.0))}
    if flipped.any():
      # Corrupted samples should get the smallest penalties.
      order = jnp.argsort(x)
      lowest = jnp.zeros(num_train, bool).at[order[:int(flipped.sum())]].set(
          True)
      out["flip_recall"] = jnp.mean(lowest[np.flatnonzero(flipped)])
    return out

  problem = bilevel.Problem(
      upper=upper, lower=lower, lower_constraints=margin_constraints,
      project_xy=(None if project_y is None
                  else lambda x, y: (x, project_y(y))))
  x0 = jax.random.uniform(init_key, (num_train,), minval=-6.0, maxval=-5.0)
  y0 = {"w": jnp.ones(features.shape[1]), "b": jnp.zeros(()),
        "xi": jnp.ones(num_train)}
  return Instance(name=name, problem=problem, data=None, x0=x0, y0=y0,
                  lower_solution=lower_solution, value=value,
                  evaluate=evaluate)


def svm_hyperparameter(key: jax.Array | None = None, *,
                       dataset: str = "breast_cancer",
                       num_train: int | None = None, num_val: int = 150,
                       projection: str = "exact") -> Instance:
  r"""Per-sample penalties of a linear soft-margin SVM (LV-HBA, section 5).

  .. math::

     \min_{x \in \mathbb R^n} \frac{1}{|V|} \sum_{i \in V}
       \operatorname{LeakyReLU}\Bigl(2 \sigma\Bigl(
       \frac{-5\, y_i (w^\top a_i + b)}{\|w\|}\Bigr) - 1\Bigr)
     \quad \text{s.t.} \quad (w, b, \xi) \in \arg\min
     \Bigl\{ \tfrac12 \|w\|^2 + \tfrac12 \sum_{i=1}^n e^{x_i} \xi_i^2 :
     1 - \xi_i - y_i (w^\top a_i + b) \le 0 \Bigr\}

  The upper loss is a smooth count of validation errors (the paper sums it;
  we average, which rescales the penalty :math:`c_k`). The lower level is
  strongly convex in :math:`(w, \xi)` but not in :math:`b`, and its
  :math:`n` margin constraints couple :math:`b` and :math:`w` with the
  slacks. ``project_xy`` projects :math:`(w, b, \xi)` onto the margin
  polyhedron, as the official code does (there with a CPU QP); ``x`` is
  unconstrained.

  Datasets: the paper's LIBSVM ``diabetes`` and ``fourclass`` are not
  shipped by any package. ``"breast_cancer"`` is scikit-learn's WDBC
  (569 x 30; not LIBSVM's ``breast-cancer``, 683 x 10);
  ``"fourclass"`` is :func:`fourclass_like`, generated. Features are
  standardised on the training rows.

  Args:
    key: JAX key for the split and the initial penalties.
    dataset: ``"breast_cancer"`` or ``"fourclass"``.
    num_train: training rows (default 300 for breast_cancer, 500 for
      fourclass, as the paper); ``num_val`` validation rows, the rest test.
    num_val: validation rows.
    projection: ``"exact"`` (:func:`svm_margin_projection`), ``"qp"``
      (:func:`svm_margin_qp_projection`) or ``"none"``.

  Returns:
    An :class:`Instance`: ``x`` the log-penalties (initialised in
    :math:`[-6, -5]` as the code), ``y = {"w", "b", "xi"}`` (initialised to
    ones, 0, ones); ``evaluate`` gives validation loss and accuracy, test
    accuracy and the largest margin violation.
  """
  if num_train is None:
    num_train = 300 if dataset == "breast_cancer" else 500
  return _svm("svm_hyperparameter", key, dataset=dataset,
              num_train=num_train, num_val=num_val, label_noise=0.0,
              projection=projection)


def svm_hyper_cleaning(key: jax.Array | None = None, *,
                       dataset: str = "breast_cancer",
                       num_train: int | None = None, num_val: int = 150,
                       label_noise: float = 0.4,
                       projection: str = "exact") -> Instance:
  r"""Data hyper-cleaning with the SVM lower level of :func:`svm_hyperparameter`.

  The same problem with each training label flipped with probability
  ``label_noise`` (the paper: 40% on gisette, which no package ships; here
  on the same datasets as :func:`svm_hyperparameter`). Validation and test
  labels are clean. A good :math:`x` gives the flipped samples small
  penalties :math:`e^{x_i}`; ``evaluate`` adds ``flip_recall``, the fraction
  of flipped samples among the ``#flipped`` smallest :math:`x_i`.
  """
  if not 0.0 <= label_noise < 0.5:
    raise ValueError(f"label_noise must be in [0, 0.5); got {label_noise}.")
  if num_train is None:
    num_train = 300 if dataset == "breast_cancer" else 500
  return _svm("svm_hyper_cleaning", key, dataset=dataset,
              num_train=num_train, num_val=num_val, label_noise=label_noise,
              projection=projection)
