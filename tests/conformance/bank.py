r"""The conformance bank: one small bilevel problem per problem class.

Every problem is written from the math alone (neither ``problems/`` nor the
solvers' own test problems are used) and has a closed-form solution
``x*`` of

.. math::

   \min_x \Phi(x) = f(x, y^*(x)), \qquad
   y^*(x) = \arg\min_{y \in Y(x)} g(x, y),

the optimistic one (the ``y`` of the solution set that is best for ``f``)
where the lower level has several minimisers. Where they are known, the
entries also carry ``lower_solution(x)`` (that ``y^*(x)``) and
``hypergradient(x)`` (:math:`\nabla\Phi(x)`) in NumPy float64.
``tests/test_conformance.py`` checks every closed form: the hypergradient
against central differences of :math:`\Phi(x) = f(x, y^*(x))` (the
problem's own ``f``), ``y^*(x)`` against the first-order conditions of the
lower problem (and of the optimistic selection), :math:`\nabla\Phi(x^*) =
0`, and ``x*`` against a brute-force minimisation of the closed-form
:math:`\Phi` with scipy from 20 random starts
(``test_bank_x_star_is_the_global_minimiser``).

The bank is what the solver registry (:mod:`bilevel.solvers._registry`) is
measured on: ``tests/conformance/measure.py`` runs every solver with its
defaults on every entry for ``num_steps`` steps, and the registry's
tolerances come from those numbers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from . import quadratics

PyTree = Any


class BankProblem(NamedTuple):
  """One problem of the bank.

  Attributes:
    name: a unique name (the test ids use it).
    problem_class: its class, one of
      :data:`bilevel.solvers._registry.PROBLEM_CLASSES`.
    problem: the :class:`bilevel.Problem`.
    data: its :class:`bilevel.Data`, or ``None`` (full batch).
    x0: the initial upper variable (a pytree of JAX arrays).
    y0: the initial lower variable.
    x_star: the exact solution, a pytree of NumPy arrays of ``x0``'s
      structure, in float64 even for the float32 problem.
    num_steps: the step budget with which solvers are run on it.
    description: the math, in one paragraph.
    lower_solution: ``x -> y*(x)`` in closed form (NumPy, float64), the
      optimistic selection when the lower level has several minimisers;
      ``None`` where unknown.
    hypergradient: ``x -> grad Phi(x)`` in closed form; ``None`` where
      unknown.
  """
  name: str
  problem_class: str
  problem: bilevel.Problem
  data: bilevel.Data | None
  x0: PyTree
  y0: PyTree
  x_star: PyTree
  num_steps: int
  description: str
  lower_solution: Callable[[PyTree], PyTree] | None = None
  hypergradient: Callable[[PyTree], PyTree] | None = None


def flat(tree: PyTree) -> np.ndarray:
  """The leaves of ``tree`` concatenated into one float64 NumPy vector."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in leaves])


def relative_error(x: PyTree, x_star: PyTree) -> float:
  r""":math:`\|x - x^*\| / \|x^*\|` over all leaves, in float64."""
  error = flat(x) - flat(x_star)
  return float(np.linalg.norm(error) / np.linalg.norm(flat(x_star)))


def _vector(values, dtype=jnp.float64) -> jax.Array:
  return jnp.asarray(np.asarray(values, np.float64), dtype)


# ---------------------------------------------------------------------------
# Strongly convex lower levels (tests/conformance/quadratics.py).


def _quadratic_entry(name: str, problem_class: str,
                     quadratic: quadratics.Quadratic, num_steps: int,
                     description: str) -> BankProblem:
  return BankProblem(
      name=name, problem_class=problem_class, problem=quadratic.problem,
      data=quadratic.data, x0=_vector(quadratic.x0),
      y0=_vector(quadratic.y0), x_star=np.asarray(quadratic.x_star),
      num_steps=num_steps, description=description,
      lower_solution=quadratic.lower_solution,
      hypergradient=quadratic.hypergradient)


_QUADRATIC = ("g = y'Ay/2 - y'(Bx + b), f = ||Cy - d||^2/2 + 0.05 ||x||^2, "
              "A with eigenvalues evenly in [1/kappa, 1], Phi 0.9-smooth; "
              "y* = A^-1 (Bx + b), x* = -(M'M + 0.1 I)^-1 M'm with "
              "M = C A^-1 B, m = C A^-1 b - d (tests/conformance/"
              "quadratics.py).")


