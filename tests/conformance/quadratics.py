r"""Quadratic bilevel problems of a chosen lower condition number.

Written from the math alone (not from ``problems/``), for the conformance
bank and the tests of the solvers' defaults:

.. math::

   g(x, y) = \tfrac12 y^\top A y - y^\top (B x + b), \qquad
   f(x, y) = \tfrac12 \|C y - d\|^2 + \tfrac{r}{2} \|x\|^2,

with ``A`` symmetric, eigenvalues evenly spread over
:math:`[1/\kappa, 1]` (the lower level is 1-smooth and
:math:`1/\kappa`-strongly convex). Then :math:`y^*(x) = A^{-1}(Bx + b)`,
:math:`\Phi(x) = \tfrac12\|M x + m\|^2 + \tfrac r2\|x\|^2` with
:math:`M = C A^{-1} B`, :math:`m = C A^{-1} b - d`, and
:math:`x^* = -(M^\top M + r I)^{-1} M^\top m`. ``B`` is rescaled so that
:math:`\Phi` is exactly ``phi_smoothness``-smooth
(:math:`\lambda_{\max}(M^\top M) + r`).

With ``num_samples``, ``g`` and ``f`` are means over samples of
:math:`g - y^\top \xi_i` and :math:`f + \zeta_i^\top y`, with noise vectors
centred to mean exactly zero: the full-data problem is the one above, so
``x*`` is unchanged, and minibatch gradients are unbiased.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

import bilevel


class Quadratic(NamedTuple):
  """A quadratic bilevel problem and its closed forms (NumPy, float64)."""
  problem: bilevel.Problem
  data: bilevel.Data | None
  x0: np.ndarray
  y0: np.ndarray
  x_star: np.ndarray
  y_star: np.ndarray        # y*(x*)
  A: np.ndarray
  B: np.ndarray
  b: np.ndarray
  C: np.ndarray
  d: np.ndarray
  r: float

  def lower_solution(self, x):
    return np.linalg.solve(self.A, self.B @ np.asarray(x) + self.b)

  def hypergradient(self, x):
    M = self.C @ np.linalg.solve(self.A, self.B)
    m = self.C @ np.linalg.solve(self.A, self.b) - self.d
    return M.T @ (M @ np.asarray(x) + m) + self.r * np.asarray(x)


def objectives(A, B, b, C, d, r):
  """``(f, g)`` of the deterministic problem for given (possibly traced or
  single-precision) constants: one place for the formulas above."""
  def lower(x, y, batch):
    del batch
    return 0.5 * y @ A @ y - y @ (B @ x + b)

  def upper(x, y, batch):
    del batch
    return 0.5 * jnp.sum((C @ y - d) ** 2) + 0.5 * r * x @ x

  return upper, lower


def quadratic(condition_number: float, *, dim_x: int = 50, dim_y: int = 40,
              phi_smoothness: float = 0.9, r: float = 0.1,
              num_samples: int | None = None, batch_size: int | None = None,
              noise: float = 0.3, seed: int = 0) -> Quadratic:
  """The quadratic bilevel problem above (see the module docstring)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.standard_normal((dim_y, dim_y)))
  eigenvalues = np.linspace(1.0 / condition_number, 1.0, dim_y)
  A = (basis * eigenvalues) @ basis.T
  A = 0.5 * (A + A.T)
  B = rng.standard_normal((dim_y, dim_x)) / np.sqrt(dim_x)
  b = rng.standard_normal(dim_y)
  C = rng.standard_normal((dim_y, dim_y)) / np.sqrt(dim_y)
  d = rng.standard_normal(dim_y)
  M = C @ np.linalg.solve(A, B)
  top = np.linalg.eigvalsh(M.T @ M)[-1]
  scale = np.sqrt((phi_smoothness - r) / top)
  B = B * scale
  M = M * scale
  m = C @ np.linalg.solve(A, b) - d
  x_star = -np.linalg.solve(M.T @ M + r * np.eye(dim_x), M.T @ m)
  y_star = np.linalg.solve(A, B @ x_star + b)

  A_, B_, b_, C_, d_ = (jnp.asarray(a) for a in (A, B, b, C, d))

  if num_samples is None:
    upper, lower = objectives(A_, B_, b_, C_, d_, r)
    data = None
  else:
    xi = noise * rng.standard_normal((num_samples, dim_y))
    zeta = noise * rng.standard_normal((num_samples, dim_y))
    xi -= xi.mean(axis=0)
    zeta -= zeta.mean(axis=0)

    def lower(x, y, batch):
      return (0.5 * y @ A_ @ y - y @ (B_ @ x + b_)
              - jnp.mean(batch @ y))

    def upper(x, y, batch):
      return (0.5 * jnp.sum((C_ @ y - d_) ** 2) + 0.5 * r * x @ x
              + jnp.mean(batch @ y))
    data = bilevel.Data(upper=jnp.asarray(zeta), lower=jnp.asarray(xi),
                        upper_batch_size=batch_size,
                        lower_batch_size=batch_size)
  problem = bilevel.Problem(upper, lower)
  return Quadratic(problem, data, np.zeros(dim_x), np.zeros(dim_y), x_star,
                   y_star, A, B, b, C, d, r)
