"""Derivatives against materialised Hessians, on pytree variables."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import bilevel
from bilevel import derivatives


def _problem():
  def lower(x, y, batch):
    scale = 1.0 if batch is None else batch["scale"].mean()
    w, b = y["w"], y["b"]
    return (scale * jnp.sum(jnp.cosh(w * x["a"])) + jnp.sum(b ** 2) * x["c"]
            + jnp.sum(w) * jnp.sum(b) * x["c"] ** 2 + 0.3 * jnp.sum(w ** 4))

  def upper(x, y, batch):
    return jnp.sum(jnp.sin(y["w"])) + jnp.sum(y["b"] * x["a"][:2]) + x["c"]

  return bilevel.Problem(upper, lower)


def _point(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x = {"a": jax.random.normal(k1, (3,)), "c": jnp.asarray(1.3)}
  y = {"w": jax.random.normal(k2, (3,)), "b": jax.random.normal(k3, (2,))}
  v = {"w": jax.random.normal(k4, (3,)), "b": jnp.array([0.5, -1.0])}
  return x, y, v


def _dense(problem, x, y, batch):
  flat_x, unravel_x = ravel_pytree(x)
  flat_y, unravel_y = ravel_pytree(y)
  def flat(fx, fy):
    return problem.lower(unravel_x(fx), unravel_y(fy), batch)
  hess_yy = jax.hessian(flat, 1)(flat_x, flat_y)
  hess_xy = jax.jacfwd(jax.grad(flat, 1), 0)(flat_x, flat_y)  # (dy, dx)
  return hess_yy, hess_xy, unravel_x, unravel_y


class DerivativesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hvp_and_cross_match_dense(self):
    problem = _problem()
    x, y, v = _point(jax.random.key(0))
    batch = {"scale": jnp.array([0.5, 1.5, 2.0])}
    hess_yy, hess_xy, unravel_x, unravel_y = _dense(problem, x, y, batch)
    flat_v = ravel_pytree(v)[0]
    expected_hvp = unravel_y(hess_yy @ flat_v)
    expected_cross = unravel_x(hess_xy.T @ flat_v)

    hvp = self.variant(lambda *a: derivatives.lower_hvp(problem, *a))(
        x, y, v, batch)
    cross = self.variant(lambda *a: derivatives.lower_cross(problem, *a))(
        x, y, v, batch)
    grad_y, hvp2, cross2 = self.variant(
        lambda *a: derivatives.lower_hvp_and_cross(problem, *a))(
            x, y, v, batch)
    chex.assert_trees_all_close(hvp, expected_hvp, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(hvp2, expected_hvp, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(cross, expected_cross, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(cross2, expected_cross, rtol=1e-12,
                                atol=1e-12)
    chex.assert_trees_all_close(
        grad_y, jax.grad(problem.lower, 1)(x, y, batch), rtol=1e-14)

  def test_upper_grads(self):
    problem = _problem()
    x, y, _ = _point(jax.random.key(1))
    value, gx, gy = derivatives.upper_value_and_grads(problem, x, y)
    np.testing.assert_allclose(value, problem.upper(x, y, None))
    chex.assert_trees_all_close(gx, jax.grad(problem.upper, 0)(x, y, None))
    chex.assert_trees_all_close(gy, jax.grad(problem.upper, 1)(x, y, None))

  def test_pullback_reused(self):
    problem = _problem()
    x, y, v = _point(jax.random.key(2))
    hess_yy, hess_xy, _, unravel_y = _dense(problem, x, y, None)
    _, pullback = derivatives.lower_vjp(problem, x, y)
    for scale in (1.0, -2.0):
      v_scaled = jax.tree.map(lambda a, s=scale: s * a, v)
      _, hvp = pullback(v_scaled)
      chex.assert_trees_all_close(
          hvp, unravel_y(hess_yy @ ravel_pytree(v_scaled)[0]), rtol=1e-12)