def strongly_convex() -> BankProblem:
  """kappa = 10, x in R^10, y in R^8."""
  return _quadratic_entry(
      "quadratic_kappa10", "strongly_convex",
      quadratics.quadratic(10.0, dim_x=10, dim_y=8), 1000,
      "kappa = 10, x in R^10, y in R^8. " + _QUADRATIC)


def quadratic_kappa(condition_number: float, num_steps: int) -> BankProblem:
  """The quadratic of the issue: x in R^50, y in R^40."""
  return _quadratic_entry(
      f"quadratic_kappa{condition_number:g}",
      "ill_conditioned" if condition_number >= 100 else "strongly_convex",
      quadratics.quadratic(condition_number), num_steps,
      f"kappa = {condition_number:g}, x in R^50, y in R^40. " + _QUADRATIC)


def minibatch() -> BankProblem:
  """The kappa = 10 quadratic (x in R^50, y in R^40) as a mean over 256
  noisy samples."""
  return _quadratic_entry(
      "quadratic_minibatch", "minibatch",
      quadratics.quadratic(10.0, num_samples=256, batch_size=32), 2000,
      "The kappa = 10 quadratic (x in R^50, y in R^40) as a mean over 256 "
      "samples: g - y'xi_i and f + zeta_i'y, noise of mean exactly 0, so "
      "x* is that of the full problem; batches of 32 at both levels. "
      + _QUADRATIC)


# ---------------------------------------------------------------------------
# Y a box.

_BOX_T = np.array([2.0, 0.5, -1.0])
_BOX_S = np.array([3.0, 0.0, -2.0])
_BOX_R = 0.1


def box() -> BankProblem:
  r"""Y = [0, 1]^3, bounds active at both ends at the solution.

  :math:`g = \tfrac12\|y - x\|^2` on :math:`Y = [0, 1]^3` gives
  :math:`y^*(x) = \mathrm{clip}(x, 0, 1)`, and with
  :math:`f = \tfrac12\|y - t\|^2 + 0.05\|x - s\|^2`, :math:`\Phi` splits
  into one function per coordinate,
  :math:`\tfrac12(\mathrm{clip}(x_i) - t_i)^2 + 0.05 (x_i - s_i)^2`. With
  :math:`t = (2, 0.5, -1)` and :math:`s = (3, 0, -2)`: the first one
  decreases on :math:`(-\infty, 1]` (slope :math:`x - 2 + 0.1(x - 3) < 0`)
  and is minimal at :math:`x_1 = s_1 = 3` (where ``y = 1``, upper bound
  active); the second is minimal inside :math:`[0, 1]` where
  :math:`x - 0.5 + 0.1 x = 0`, :math:`x_2 = 0.5/1.1`; the third increases on
  :math:`[0, \infty)` and is minimal at :math:`x_3 = s_3 = -2` (``y = 0``,
  lower bound active). Checked by scipy
  (test_bank_x_star_is_the_global_minimiser).
  """
  def lower(x, y, batch):
    del batch
    return 0.5 * jnp.sum((y - x) ** 2)

  def upper(x, y, batch):
    del batch
    return (0.5 * jnp.sum((y - _vector(_BOX_T)) ** 2)
            + 0.5 * _BOX_R * jnp.sum((x - _vector(_BOX_S)) ** 2))

  def project(y):
    return optax.projections.projection_box(y, 0.0, 1.0)

  def lower_solution(x):
    return np.clip(np.asarray(x, np.float64), 0.0, 1.0)

  def hypergradient(x):
    x = np.asarray(x, np.float64)
    inside = (x > 0.0) & (x < 1.0)
    return inside * (lower_solution(x) - _BOX_T) + _BOX_R * (x - _BOX_S)

  return BankProblem(
      name="box", problem_class="box",
      problem=bilevel.Problem(upper, lower, project_y=project), data=None,
      x0=jnp.full(3, 0.5), y0=jnp.full(3, 0.5),
      x_star=np.array([3.0, 0.5 / 1.1, -2.0]), num_steps=1000,
      description=(
          "g = ||y - x||^2/2 on Y = [0,1]^3, f = ||y - t||^2/2 + "
          "0.05 ||x - s||^2, t = (2, 0.5, -1), s = (3, 0, -2); "
          "y* = clip(x, 0, 1), x* = (3, 0.5/1.1, -2): y*(x*) = (1, "
          "0.4545, 0), both bounds active."),
      lower_solution=lower_solution, hypergradient=hypergradient)


