"""Hypergradients against closed forms and finite differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import problems


def _relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def ill_conditioned():
  """Condition number 100, dim_x = 50, dim_y = 40 (the issue's setting)."""
  instance = problems.quadratic(jax.random.key(0), dim_x=50, dim_y=40,
                                condition_number=100.0)
  x = jax.random.normal(jax.random.key(1), (50,))
  return instance, x, instance.lower_solution(x), instance.hypergradient(x)


def test_closed_form_matches_autodiff_of_value(ill_conditioned):
  instance, x, _, exact = ill_conditioned
  assert _relative_error(jax.grad(instance.value)(x), exact) < 1e-12


def test_aid_cg_matches_closed_form(ill_conditioned):
  instance, x, y, exact = ill_conditioned
  solver = bilevel.linear_solve.cg(tol=1e-14, maxiter=200)
  estimate = jax.jit(lambda x_, y_: bilevel.implicit_hypergradient(
      instance.problem, x_, y_, linear_solver=solver))(x, y)
  assert _relative_error(estimate, exact) <= 1e-8


def test_aid_neumann_matches_closed_form(ill_conditioned):
  instance, x, y, exact = ill_conditioned
  # (1 - eta mu)^K with eta = 1, mu = 1e-2: K = 3000 gives 1e-13.
  solver = bilevel.linear_solve.neumann(step_size=1.0, num_terms=3000)
  estimate = bilevel.implicit_hypergradient(instance.problem, x, y,
                                            linear_solver=solver)
  assert _relative_error(estimate, exact) <= 1e-8


def test_itd_matches_closed_form(ill_conditioned):
  instance, x, y, exact = ill_conditioned
  # Gradient descent with step 2 / (L + mu) contracts by (k - 1) / (k + 1).
  estimate = bilevel.unrolled_hypergradient(
      instance.problem, x, y, lower_optimizer=2.0 / 1.01, num_steps=1500)
  assert _relative_error(estimate, exact) <= 1e-8


def test_aid_info_reports_residual(ill_conditioned):
  instance, x, y, _ = ill_conditioned
  rough = bilevel.linear_solve.cg(tol=0.0, maxiter=3)
  _, info = bilevel.implicit_hypergradient_and_info(
      instance.problem, x, y, linear_solver=rough)
  exact_v = jnp.linalg.solve(
      jax.hessian(instance.problem.lower, 1)(x, y, None),
      jax.grad(instance.problem.upper, 1)(x, y, None))
  a = jax.hessian(instance.problem.lower, 1)(x, y, None)
  grad_y_f = jax.grad(instance.problem.upper, 1)(x, y, None)
  np.testing.assert_allclose(info.linear_residual_norm,
                             jnp.linalg.norm(a @ info.v - grad_y_f),
                             rtol=1e-10)
  assert info.linear_residual_norm > 1e-6  # three iterations are not enough
  assert float(jnp.linalg.norm(info.v - exact_v)) > 0
  np.testing.assert_allclose(info.lower_grad_norm, 0.0, atol=1e-10)


def _nonquadratic():
  """A pytree problem with a logistic lower level: no closed form."""
  key = jax.random.key(3)
  k1, k2, k3 = jax.random.split(key, 3)
  features = jax.random.normal(k1, (40, 3))
  labels = jnp.sign(jax.random.normal(k2, (40,)))
  target = jax.random.normal(k3, (3,))

  def lower(x, y, batch):
    logits = features @ y["w"] + y["b"]
    return (jnp.mean(jax.nn.softplus(-labels * logits))
            + 0.5 * jnp.sum(jnp.exp(x["log_reg"]) * y["w"] ** 2)
            + 0.5 * x["shift"] * y["b"] ** 2 + 0.1 * y["b"] ** 2)

  def upper(x, y, batch):
    return (jnp.sum((y["w"] - target) ** 2) + jnp.sin(y["b"])
            + 0.1 * jnp.sum(x["log_reg"] ** 2))

  problem = bilevel.Problem(upper, lower)
  x = {"log_reg": jnp.array([-1.0, 0.0, 0.5]), "shift": jnp.asarray(0.3)}
  y0 = {"w": jnp.zeros(3), "b": jnp.asarray(0.0)}
  lower_solution = problems._base.newton_lower_solution(problem, None, y0)
  return problem, x, lower_solution


def test_aid_matches_finite_differences_on_pytrees():
  problem, x, lower_solution = _nonquadratic()
  y = lower_solution(x)
  estimate = bilevel.implicit_hypergradient(problem, x, y)
  value = lambda x_: problem.upper(x_, lower_solution(x_), None)
  eps = 1e-6
  for leaf_name, index in [("log_reg", 0), ("log_reg", 2), ("shift", None)]:
    def bump(sign):
      x_ = dict(x)
      leaf = x[leaf_name]
      x_[leaf_name] = (leaf + sign * eps if index is None
                       else leaf.at[index].add(sign * eps))
      return value(x_)
    fd = (bump(1) - bump(-1)) / (2 * eps)
    got = estimate[leaf_name] if index is None else estimate[leaf_name][index]
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)


