r"""Problems for first-order (penalty) methods, with known solutions.

* :func:`underdetermined_least_squares`: a lower level with a whole affine
  set of minimisers (an overparameterized least-squares fit, which satisfies
  the proximal error bound without being strongly convex); the optimistic
  hyper-objective has a closed form, and implicit differentiation is
  ill-posed (the lower Hessian is singular).
* :func:`box_constrained`: a lower level constrained to a box, whose
  solution sits on the boundary in some coordinates and inside in others.
* :func:`sphere_lower_level`: a nonconvex lower level (Polyak-Łojasiewicz
  near its solutions) whose minimisers form a sphere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from problems._base import Instance, numpy_seed


def underdetermined_least_squares(key: jax.Array | None = None, *,
                                  dim_x: int = 5, dim_y: int = 12,
                                  rho: float = 0.5) -> Instance:
  r"""A lower level with non-unique solutions and its optimistic solution.

  .. math::

     g(x, y) = \tfrac12 \|A y - x\|^2, \qquad
     f(x, y) = \tfrac12 \|y - B x - b\|^2 + \tfrac\rho2 \|x - c\|^2,

  with :math:`A \in \mathbb{R}^{d_x \times d_y}`, :math:`d_y > d_x`, of full
  row rank: every :math:`y` with :math:`A y = x` minimises ``g``, an affine
  set of dimension :math:`d_y - d_x`. The optimistic hyper-objective picks
  the one closest to :math:`B x + b`: with :math:`G = (A A^\top)^{-1}` and
  :math:`u(x) = x - A (B x + b)`,

  .. math::

     y^*(x) = B x + b + A^+ u(x), \qquad
     \psi(x) = \tfrac12 u^\top G u + \tfrac\rho2 \|x - c\|^2,

  minimised at the solution of :math:`(M^\top G M + \rho I) x^* = M^\top G A b
  + \rho c`, :math:`M = I - A B`. Because ``B`` moves the target with ``x``
  along the null space of ``A``, this differs from what a method that keeps
  ``y`` on one particular solution (e.g. the one reached by gradient descent
  from ``y0``, in the row space of ``A``) minimises. The lower Hessian
  :math:`A^\top A` is singular, so implicit differentiation (which inverts
  it) is ill-posed, while ``g`` satisfies the proximal error bound (a
  least-squares fit with a full-row-rank matrix), the setting of the
  penalty method.

  Args:
    key: PRNG key of ``A``, ``B``, ``b``, ``c``; ``None`` is
      ``jax.random.key(0)``.
    dim_x: :math:`d_x`.
    dim_y: :math:`d_y > d_x`.
    rho: :math:`\rho > 0`.

  Returns:
    An :class:`Instance` with ``x0 = 0``, ``y0 = 0``, ``lower_solution``
    the optimistic selection :math:`y^*(x)`, ``value`` :math:`\psi`,
    ``hypergradient`` :math:`\nabla\psi` and ``x_star``.
  """
  if not dim_y > dim_x >= 1:
    raise ValueError(f"need dim_y > dim_x >= 1 (a non-unique lower "
                     f"solution); got dim_x={dim_x}, dim_y={dim_y}.")
  if not rho > 0:
    raise ValueError(f"rho must be positive; got {rho}.")
  key = jax.random.key(0) if key is None else key
  rng = np.random.default_rng(numpy_seed(key))
  dtype = jnp.zeros(()).dtype
  a = rng.standard_normal((dim_x, dim_y)) / np.sqrt(dim_y)
  coupling = rng.standard_normal((dim_y, dim_x)) / np.sqrt(dim_x)
  b = rng.standard_normal(dim_y)
  c = rng.standard_normal(dim_x)
  gram_inv = np.linalg.inv(a @ a.T)
  pinv = a.T @ gram_inv
  m = np.eye(dim_x) - a @ coupling
  x_star = np.linalg.solve(m.T @ gram_inv @ m + rho * np.eye(dim_x),
                           m.T @ gram_inv @ a @ b + rho * c)
  a_, bx_, b_, c_, pinv_, gram_inv_, m_ = (
      jnp.asarray(v, dtype) for v in (a, coupling, b, c, pinv, gram_inv, m))

  def lower(x, y, batch=None):
    del batch
    return 0.5 * jnp.sum((a_ @ y - x) ** 2)

  def upper(x, y, batch=None):
    del batch
    return (0.5 * jnp.sum((y - bx_ @ x - b_) ** 2)
            + 0.5 * rho * jnp.sum((x - c_) ** 2))

  def residual(x):
    return x - a_ @ (bx_ @ x + b_)

  def lower_solution(x):
    return bx_ @ x + b_ + pinv_ @ residual(x)

  def value(x):
    u = residual(x)
    return 0.5 * u @ gram_inv_ @ u + 0.5 * rho * jnp.sum((x - c_) ** 2)

  def hypergradient(x):
    return m_.T @ gram_inv_ @ residual(x) + rho * (x - c_)

  return Instance(
      "underdetermined_least_squares", bilevel.Problem(upper, lower), None,
      jnp.zeros(dim_x, dtype), jnp.zeros(dim_y, dtype),
      lower_solution=lower_solution, hypergradient=hypergradient,
      value=value, x_star=jnp.asarray(x_star, dtype))


def box_constrained(key: jax.Array | None = None, *, dim: int = 10,
                    rho: float = 0.5, low: float = 0.0,
                    high: float = 1.0) -> Instance:
  r"""A lower level constrained to a box, solution on its boundary.

  .. math::

     g(x, y) = \tfrac12 \|y - x\|^2, \quad y \in Y = [l, u]^d, \qquad
     f(x, y) = \tfrac12 \|y - a\|^2 + \tfrac\rho2 \|x\|^2,

  so :math:`y^*(x) = \mathrm{clip}(x, l, u)` and, coordinate by coordinate,
  :math:`\Phi(x) = \sum_i \tfrac12 (\mathrm{clip}(x_i) - a_i)^2 +
  \tfrac\rho2 x_i^2` is minimised at :math:`x^* = \mathrm{clip}(a / (1 +
  \rho), l, u)` (outside the box the first term is constant and the second
  grows). ``a`` is drawn so that :math:`a / (1 + \rho)` falls below, inside
  and above the box: at the solution the constraint is active in some
  coordinates (where :math:`\Phi` has a kink) and inactive in others.
  ``Problem.project_y`` is the box projection (``optax.projections``).

  Args:
    key: PRNG key of ``a``; ``None`` is ``jax.random.key(0)``.
    dim: :math:`d`.
    rho: :math:`\rho > 0`.
    low: :math:`l`.
    high: :math:`u > l`.

  Returns:
    An :class:`Instance` with ``x0 = y0 = (l + u) / 2``, ``lower_solution``
    (the clip), ``value`` and ``x_star``.
  """
  if not rho > 0:
    raise ValueError(f"rho must be positive; got {rho}.")
  if not high > low:
    raise ValueError(f"need high > low; got low={low}, high={high}.")
  key = jax.random.key(0) if key is None else key
  rng = np.random.default_rng(numpy_seed(key))
  dtype = jnp.zeros(()).dtype
  width = high - low
  # a / (1 + rho) spread over [l - w/2, u + w/2]: a third below, a third
  # inside, a third above the box (in expectation).
  scaled = rng.uniform(low - 0.5 * width, high + 0.5 * width, dim)
  a = jnp.asarray(scaled * (1 + rho), dtype)

  def lower(x, y, batch=None):
    del batch
    return 0.5 * jnp.sum((y - x) ** 2)

  def upper(x, y, batch=None):
    del batch
    return 0.5 * jnp.sum((y - a) ** 2) + 0.5 * rho * jnp.sum(x ** 2)

  def project_y(y):
    return optax.projections.projection_box(y, low, high)

  def lower_solution(x):
    return jnp.clip(x, low, high)

  def value(x):
    return upper(x, lower_solution(x))

  start = jnp.full(dim, 0.5 * (low + high), dtype)
  return Instance(
      "box_constrained", bilevel.Problem(upper, lower, project_y=project_y),
      None, start, start, lower_solution=lower_solution, value=value,
      x_star=jnp.asarray(np.clip(scaled, low, high), dtype))


def sphere_lower_level(key: jax.Array | None = None, *, dim: int = 5,
                       rho: float = 1.0, x_min: float = 0.05) -> Instance:
  r"""A nonconvex lower level whose solutions form a sphere.

  .. math::

     g(x, y) = \tfrac14 \bigl(\|y\|^2 - x\bigr)^2, \qquad
     f(x, y) = \tfrac12 \|y - b\|^2 + \tfrac\rho2 (x - c)^2,

  with a scalar :math:`x \ge x_{\min} > 0` (``Problem.project_x``). For
  :math:`x > 0` the lower solutions are the sphere :math:`\|y\|^2 = x`:
  ``g`` is nonconvex, but :math:`\|\nabla_y g\|^2 = 4 g \|y\|^2`, so it
  satisfies the Polyak-Łojasiewicz inequality (hence the proximal error
  bound) near the sphere; :math:`y = 0` is a spurious stationary point, so
  ``y0`` is not zero. The optimistic lower solution is the point of the
  sphere closest to ``b``, :math:`y^*(x) = \sqrt{x}\, b / \|b\|`, and

  .. math::

     \psi(x) = \tfrac12 \bigl(\sqrt{x} - \|b\|\bigr)^2
               + \tfrac\rho2 (x - c)^2

  is convex (:math:`-\sqrt{x}` is convex); its minimiser :math:`x^*` is
  computed by bisection on :math:`\psi'`. Gradient descent on ``g`` from
  ``y0`` keeps the direction of ``y0`` (:math:`\nabla_y g \propto y`), so a
  method that follows it lands on another point of the sphere and
  minimises another hyper-objective.

  Args:
    key: PRNG key of ``b``, ``c`` and ``y0``; ``None`` is
      ``jax.random.key(0)``.
    dim: dimension of ``y``.
    rho: :math:`\rho > 0`.
    x_min: lower bound on ``x``, :math:`> 0`.

  Returns:
    An :class:`Instance` with ``x`` of shape ``(1,)``, ``x0 = 1``, ``y0`` a
    random unit vector (not parallel to ``b``), ``lower_solution``,
    ``value`` :math:`\psi`, ``hypergradient`` and ``x_star``.
  """
  if not rho > 0:
    raise ValueError(f"rho must be positive; got {rho}.")
  if not x_min > 0:
    raise ValueError(f"x_min must be positive; got {x_min}.")
  if dim < 2:
    raise ValueError(f"dim must be at least 2; got {dim}.")
  key = jax.random.key(0) if key is None else key
  rng = np.random.default_rng(numpy_seed(key))
  dtype = jnp.zeros(()).dtype
  b = rng.standard_normal(dim)
  b *= rng.uniform(1.0, 2.0) / np.linalg.norm(b)
  c = rng.uniform(1.0, 3.0)
  y0 = rng.standard_normal(dim)
  y0 /= np.linalg.norm(y0)
  beta = np.linalg.norm(b)

  def derivative(x):
    return (np.sqrt(x) - beta) / (2 * np.sqrt(x)) + rho * (x - c)

  low, high = x_min, max(c, beta ** 2) + 10.0
  if derivative(low) >= 0:
    x_star = low
  else:
    for _ in range(200):
      middle = 0.5 * (low + high)
      low, high = (middle, high) if derivative(middle) < 0 else (low, middle)
    x_star = 0.5 * (low + high)
  b_ = jnp.asarray(b, dtype)

  def lower(x, y, batch=None):
    del batch
    return 0.25 * (jnp.sum(y ** 2) - x[0]) ** 2

  def upper(x, y, batch=None):
    del batch
    return 0.5 * jnp.sum((y - b_) ** 2) + 0.5 * rho * (x[0] - c) ** 2

  def project_x(x):
    return jnp.maximum(x, x_min)

  def lower_solution(x):
    return jnp.sqrt(x[0]) * b_ / jnp.linalg.norm(b_)

  def value(x):
    return (0.5 * (jnp.sqrt(x[0]) - jnp.linalg.norm(b_)) ** 2
            + 0.5 * rho * (x[0] - c) ** 2)

  return Instance(
      "sphere_lower_level",
      bilevel.Problem(upper, lower, project_x=project_x), None,
      jnp.ones(1, dtype), jnp.asarray(y0, dtype),
      lower_solution=lower_solution, hypergradient=jax.grad(value),
      value=value, x_star=jnp.asarray([x_star], dtype))