# ---------------------------------------------------------------------------
# Y the probability simplex.

_SIMPLEX_T = np.array([0.9, 0.3, -0.5])
_SIMPLEX_S = np.array([1.0, 0.5, -0.5])
_SIMPLEX_R = 0.1


def project_simplex_numpy(z: np.ndarray) -> np.ndarray:
  r"""Euclidean projection onto the simplex, :math:`(z - \tau)_+`.

  :math:`\tau` is the threshold that makes the result sum to one: sort
  ``z`` decreasingly, keep the largest ``k`` with
  :math:`u_k > (\sum_{i \le k} u_i - 1)/k`.
  """
  z = np.asarray(z, np.float64)
  ordered = np.sort(z)[::-1]
  excess = np.cumsum(ordered) - 1.0
  counts = np.arange(1, z.size + 1)
  support = np.nonzero(ordered > excess / counts)[0][-1] + 1
  return np.maximum(z - excess[support - 1] / support, 0.0)


def _simplex_jacobian(z: np.ndarray) -> np.ndarray:
  r"""The Jacobian of the simplex projection where its support is constant.

  On the support :math:`S` it is :math:`I - \mathbf 1\mathbf 1^\top/|S|`,
  zero elsewhere (a symmetric matrix).
  """
  support = (project_simplex_numpy(z) > 0).astype(np.float64)
  return (np.diag(support)
          - np.outer(support, support) / support.sum())


def simplex() -> BankProblem:
  r"""Y the probability simplex of R^3, one coordinate of y* at zero.

  :math:`g = \tfrac12\|y - x\|^2` on the simplex gives
  :math:`y^*(x) = \Pi_\Delta(x) = (x - \tau(x))_+`. Where the support is
  :math:`\{1, 2\}` (that is :math:`|x_1 - x_2| < 1` and
  :math:`x_3 < \tau = (x_1 + x_2 - 1)/2`), :math:`y^* = D x + e` with
  :math:`D = \tfrac12 [[1, -1, 0], [-1, 1, 0], [0, 0, 0]]` (a projection,
  :math:`D^2 = D`) and :math:`e = (\tfrac12, \tfrac12, 0)`. With
  :math:`f = \tfrac12\|y - t\|^2 + \tfrac r2\|x - s\|^2`,
  :math:`\nabla\Phi = D(Dx + e - t) + r(x - s) = 0` is the linear system
  :math:`(D + rI)x = D(t - e) + rs`. With :math:`t = (0.9, 0.3, -0.5)`,
  :math:`s = (1, 0.5, -0.5)` and :math:`r = 0.1` its solution is
  :math:`x^* = (1.15, 0.5, -0.55)/1.1 = (1.04545, 0.45455, -0.5)`, where
  :math:`\tau = 0.25 > x_3` and :math:`y^* = (0.79545, 0.20455, 0)`: inside
  the region. scipy's minimisation of the closed-form :math:`\Phi` from
  many starts finds no lower value (test_bank_x_star_is_the_global_minimiser).
  """
  d = 0.5 * np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  e = np.array([0.5, 0.5, 0.0])
  x_star = np.linalg.solve(d + _SIMPLEX_R * np.eye(3),
                           d @ (_SIMPLEX_T - e) + _SIMPLEX_R * _SIMPLEX_S)

  def lower(x, y, batch):
    del batch
    return 0.5 * jnp.sum((y - x) ** 2)

  def upper(x, y, batch):
    del batch
    return (0.5 * jnp.sum((y - _vector(_SIMPLEX_T)) ** 2)
            + 0.5 * _SIMPLEX_R * jnp.sum((x - _vector(_SIMPLEX_S)) ** 2))

  def hypergradient(x):
    x = np.asarray(x, np.float64)
    return (_simplex_jacobian(x) @ (project_simplex_numpy(x) - _SIMPLEX_T)
            + _SIMPLEX_R * (x - _SIMPLEX_S))

  return BankProblem(
      name="simplex", problem_class="simplex",
      problem=bilevel.Problem(
          upper, lower, project_y=optax.projections.projection_simplex),
      data=None, x0=jnp.zeros(3), y0=jnp.full(3, 1.0 / 3.0), x_star=x_star,
      num_steps=1000,
      description=(
          "g = ||y - x||^2/2 on the simplex of R^3, f = ||y - t||^2/2 + "
          "0.05 ||x - s||^2, t = (0.9, 0.3, -0.5), s = (1, 0.5, -0.5); "
          "y* = proj(x); on the face y3 = 0, (D + 0.1 I) x* = D(t - e) + "
          "0.1 s: x* = (1.15, 0.5, -0.55)/1.1, y*(x*) = (0.795, 0.205, 0)."),
      lower_solution=project_simplex_numpy, hypergradient=hypergradient)


