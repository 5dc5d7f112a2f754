"""BOME's two lower variables: ``y`` (lower problem alone), ``y_penalized``.

``state.y`` is one lower step per outer step on ``g(x_k, .)``, warm-started
and never fed with the upper data; ``state.y_penalized`` is the paper's
joint variable, moved along ``grad f + lambda grad q``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import problems
from tests.conformance.y_meaning import (flat_lower_problem,
                                         shifted_validation_labels)


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def _quadratic():
  return problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                            condition_number=10.0)


def test_oracle_calls_count_the_lower_iterate():
  solver = bilevel.solvers.bome(_quadratic().problem, num_lower_steps=10)
  # The paper's 1 Gf + (T + 2) Gg, and one Gg for y.
  assert solver.oracle_calls == bilevel.OracleCalls(1, 13, 0, 0)


def test_one_step_of_y_is_a_projected_lower_step():
  instance = _quadratic()
  box = lambda y: jnp.clip(y, -0.05, 0.05)
  problem = dataclasses.replace(instance.problem, project_y=box)
  x, y = instance.x0 + 0.5, instance.y0 + 0.3
  solver = bilevel.solvers.bome(problem, lower_optimizer=0.5,
                                num_lower_steps=3)
  state = solver.init(x, y)
  np.testing.assert_array_equal(state.y, y)
  np.testing.assert_array_equal(state.y_penalized, y)
  state, info = solver.step(state)
  grad = jax.grad(problem.lower, 1)(x, y, None)
  np.testing.assert_allclose(state.y, box(y - 0.5 * grad), rtol=1e-12,
                             atol=1e-15)
  np.testing.assert_allclose(info.lower_grad_norm, jnp.linalg.norm(grad),
                             rtol=1e-12)
  # Both start at y0 and part after one step: y_penalized also moved along
  # grad_y f.
  assert float(jnp.max(jnp.abs(state.y - state.y_penalized))) > 1e-3
  # The second step starts from the first one's y (warm start), not from
  # y_penalized.
  x1, y1 = state.x, state.y
  state, _ = solver.step(state)
  grad = jax.grad(problem.lower, 1)(x1, y1, None)
  np.testing.assert_allclose(state.y, box(y1 - 0.5 * grad), rtol=1e-12,
                             atol=1e-15)


def test_y_never_sees_the_validation_labels():
  # Hyper-cleaning with x held at x0 (project_x onto {x0}): the validation
  # labels enter only through grad f, which moves y_penalized and x; with x
  # fixed, y must not depend on them at all.
  instance = problems.hyper_cleaning(jax.random.key(0), batch_size=64)
  x0 = instance.x0
  problem = dataclasses.replace(instance.problem, project_x=lambda x: x0)
  shifted = shifted_validation_labels(instance.data)
  solver = bilevel.solvers.bome(problem, step_size=0.5)
  runs = [bilevel.run(solver, x0, instance.y0, data, num_steps=200,
                      key=jax.random.key(1))
          for data in (instance.data, shifted)]
  for run in runs:
    np.testing.assert_array_equal(run.x, x0)
  for a, b in zip(jax.tree.leaves(runs[0].y), jax.tree.leaves(runs[1].y)):
    np.testing.assert_array_equal(a, b)
  # y trained: it is not y0.
  assert max(float(jnp.max(jnp.abs(leaf)))
             for leaf in jax.tree.leaves(runs[0].y)) > 0.1
  # y_penalized fitted the validation labels (measured: entries differ by
  # 0.84; test accuracy 0.93 with the true labels, 0.06 with the shifted
  # ones, 0.80 for y).
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(runs[0].y_penalized),
      jax.tree.leaves(runs[1].y_penalized)))
  assert difference > 0.1, difference
  accuracy = [float(instance.evaluate(run.x, run.y_penalized)[
      "test_accuracy"]) for run in runs]
  assert accuracy[0] > 0.85 and accuracy[1] < 0.3, accuracy
  assert 0.7 < float(instance.evaluate(x0, runs[0].y)["test_accuracy"]) < (
      accuracy[0])


def test_y_converges_to_the_lower_solution():
  instance = _quadratic()
  # With a decaying joint step x settles (at BOME's biased point, 0.44 from
  # x*), and y, one lower step per outer step, converges to y*(x).
  solver = bilevel.solvers.bome(
      instance.problem, step_size=optax.exponential_decay(0.1, 500, 0.1))
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=4000)
  y_star = instance.lower_solution(result.x)
  assert _relative(instance.y0 + 1.0, y_star) > 0.5
  # Measured: 9.1e-11 (y_penalized: 0.14, frozen by the decayed step).
  assert _relative(result.y, y_star) < 1e-9
  assert float(result.history.lower_grad_norm[-1]) < 1e-8
  # With the constant default step x keeps moving (by 0.4% a step), and y
  # lags one step behind y*(x): 1.5e-3, y_penalized 0.14.
  solver = bilevel.solvers.bome(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=2000)
  y_star = instance.lower_solution(result.x)
  assert _relative(result.y, y_star) < 3e-3
  assert _relative(result.y_penalized, y_star) > 0.1


def test_nonunique_lower_solutions():
  # g flat in y2 (tests/conformance/y_meaning.py): lower solutions
  # {y1 = x}, the optimistic one y2 = 1, x* = 0.
  x0, y0 = jnp.asarray(1.0), jnp.array([0.5, -0.5])
  solver = bilevel.solvers.bome(flat_lower_problem())
  result = bilevel.run(solver, x0, y0, num_steps=2000)
  assert abs(float(result.x)) < 1e-8
  # y_penalized reaches the optimistic solution ...
  np.testing.assert_allclose(result.y_penalized, [0.0, 1.0], atol=1e-8)
  # ... y is a lower minimiser that never moved along the flat direction.
  assert float(result.y[1]) == -0.5
  assert abs(float(result.y[0] - result.x)) < 1e-8
