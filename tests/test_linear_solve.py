"""Linear solves against jnp.linalg.solve, on pytrees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import linear_solve


def _spd(key, dim, condition_number):
  q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
  return (q * jnp.logspace(0, -np.log10(condition_number), dim)) @ q.T


def _pytree_system(key, condition_number=50.0):
  matrix = _spd(key, 7, condition_number)
  b = {"a": jnp.arange(4.0) - 1.5, "b": jnp.array([[1.0, -2.0, 0.5]])}
  def to_flat(t):
    return jnp.concatenate([t["a"], t["b"].ravel()])
  def from_flat(f):
    return {"a": f[:4], "b": f[4:].reshape(1, 3)}
  def matvec(t):
    return from_flat(matrix @ to_flat(t))
  expected = from_flat(jnp.linalg.solve(matrix, to_flat(b)))
  return matvec, b, expected, matrix


class LinearSolveTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_cg_matches_dense_solve(self):
    matvec, b, expected, _ = _pytree_system(jax.random.key(0))
    solver = linear_solve.cg(tol=1e-13, maxiter=50)
    solution = self.variant(lambda b_: solver.solve(matvec, b_))(b)
    chex.assert_trees_all_close(solution, expected, rtol=1e-10, atol=1e-12)

  def test_cg_warm_start_from_solution_stays(self):
    matvec, b, expected, _ = _pytree_system(jax.random.key(1))
    solver = linear_solve.cg(tol=1e-12, maxiter=1)
    chex.assert_trees_all_close(solver.solve(matvec, b, expected), expected,
                                rtol=1e-10)

  def test_cg_maxiter_bounds_accuracy(self):
    matvec, b, expected, _ = _pytree_system(jax.random.key(2), 1e4)
    rough = linear_solve.cg(tol=0.0, maxiter=2).solve(matvec, b)
    error = jnp.linalg.norm(rough["a"] - expected["a"])
    assert error > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_neumann_matches_dense_solve(self):
    matvec, b, expected, _ = _pytree_system(jax.random.key(3), 10.0)
    solver = linear_solve.neumann(step_size=1.0, num_terms=400)
    solution = self.variant(lambda b_: solver.solve(matvec, b_))(b)
    chex.assert_trees_all_close(solution, expected, rtol=1e-10, atol=1e-12)

  def test_neumann_is_the_partial_sum(self):
    matrix = _spd(jax.random.key(4), 5, 5.0)
    b = jnp.arange(5.0)
    eta, terms = 0.7, 6
    expected = eta * sum(jnp.linalg.matrix_power(jnp.eye(5) - eta * matrix, j)
                         @ b for j in range(terms + 1))
    got = linear_solve.neumann_series(lambda v: matrix @ v, b,
                                      step_size=eta, num_terms=terms)
    np.testing.assert_allclose(got, expected, rtol=1e-12)

  def test_neumann_operands_one_per_term(self):
    matrices = jnp.stack([_spd(k, 4, 3.0)
                          for k in jax.random.split(jax.random.key(5), 3)])
    b = jnp.ones(4)
    eta = 0.5
    v = eta * b
    for m in matrices:
      v = v - eta * (m @ v - b)
    got = linear_solve.neumann_series(lambda u, m: m @ u, b, step_size=eta,
                                      num_terms=3, operands=matrices)
    np.testing.assert_allclose(got, v, rtol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(tol=-1.0), dict(maxiter=0),
                                    dict(maxiter=2.5)])
def test_cg_rejects_bad_options(kwargs):
  with pytest.raises((ValueError, TypeError)):
    linear_solve.cg(**kwargs)

@pytest.mark.parametrize("kwargs", [dict(step_size=0.0, num_terms=3),
                                    dict(step_size=-1.0, num_terms=3),
                                    dict(step_size=0.1, num_terms=0)])
def test_neumann_rejects_bad_options(kwargs):
  with pytest.raises(ValueError):
    linear_solve.neumann(**kwargs)