# ---------------------------------------------------------------------------
# Y a Euclidean ball.

_BALL_RADIUS = 1.0
_BALL_X_STAR = np.array([1.2, 0.9, -0.6])
_BALL_T = np.array([0.5, 2.0, 0.4])
_BALL_R = 0.5


def _ball_projection_numpy(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x)
  return x if norm <= _BALL_RADIUS else _BALL_RADIUS * x / norm


def _ball_jacobian(x: np.ndarray) -> np.ndarray:
  r""":math:`I` inside the ball, :math:`\tfrac{R}{\|x\|}(I - uu^\top)`
  outside (:math:`u = x/\|x\|`)."""
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x)
  if norm <= _BALL_RADIUS:
    return np.eye(x.size)
  u = x / norm
  return _BALL_RADIUS / norm * (np.eye(x.size) - np.outer(u, u))


def _ball_s() -> np.ndarray:
  r"""The ``s`` that makes :data:`_BALL_X_STAR` stationary:
  :math:`s = x^* + J(x^*)(y^*(x^*) - t)/r`."""
  x = _BALL_X_STAR
  return x + _ball_jacobian(x) @ (_ball_projection_numpy(x) - _BALL_T) / _BALL_R


def ball() -> BankProblem:
  r"""Y the unit ball of R^3, active at the solution.

  :math:`g = \tfrac12\|y - x\|^2` on :math:`\{\|y\| \le 1\}` gives
  :math:`y^*(x) = x / \max(1, \|x\|)`, whose Jacobian outside the ball is
  :math:`J(x) = (I - uu^\top)/\|x\|`, :math:`u = x/\|x\|`. With
  :math:`f = \tfrac12\|y - t\|^2 + \tfrac r2\|x - s\|^2`,
  :math:`\nabla\Phi(x) = J(x)(y^*(x) - t) + r(x - s)` outside. Rather than
  solve this (a trust-region-like equation) for a given ``s``, the bank
  fixes :math:`x^* = (1.2, 0.9, -0.6)` (norm 1.6155, outside: the ball is
  active and :math:`y^*(x^*) = x^*/1.6155`), :math:`t = (0.5, 2, 0.4)`
  (not parallel to :math:`x^*`, so the tangential part of ``J`` matters),
  :math:`r = 0.5`, and sets :math:`s = x^* + J(x^*)(y^*(x^*) - t)/r`, which
  makes :math:`\nabla\Phi(x^*) = 0` exactly. That :math:`x^*` is the
  global minimiser is checked by scipy from many starts
  (test_bank_x_star_is_the_global_minimiser).
  """
  s = _ball_s()

  def lower(x, y, batch):
    del batch
    return 0.5 * jnp.sum((y - x) ** 2)

  def upper(x, y, batch):
    del batch
    return (0.5 * jnp.sum((y - _vector(_BALL_T)) ** 2)
            + 0.5 * _BALL_R * jnp.sum((x - _vector(s)) ** 2))

  def project(y):
    return optax.projections.projection_l2_ball(y, _BALL_RADIUS)

  def hypergradient(x):
    x = np.asarray(x, np.float64)
    return (_ball_jacobian(x) @ (_ball_projection_numpy(x) - _BALL_T)
            + _BALL_R * (x - s))

  return BankProblem(
      name="ball", problem_class="ball",
      problem=bilevel.Problem(upper, lower, project_y=project), data=None,
      x0=jnp.zeros(3), y0=jnp.zeros(3), x_star=_BALL_X_STAR.copy(),
      num_steps=1000,
      description=(
          "g = ||y - x||^2/2 on the unit ball of R^3, f = ||y - t||^2/2 + "
          "0.25 ||x - s||^2, t = (0.5, 2, 0.4), s = x* + J(x*)(y*(x*) - t)"
          "/0.5 with J = (I - uu')/||x||; y* = x/max(1, ||x||), x* = (1.2, "
          "0.9, -0.6) (outside: the ball is active)."),
      lower_solution=_ball_projection_numpy, hypergradient=hypergradient)


