r"""A random strongly convex quadratic bilevel problem, solved in closed form.

.. math::

   g(x, y) &= \tfrac12 y^\top A y + y^\top (B x + a + \xi) \\
   f(x, y) &= \tfrac12 (y - c)^\top P (y - c) + \tfrac{\mu_x}{2}\|x\|^2
              + \zeta^\top y

``A`` has eigenvalues log-spaced in :math:`[1/\kappa, 1]` (so the lower
level is 1-smooth and :math:`1/\kappa`-strongly convex), ``P`` in
:math:`[0.1, 1]`; :math:`B = -A M_0` with a Gaussian :math:`M_0` of norm
about 1, so that :math:`y^*(x) = M_0 x + m` and the hyper-objective is
:math:`(1 + \mu_x)`-smooth and :math:`\mu_x`-strongly convex whatever
:math:`\kappa`. :math:`\xi` and :math:`\zeta` are per-sample noise vectors,
centred so that their mean over the dataset is exactly zero: minibatches give
unbiased gradients and the full-data problem is the noiseless one. Without
samples (``num_samples=None``) the noise is zero and the problem is
deterministic.

Closed forms, with :math:`M = -A^{-1}B` and :math:`m = -A^{-1}a`:
:math:`y^*(x) = Mx + m`,
:math:`\nabla\Phi(x) = M^\top P (Mx + m - c) + \mu_x x`,
:math:`x^* = -(M^\top P M + \mu_x I)^{-1} M^\top P (m - c)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import bilevel
from problems._base import Instance


def _spd(key, dim, low, high):
  basis, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
  eigenvalues = jnp.logspace(jnp.log10(low), jnp.log10(high), dim)
  return (basis * eigenvalues) @ basis.T


def quadratic(key: jax.Array, *, dim_x: int = 10, dim_y: int = 8,
              condition_number: float = 10.0, upper_regularization: float =
              0.1, num_samples: int | None = None, noise_scale: float = 0.1,
              batch_size: int | None = None) -> Instance:
  """Builds the quadratic instance.

  Args:
    key: PRNG key for the matrices and the noise.
    dim_x: dimension of ``x``.
    dim_y: dimension of ``y``.
    condition_number: :math:`\\kappa` of ``A``.
    upper_regularization: :math:`\\mu_x`.
    num_samples: number of noise samples per level (``None``: deterministic).
    noise_scale: standard deviation of the noise.
    batch_size: minibatch size for both levels (``None``: full batch).

  Returns:
    An :class:`problems.Instance` with ``lower_solution``, ``hypergradient``,
    ``value`` and ``x_star`` in closed form.
  """
  if condition_number < 1:
    raise ValueError(f"condition_number must be >= 1; got {condition_number}.")
  keys = jax.random.split(key, 8)
  dtype = jnp.zeros(()).dtype  # float64 under jax_enable_x64
  a_matrix = _spd(keys[0], dim_y, 1.0 / condition_number, 1.0)
  # B = -A M0 makes y*(x) = M0 x + m: the hyper-objective's conditioning does
  # not depend on the lower level's. ||M0|| is about 1.
  m0_matrix = jax.random.normal(keys[1], (dim_y, dim_x)) / (
      jnp.sqrt(dim_x) + jnp.sqrt(dim_y))
  b_matrix = -a_matrix @ m0_matrix
  a_vector = jax.random.normal(keys[2], (dim_y,))
  p_matrix = _spd(keys[3], dim_y, 0.1, 1.0)
  c_vector = jax.random.normal(keys[4], (dim_y,))
  mu_x = upper_regularization

  def lower(x, y, batch):
    shift = 0.0 if batch is None else jnp.mean(batch["lower_noise"], axis=0)
    return 0.5 * y @ a_matrix @ y + y @ (b_matrix @ x + a_vector + shift)

  def upper(x, y, batch):
    shift = 0.0 if batch is None else jnp.mean(batch["upper_noise"], axis=0)
    residual = y - c_vector
    return (0.5 * residual @ p_matrix @ residual + 0.5 * mu_x * x @ x
            + jnp.sum(y * shift))

  m_matrix = -jnp.linalg.solve(a_matrix, b_matrix)
  m_vector = -jnp.linalg.solve(a_matrix, a_vector)

  def lower_solution(x):
    return m_matrix @ x + m_vector

  def hypergradient(x):
    return m_matrix.T @ p_matrix @ (lower_solution(x) - c_vector) + mu_x * x

  def value(x):
    return upper(x, lower_solution(x), None)

  x_star = -jnp.linalg.solve(m_matrix.T @ p_matrix @ m_matrix
                             + mu_x * jnp.eye(dim_x),
                             m_matrix.T @ p_matrix @ (m_vector - c_vector))
  data = None
  if num_samples is not None:
    def centred(k, dim):
      noise = noise_scale * jax.random.normal(k, (num_samples, dim))
      return noise - noise.mean(axis=0)
    data = bilevel.Data(
        upper={"upper_noise": centred(keys[5], dim_y)},
        lower={"lower_noise": centred(keys[6], dim_y)},
        upper_batch_size=batch_size, lower_batch_size=batch_size)
  x0 = jnp.zeros(dim_x, dtype)
  y0 = jnp.zeros(dim_y, dtype)
  return Instance("quadratic", bilevel.Problem(upper, lower), data, x0, y0,
                  lower_solution=lower_solution, hypergradient=hypergradient,
                  value=value, x_star=x_star)