def test_itd_converges_to_aid_on_pytrees():
  problem, x, lower_solution = _nonquadratic()
  y = lower_solution(x)
  aid = bilevel.implicit_hypergradient(problem, x, y)
  itd = bilevel.unrolled_hypergradient(problem, x, y, lower_optimizer=1.0,
                                       num_steps=800)
  chex.assert_trees_all_close(itd, aid, rtol=1e-7, atol=1e-10)


def test_unrolled_uses_one_batch_per_step():
  instance = problems.quadratic(jax.random.key(4), dim_x=3, dim_y=2,
                                num_samples=8)
  batches = {"lower_noise": jnp.stack(
      [instance.data.lower["lower_noise"][i:i + 2] for i in range(5)])}
  x, y = instance.x0 + 1.0, instance.y0
  got = bilevel.unrolled_hypergradient(
      instance.problem, x, y, None, lower_optimizer=0.3, num_steps=5,
      lower_batches=batches)

  def manual(x_):
    y_ = y
    for k in range(5):
      batch = jax.tree.map(lambda a, k=k: a[k], batches)
      y_ = y_ - 0.3 * jax.grad(instance.problem.lower, 1)(x_, y_, batch)
    return instance.problem.upper(x_, y_, None)

  np.testing.assert_allclose(got, jax.grad(manual)(x), rtol=1e-12)


def test_aid_matches_jaxopt_implicit_diff_on_logistic():
  """Cross-check against jaxopt's custom_root on the logistic problem."""
  import warnings  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt  # pylint: disable=import-outside-toplevel
  from problems.logistic import logistic_regularization  # pylint: disable=import-outside-toplevel

  instance = logistic_regularization(jax.random.key(0),
                                     dataset="breast_cancer")
  problem = instance.problem
  upper_batch, lower_batch = instance.data.upper, instance.data.lower
  x = instance.x0 + jnp.linspace(-1.0, 1.0, instance.x0.shape[0])
  y = instance.lower_solution(x)

  def optimality(y_, x_):
    return jax.grad(problem.lower, 1)(x_, y_, lower_batch)

  @jaxopt.implicit_diff.custom_root(
      optimality, solve=functools.partial(jaxopt.linear_solve.solve_cg,
                                          tol=1e-14, maxiter=500))
  def inner(y_init, x_):
    del y_init
    return jax.lax.stop_gradient(instance.lower_solution(x_))

  reference = jax.grad(
      lambda x_: problem.upper(x_, inner(y, x_), upper_batch))(x)
  ours = bilevel.implicit_hypergradient(
      problem, x, y, upper_batch, lower_batch,
      linear_solver=bilevel.linear_solve.cg(tol=1e-14, maxiter=500))
  assert _relative_error(ours, reference) <= 1e-8
  assert _relative_error(ours, instance.hypergradient(x)) <= 1e-8