# ---------------------------------------------------------------------------
# A lower level with an affine set of minimisers.

# Halved so that g is 0.9-smooth in y, within the range the defaults
# are documented for (lower levels at most 2-smooth).
_WIDE = 0.5 * np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
_NONUNIQUE_W = 0.5 * np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0],
                               [1.0, -1.0]])
_NONUNIQUE_T = np.array([1.0, -1.0, 2.0, 0.5])
_NONUNIQUE_S = np.array([0.0, 1.0])
_NONUNIQUE_R = 1.0


def nonunique() -> BankProblem:
  r"""g = ||Ay - x||^2/2 with A of 2 rows and 4 columns: optimistic x*.

  ``A`` has full row rank, so for every ``x`` the lower minimisers are the
  affine plane :math:`\{y : Ay = x\}` (dimension 2). With
  :math:`f = \tfrac12\|y - Wx - t\|^2 + \tfrac r2\|x - s\|^2`, the
  optimistic selection is the projection of :math:`Wx + t` onto that
  plane, :math:`y^*(x) = Wx + t + A^\top G (x - AWx - At)` with
  :math:`G = (AA^\top)^{-1}`, so with :math:`M = I - AW` and
  :math:`m = At`,

  .. math::

     \Phi(x) = \tfrac12 (Mx - m)^\top G (Mx - m) + \tfrac r2\|x - s\|^2,
     \quad \nabla\Phi = M^\top G (Mx - m) + r(x - s),
     \quad x^* = (M^\top G M + rI)^{-1}(M^\top G m + rs).

  With the numbers below :math:`x^* = (5/123, 106/123) \approx (0.0407,
  0.8618)`. ``W`` has a
  component in the null space of ``A`` that depends on ``x``, so the
  selection matters: a solver that keeps the minimum-norm minimiser
  :math:`A^+x` (gradient descent on ``g`` from ``y0 = 0``) minimises
  :math:`\tfrac12\|(A^+ - W)x - t\|^2 + \tfrac r2\|x - s\|^2` instead, whose
  minimiser is (-0.295, 0.349), 71% away from ``x*``.
  """
  gram_inverse = np.linalg.inv(_WIDE @ _WIDE.T)
  coupling = np.eye(2) - _WIDE @ _NONUNIQUE_W
  offset = _WIDE @ _NONUNIQUE_T
  x_star = np.linalg.solve(
      coupling.T @ gram_inverse @ coupling + _NONUNIQUE_R * np.eye(2),
      coupling.T @ gram_inverse @ offset + _NONUNIQUE_R * _NONUNIQUE_S)

  def lower(x, y, batch):
    del batch
    return 0.5 * jnp.sum((_vector(_WIDE) @ y - x) ** 2)

  def upper(x, y, batch):
    del batch
    target = _vector(_NONUNIQUE_W) @ x + _vector(_NONUNIQUE_T)
    return (0.5 * jnp.sum((y - target) ** 2)
            + 0.5 * _NONUNIQUE_R * jnp.sum((x - _vector(_NONUNIQUE_S)) ** 2))

  def lower_solution(x):
    x = np.asarray(x, np.float64)
    target = _NONUNIQUE_W @ x + _NONUNIQUE_T
    return target + _WIDE.T @ gram_inverse @ (x - _WIDE @ target)

  def hypergradient(x):
    x = np.asarray(x, np.float64)
    return (coupling.T @ gram_inverse @ (coupling @ x - offset)
            + _NONUNIQUE_R * (x - _NONUNIQUE_S))

  return BankProblem(
      name="nonunique", problem_class="nonunique",
      problem=bilevel.Problem(upper, lower), data=None, x0=jnp.zeros(2),
      y0=jnp.zeros(4), x_star=x_star, num_steps=1000,
      description=(
          "g = ||Ay - x||^2/2, A = [[1,1,0,0],[0,1,1,1]]/2 (minimisers: the "
          "plane Ay = x), f = ||y - Wx - t||^2/2 + ||x - s||^2/2, "
          "W = [[1,0],[0,0],[0,1],[1,-1]]/2, t = (1, -1, 2, 0.5), s = (0, 1);"
          " optimistic y* = Wx + t + A'G(x - AWx - At), G = (AA')^-1; "
          "x* = (M'GM + I)^-1 (M'GAt + s) = (5/123, 106/123), M = I - AW (the "
          "minimum-norm selection A^+ x would give (-0.29, 0.35))."),
      lower_solution=lower_solution, hypergradient=hypergradient)


