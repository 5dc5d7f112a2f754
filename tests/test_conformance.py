"""Conformance: every registered solver on every problem of the bank.

The library's promise (``bilevel.solvers._registry``): on a problem of a
class it *handles*, a solver with its defaults reaches the known ``x*``
within the registry's tolerance; a problem of a class it *refuses* fails
when the solver is built (factory call or ``init``) with ``ValueError`` or
``TypeError`` and a message that says what to use instead. The bank
(``tests/conformance/bank.py``) holds one problem with a closed-form
solution per class; its closed forms are checked here first.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import bilevel
from bilevel.solvers import _registry
from tests.conformance import bank as bank_lib
from tests.conformance import measure

BANK = bank_lib.bank()
REGISTRY = measure.registry()
PAIRS = [(solver, entry.name) for solver in REGISTRY for entry in BANK]


# ---------------------------------------------------------------------------
# The bank itself.


def test_bank_covers_every_class():
  classes = [entry.problem_class for entry in BANK]
  assert set(classes) == set(_registry.PROBLEM_CLASSES)
  assert len({entry.name for entry in BANK}) == len(BANK)


def _ravel(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree))[0])


def _unraveler(entry):
  like = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), entry.x_star)
  unravel = jax.flatten_util.ravel_pytree(like)[1]
  return lambda v: jax.tree.map(np.asarray, unravel(jnp.asarray(v)))


def _compiled_value(entry):
  r"""``x -> Phi(x)`` as a float64 NumPy function of the flat ``x``:
  the problem's own ``f`` at the closed-form ``y*(x)``, jitted."""
  unravel = _unraveler(entry)
  batch = None if entry.data is None else entry.data.upper
  upper = jax.jit(lambda x, y: entry.problem.upper(x, y, batch))
  to_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     tree)

  def value(flat_x):
    x = unravel(flat_x)
    return float(upper(to_jax(x), to_jax(entry.lower_solution(x))))
  return value


def _tolerance(entry):
  """Closed forms of the float32 problem hold to float32 rounding only."""
  return 1e-4 if entry.problem_class == "float32" else 1e-8


@pytest.mark.parametrize("entry", BANK, ids=lambda entry: entry.name)
def test_bank_hypergradient_vanishes_at_x_star(entry):
  gradient = _ravel(entry.hypergradient(entry.x_star))
  assert np.linalg.norm(gradient) <= 1e-10 * max(
      1.0, np.linalg.norm(_ravel(entry.x_star)))


@pytest.mark.parametrize("entry", BANK, ids=lambda entry: entry.name)
def test_bank_hypergradient_matches_finite_differences(entry):
  """Central differences of Phi = f(x, y*(x)) along random directions."""
  value = _compiled_value(entry)
  unravel = _unraveler(entry)
  x_star = _ravel(entry.x_star)
  rng = np.random.default_rng(0)
  step = 1e-5
  tolerance = 1e-3 if entry.problem_class == "float32" else 1e-6
  for _ in range(3):
    x = x_star + rng.standard_normal(x_star.size)
    gradient = _ravel(entry.hypergradient(unravel(x)))
    direction = rng.standard_normal(x_star.size)
    direction /= np.linalg.norm(direction)
    estimate = (value(x + step * direction)
                - value(x - step * direction)) / (2 * step)
    assert abs(estimate - gradient @ direction) <= tolerance * max(
        1.0, np.linalg.norm(gradient)), (x, estimate, gradient @ direction)


def _lower_grad(entry, x, y):
  batch = None if entry.data is None else entry.data.lower
  to_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     tree)
  gradient = jax.grad(entry.problem.lower, argnums=1)(to_jax(x), to_jax(y),
                                                      batch)
  return _ravel(gradient)


def _upper_grad_y(entry, x, y):
  batch = None if entry.data is None else entry.data.upper
  to_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     tree)
  return _ravel(jax.grad(entry.problem.upper, argnums=1)(
      to_jax(x), to_jax(y), batch))


@pytest.mark.parametrize("entry", BANK, ids=lambda entry: entry.name)
def test_bank_lower_solution_is_optimal(entry):
  r"""First-order conditions of the lower problem at the closed-form y*.

  For a convex ``g`` on a convex ``Y``, ``y`` is a minimiser exactly when
  it is a fixed point of a projected gradient step,
  :math:`y = \Pi_Y(y - \nabla_y g)`. Where the minimisers form a set, the
  optimistic one also makes :math:`\nabla_y f` orthogonal to the set.
  """
  rng = np.random.default_rng(1)
  x_star = _ravel(entry.x_star)
  unravel = _unraveler(entry)
  tolerance = _tolerance(entry)
  for x in (x_star, x_star + rng.standard_normal(x_star.size)):
    x = unravel(x)
    y = entry.lower_solution(x)
    flat_y = _ravel(y)
    gradient = _lower_grad(entry, x, y)
    if entry.problem_class == "coupled":
      # KKT of the equality 1'x + 1'y = 0: the gradient is a multiple of 1.
      n = flat_y.size // 2
      assert abs(x.sum() + flat_y.sum()) <= tolerance
      np.testing.assert_allclose(gradient, gradient.mean(), atol=tolerance)
      # Optimistic: grad_y2 f is normal to the hyperplane of y2's.
      upper = _upper_grad_y(entry, x, y)[n:]
      np.testing.assert_allclose(upper, upper.mean(), atol=tolerance)
      continue
    unflatten = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), y))[1]
    stepped = _ravel(entry.problem.projected_y(
        unflatten(jnp.asarray(flat_y - 0.5 * gradient))))
    scale = max(1.0, np.linalg.norm(flat_y))
    assert np.linalg.norm(stepped - flat_y) <= tolerance * scale
    if entry.problem_class == "nonunique":
      # The minimisers are y* + null(A); grad_y f must be orthogonal to it.
      wide = np.asarray(bank_lib._WIDE)  # pylint: disable=protected-access
      null_space = np.linalg.svd(wide)[2][wide.shape[0]:]
      upper = _upper_grad_y(entry, x, y)
      assert np.linalg.norm(null_space @ upper) <= tolerance


