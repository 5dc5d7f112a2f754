"""Bad input gives a clear error at construction or init, never deep in JAX."""

import jax
import jax.numpy as jnp
import pytest

import bilevel


def _lower(x, y, batch):
  return 0.5 * jnp.sum(y ** 2) - jnp.sum(x * y)


def _upper(x, y, batch):
  return jnp.sum((y - 1.0) ** 2)


X = jnp.zeros(3)
Y = jnp.zeros(3)
SOLVERS = ["aid", "itd", "stocbio", "soba", "amigo"]


def _init(problem, x=X, y=Y, data=None, name="aid"):
  return getattr(bilevel.solvers, name)(problem).init(
      x, y, key=jax.random.key(0), data=data)


@pytest.mark.parametrize("name", SOLVERS)
def test_valid_problem_initialises(name):
  state = _init(bilevel.Problem(_upper, _lower), name=name)
  assert state.x.shape == (3,)


@pytest.mark.parametrize("name", SOLVERS)
def test_non_scalar_upper_names_the_objective(name):
  problem = bilevel.Problem(lambda x, y, b: (y - 1.0) ** 2, _lower)
  with pytest.raises(ValueError, match=r"upper objective f.*scalar.*\[3\]"):
    _init(problem, name=name)


def test_non_scalar_lower_names_the_objective():
  problem = bilevel.Problem(_upper, lambda x, y, b: y * x)
  with pytest.raises(ValueError, match="lower objective g.*scalar"):
    _init(problem)


def test_integer_objective_is_rejected():
  problem = bilevel.Problem(_upper,
                            lambda x, y, b: jnp.sum(y > 0).astype(jnp.int32))
  with pytest.raises(ValueError, match="lower objective g.*floating"):
    _init(problem)


def test_wrong_structure_of_y_names_the_objective():
  problem = bilevel.Problem(lambda x, y, b: jnp.sum(y["w"] ** 2),
                            lambda x, y, b: jnp.sum(y["w"] ** 2))
  with pytest.raises(TypeError, match=r"upper objective f\(x, y, batch\)"):
    _init(problem, y=jnp.zeros(3))


def test_wrong_shape_of_x_names_the_objective():
  problem = bilevel.Problem(_upper, _lower)
  with pytest.raises(TypeError, match="objective.*x of structure"):
    _init(problem, x=jnp.zeros(4))


def test_integer_variables_are_rejected():
  with pytest.raises(TypeError, match="floating-point"):
    _init(bilevel.Problem(_upper, _lower), x=jnp.arange(3))


def test_empty_variables_are_rejected():
  with pytest.raises(TypeError, match="empty"):
    _init(bilevel.Problem(_upper, _lower), y={})


def test_objectives_must_be_callable():
  with pytest.raises(TypeError, match="Problem.lower must be a callable"):
    bilevel.Problem(_upper, 3.0)


def test_projection_changing_shape_is_rejected():
  problem = bilevel.Problem(_upper, _lower, project_x=lambda x: x[:2])
  with pytest.raises(ValueError, match="project_x"):
    _init(problem)


def test_objective_that_fails_on_the_batch():
  problem = bilevel.Problem(_upper, lambda x, y, b: jnp.sum(y * b["w"]))
  data = bilevel.Data(lower={"v": jnp.ones((5, 3))}, lower_batch_size=2)
  with pytest.raises(TypeError, match="lower objective g.*batch"):
    _init(problem, data=data)


def test_step_with_other_data_than_init():
  problem = bilevel.Problem(_upper, lambda x, y, b: _lower(x, y, b) + 0.0)
  data = bilevel.Data(lower={"v": jnp.ones((5, 3))}, lower_batch_size=2)
  solver = bilevel.solvers.soba(problem)
  state = solver.init(X, Y, key=jax.random.key(0), data=data)
  with pytest.raises(ValueError, match="same bilevel.Data"):
    solver.step(state, None)


def test_data_of_wrong_type():
  with pytest.raises(TypeError, match="bilevel.Data"):
    _init(bilevel.Problem(_upper, _lower), data={"lower": jnp.ones((4, 3))})


def test_run_rejects_bad_arguments():
  solver = bilevel.solvers.aid(bilevel.Problem(_upper, _lower))
  with pytest.raises(ValueError, match="num_steps"):
    bilevel.run(solver, X, Y, num_steps=0)
  with pytest.raises(TypeError, match="num_steps"):
    bilevel.run(solver, X, Y, num_steps=3.0)
  with pytest.raises(TypeError, match="BilevelSolver"):
    bilevel.run(solver.step, X, Y, num_steps=3)


def test_traced_step_sizes_are_not_checked_eagerly():
  problem = bilevel.Problem(_upper, _lower)

  def final(step_size):
    solver = bilevel.solvers.aid(problem, upper_optimizer=step_size)
    return bilevel.run(solver, X, Y, num_steps=3).x

  assert jax.jit(final)(0.5).shape == (3,)