# ---------------------------------------------------------------------------
# Lower constraints coupling x and y: the LLC toy of LV-HBA.


def llc_toy(n: int, num_steps: int) -> BankProblem:
  r"""The LLC toy of Yao et al. (ICLR 2024), x in R^n, y = (y1, y2).

  .. math::

     \min_x \tfrac12\|x - y_2\|^2 + \tfrac12\|y_1 - \mathbf 1\|^2
     \quad\text{s.t.}\quad y \in \arg\min_{y:\ \mathbf 1^\top x +
     \mathbf 1^\top y_1 + \mathbf 1^\top y_2 = 0}
     \tfrac12\|y_1\|^2 - x^\top y_1 + \mathbf 1^\top y_2.

  The equality fixes :math:`\mathbf 1^\top y_2 = -\mathbf 1^\top x -
  \mathbf 1^\top y_1`, so the lower objective is
  :math:`\tfrac12\|y_1\|^2 - x^\top y_1 - \mathbf 1^\top y_1 -
  \mathbf 1^\top x`, minimal at :math:`y_1 = x + \mathbf 1`, and every
  :math:`y_2` with :math:`\mathbf 1^\top y_2 = -2\sigma - n`
  (:math:`\sigma = \mathbf 1^\top x`) is a minimiser. The optimistic
  :math:`y_2` is the point of that hyperplane nearest ``x``,
  :math:`y_2 = x + c\mathbf 1` with :math:`c = -(3\sigma + n)/n`, so
  :math:`\Phi(x) = \tfrac n2 (3\sigma/n + 1)^2 + \tfrac12\|x\|^2` and
  :math:`\nabla\Phi = 3(3\sigma/n + 1)\mathbf 1 + x`. At a zero gradient
  ``x`` is a multiple :math:`a\mathbf 1`, and :math:`3(3a + 1) + a = 0`
  gives :math:`a = -0.3` for every ``n``: :math:`x^* = -0.3\cdot\mathbf 1`,
  :math:`y_1^* = 0.7`, :math:`y_2^* = -0.4` (the paper's values for
  n = 100). :math:`\Phi` is a convex quadratic, so this is its minimiser.

  ``y`` is one vector :math:`(y_1, y_2)` of :math:`\mathbb R^{2n}` as in
  the paper; the coupling is ``lower_equality_constraints``, without a
  joint projection; ``x0 = 1``, ``y0 = 0``. With an inequality in place
  of the equality the lower level would be unbounded (:math:`y_2 \to
  -\infty` decreases it), which is why the equality is the toy's
  constraint here.
  """
  def lower(x, y, batch):
    del batch
    y1, y2 = y[:n], y[n:]
    return 0.5 * jnp.sum(y1 ** 2) - x @ y1 + jnp.sum(y2)

  def upper(x, y, batch):
    del batch
    y1, y2 = y[:n], y[n:]
    return 0.5 * jnp.sum((x - y2) ** 2) + 0.5 * jnp.sum((y1 - 1.0) ** 2)

  def coupling(x, y):
    return jnp.sum(x) + jnp.sum(y)

  def lower_solution(x):
    x = np.asarray(x, np.float64)
    shift = -(3.0 * x.sum() + n) / n
    return np.concatenate([x + 1.0, x + shift])

  def hypergradient(x):
    x = np.asarray(x, np.float64)
    return 3.0 * (3.0 * x.sum() / n + 1.0) * np.ones(n) + x

  return BankProblem(
      name=f"llc_toy_n{n}", problem_class="coupled",
      problem=bilevel.Problem(upper, lower,
                              lower_equality_constraints=coupling),
      data=None, x0=jnp.ones(n), y0=jnp.zeros(2 * n),
      x_star=np.full(n, -0.3), num_steps=num_steps,
      description=(
          f"LV-HBA's LLC toy, n = {n}: f = ||x - y2||^2/2 + ||y1 - 1||^2/2,"
          " g = ||y1||^2/2 - x'y1 + 1'y2 subject to 1'x + 1'y1 + 1'y2 = 0 "
          "(lower_equality_constraints, no project_xy); optimistic y1 = x + "
          "1, y2 = x - (3 1'x/n + 1) 1; x* = -0.3 (y1* = 0.7, y2* = -0.4); "
          "x0 = 1, y0 = 0."),
      lower_solution=lower_solution, hypergradient=hypergradient)