@pytest.mark.parametrize("entry", BANK, ids=lambda entry: entry.name)
def test_bank_x_star_is_the_global_minimiser(entry):
  """Brute force: scipy's L-BFGS-B on the closed-form Phi from 20 starts.

  No start may end below Phi(x*), and the best one must end at x*.
  """
  value = _compiled_value(entry)
  unravel = _unraveler(entry)
  gradient = lambda v: _ravel(entry.hypergradient(unravel(v)))
  x_star = _ravel(entry.x_star)
  best = value(x_star)
  rng = np.random.default_rng(2)
  scale = 1.0 + np.abs(x_star).max()
  ends = []
  for _ in range(20):
    start = x_star + scale * rng.uniform(-2.0, 2.0, x_star.size)
    result = optimize.minimize(value, start, jac=gradient, method="L-BFGS-B",
                               options={"maxiter": 5000, "ftol": 1e-15,
                                        "gtol": 1e-10})
    ends.append(result.x)
    assert result.fun >= best - 1e-9 * max(1.0, abs(best)), (
        result.x, result.fun, best)
  closest = min(np.linalg.norm(end - x_star) for end in ends)
  assert closest <= 1e-4 * max(1.0, np.linalg.norm(x_star))


# ---------------------------------------------------------------------------
# The registry.


def test_registry_holds_every_factory():
  factories = measure.public_factories()
  assert sorted(REGISTRY) == sorted(factories), (
      "bilevel.solvers.REGISTRY and the factories of bilevel.solvers.__all__ "
      f"differ: only registered {sorted(set(REGISTRY) - set(factories))}, "
      f"only public {sorted(set(factories) - set(REGISTRY))}.")
  for name, entry in REGISTRY.items():
    assert entry.name == name
    assert (entry.factory is factories[name]
            or getattr(entry.factory, "__wrapped__", None) is factories[name])
  # The helpers left out are not factories in disguise.
  for name in measure.HELPERS:
    annotation = inspect.signature(getattr(bilevel.solvers, name)
                                   ).return_annotation
    assert "BilevelSolver" not in str(annotation)


def _names_another_solver(message: str, name: str) -> bool:
  return any(re.search(rf"\b{re.escape(other)}\b", message)
             for other in REGISTRY if other != name)


def _is_informative(message: str, name: str) -> bool:
  """Says what to use instead: "use ..." or another solver's name."""
  return bool(re.search(r"\b[Uu]se\b", message)) or _names_another_solver(
      message, name)


@pytest.mark.parametrize("solver, problem", PAIRS)
def test_conformance(solver, problem):
  entry = REGISTRY[solver]
  bank_problem = bank_lib.get(problem)
  problem_class = bank_problem.problem_class
  if problem_class in entry.handles:
    outcome = measure.attempt(entry.factory, bank_problem)
    if outcome.kind == "diverged":
      pytest.fail(f"{solver} diverged on {problem}, a {problem_class} "
                  f"problem it handles: {outcome.exception}")
    assert outcome.kind == "solved", (
        f"{solver} on {problem}: {measure.describe(outcome)}")
    tolerance = entry.handles[problem_class]
    assert outcome.error <= tolerance, (
        f"{solver} ends at relative error {outcome.error:.3e} from x* on "
        f"{problem} after {bank_problem.num_steps} steps; the registry "
        f"promises {tolerance:.1e} on {problem_class} problems.")
  elif problem_class in entry.falls_short:
    # A stated shortfall stays true: the defaults stop within a factor 3 of
    # the stated error (and the run is not silently worse).
    outcome = measure.attempt(entry.factory, bank_problem)
    stated = entry.falls_short[problem_class]
    error = (outcome.error if outcome.kind == "solved" else float("inf"))
    assert error <= 3 * stated, (
        f"{solver} on {problem}: {measure.describe(outcome)}; the registry "
        f"states that its defaults stop at about {stated:.1e} on "
        f"{problem_class} problems.")
  elif problem_class in entry.refuses:
    outcome = measure.attempt(entry.factory, bank_problem, num_steps=0)
    assert outcome.kind == "refused", (
        f"{solver} should refuse {problem} ({problem_class}) when built; "
        f"it gave {measure.describe(outcome)}")
    message = str(outcome.exception)
    if (isinstance(outcome.exception, TypeError) and outcome.stage == "factory"
        and measure.needs_more_than_a_problem(entry.factory)):
      return  # The factory needs more than a problem (STN's space).
    assert _is_informative(message, solver), (
        f"{solver} refuses {problem} without saying what to use instead: "
        f"{message}")
  else:
    pytest.skip(entry.notes or f"{solver} neither handles nor refuses "
                f"{problem_class} problems.")


def test_readme_table_is_the_registry():
  """The README's table of what each solver handles is the registry's."""
  import pathlib  # pylint: disable=import-outside-toplevel
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  start = readme.index("<!-- registry table:")
  start = readme.index("\n", start) + 1
  end = readme.index("<!-- end of registry table -->")
  assert readme[start:end].strip() == _registry.markdown_table().strip()