# ---------------------------------------------------------------------------
# Pytrees and float32.


def pytree() -> BankProblem:
  r"""A quadratic whose x and y are nested pytrees.

  ``x = {"a": R^3, "b": (R^2,)}`` and ``y = ({"w": R^{2x2}}, R^3)``: the
  objectives flatten them (``jax.flatten_util.ravel_pytree``: leaves in
  key order, row-major) and evaluate the kappa = 5 quadratic of
  ``tests/conformance/quadratics.py`` with x in R^5, y in R^7, so the
  closed forms are that quadratic's, unflattened.
  """
  quadratic = quadratics.quadratic(5.0, dim_x=5, dim_y=7, seed=1)
  x_like = {"a": jnp.zeros(3), "b": (jnp.zeros(2),)}
  y_like = ({"w": jnp.zeros((2, 2))}, jnp.zeros(3))
  _, unravel_x = jax.flatten_util.ravel_pytree(x_like)
  _, unravel_y = jax.flatten_util.ravel_pytree(y_like)
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]

  def lower(x, y, batch):
    return quadratic.problem.lower(ravel(x), ravel(y), batch)

  def upper(x, y, batch):
    return quadratic.problem.upper(ravel(x), ravel(y), batch)

  def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)

  def lower_solution(x):
    return to_numpy(unravel_y(_vector(quadratic.lower_solution(flat(x)))))

  def hypergradient(x):
    return to_numpy(unravel_x(_vector(quadratic.hypergradient(flat(x)))))

  return BankProblem(
      name="pytree", problem_class="pytree",
      problem=bilevel.Problem(upper, lower), data=None, x0=x_like,
      y0=y_like, x_star=to_numpy(unravel_x(_vector(quadratic.x_star))),
      num_steps=1000,
      description=(
          "x = {'a': R^3, 'b': (R^2,)}, y = ({'w': R^2x2}, R^3), flattened "
          "into the kappa = 5 quadratic with x in R^5, y in R^7 (seed 1). "
          + _QUADRATIC),
      lower_solution=lower_solution, hypergradient=hypergradient)


def float32() -> BankProblem:
  """The kappa = 10 quadratic (x in R^50, y in R^40) in single precision.

  Every constant, ``x0`` and ``y0`` are float32; ``x*`` is the float64
  closed form, so the error includes float32 rounding (about 1e-7
  relative per operation).
  """
  quadratic = quadratics.quadratic(10.0)
  upper, lower = quadratics.objectives(
      *(_vector(m, jnp.float32) for m in (quadratic.A, quadratic.B,
                                          quadratic.b, quadratic.C,
                                          quadratic.d)),
      np.float32(quadratic.r))

  return BankProblem(
      name="quadratic_float32", problem_class="float32",
      problem=bilevel.Problem(upper, lower), data=None,
      x0=jnp.zeros(50, jnp.float32), y0=jnp.zeros(40, jnp.float32),
      x_star=np.asarray(quadratic.x_star), num_steps=1000,
      description=(
          "The kappa = 10 quadratic, x in R^50, y in R^40, with float32 "
          "constants, x0 and y0; x* the float64 closed form. "
          + _QUADRATIC),
      lower_solution=quadratic.lower_solution,
      hypergradient=quadratic.hypergradient)


# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bank() -> tuple[BankProblem, ...]:
  if not jax.config.jax_enable_x64:
    raise RuntimeError(
        "The conformance bank is built in float64: call "
        "jax.config.update('jax_enable_x64', True) first (tests/conftest.py "
        "does).")
  entries = (
      strongly_convex(),
      quadratic_kappa(2.0, 1000),
      quadratic_kappa(100.0, 3000),
      nonunique(),
      box(),
      simplex(),
      ball(),
      llc_toy(3, 5000),
      llc_toy(100, 5000),
      minibatch(),
      pytree(),
      float32(),
  )
  names = [entry.name for entry in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"Bank names must be unique: {names}.")
  return entries


def bank() -> list[BankProblem]:
  """Every problem of the bank (built once, then cached)."""
  return list(_bank())


def get(name: str) -> BankProblem:
  """The bank problem called ``name``."""
  for entry in _bank():
    if entry.name == name:
      return entry
  raise KeyError(f"No bank problem {name!r}; the bank holds "
                 f"{[entry.name for entry in _bank()]}.")
