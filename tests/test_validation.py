"""Bad input gives a clear error at construction or init, never deep in JAX.

Every error case is an entry of ``CASES``; ``docs/errors.md`` has one table
row per case, keyed by the case id, and ``test_docs_table_matches_cases``
keeps the two in step (ids, stages, exception types and message starts).
"""

import pathlib
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems
from bilevel import _base, _problem

DOCS = pathlib.Path(__file__).parent.parent / "docs" / "errors.md"
# Solvers that refuse lower-level constraints, and all of them.
UNCONSTRAINED = ("aid", "itd", "stocbio", "soba", "amigo", "borep", "ma_soba",
                 "ttsa", "penalty", "penalty_momentum", "f2sa", "bome",
                 "scalebio")
SOLVERS = UNCONSTRAINED + ("lvhba",)
# Solvers with a num_lower_steps count (SOBA, MA-SOBA, TTSA: one lower step;
# the penalty method and F2SA count num_inner_steps, checked in
# tests/test_penalty.py).
COUNTED = ("aid", "itd", "stocbio", "amigo", "borep", "bome")
# Solvers with an upper_optimizer and a lower_optimizer (BO-REP, MA-SOBA,
# F2SA and BOME fix their update rule and take step sizes, checked in
# tests/test_solvers.py, tests/test_borep.py and tests/test_penalty.py).
UPPER_OPTIMIZED = tuple(name for name in SOLVERS if name not in (
    "borep", "ma_soba", "f2sa", "bome", "lvhba"))
# Solvers that differentiate through y*(x) (implicit or unrolled), and so
# through project_y.
IMPLICIT = ("aid", "itd", "stocbio", "soba", "amigo", "borep", "ma_soba",
            "ttsa")
X = jnp.zeros(3)
Y = jnp.zeros(3)
KEY = jax.random.key(0)


def _lower(x, y, batch):
  return 0.5 * jnp.sum(y ** 2) - jnp.sum(x * y)


def _upper(x, y, batch):
  return jnp.sum((y - 1.0) ** 2)


PROBLEM = bilevel.Problem(_upper, _lower)
# The same problem with x = {"w": array}, to see leaf paths in messages.
DICT_X_PROBLEM = bilevel.Problem(lambda x, y, b: _upper(x["w"], y, b),
                                 lambda x, y, b: _lower(x["w"], y, b))


# The README's example: x and y both in R^2, y*(x) = A^{-1} x.
_A = jnp.array([[2.0, 0.5], [0.5, 1.0]])


def _readme_lower(x, y, batch):
  return 0.5 * y @ _A @ y - x @ y


def _readme_lower_swapped(y, x, batch):
  """The same g written with its arguments in the wrong order."""
  return 0.5 * y @ _A @ y - x @ y


README_SWAPPED = bilevel.Problem(_upper, _readme_lower_swapped)
# g of the upper variable only: y does not enter the lower level at all.
Y_FREE = bilevel.Problem(_upper, lambda x, y, b: jnp.sum((x - 1.0) ** 2))


def _check_lower(problem, x=jnp.zeros(2), y=jnp.zeros(2), batch=None):
  return _problem.check_lower_depends_on_y(problem, x, y, batch)


def _solver(name, problem=PROBLEM, **kwargs):
  return getattr(bilevel.solvers, name)(problem, **kwargs)


def _init(name, problem=PROBLEM, x=X, y=Y, data=None, key=KEY):
  return _solver(name, problem).init(x, y, key=key, data=data)


def _lower_data(**kwargs):
  return bilevel.Data(**{"lower": {"v": jnp.ones((5, 3))}, **kwargs})


def _fail(error):
  raise error


def _step_with_other_data(name):
  problem = bilevel.Problem(_upper, lambda x, y, b: _lower(x, y, b) + 0.0)
  data = _lower_data(lower_batch_size=2)
  solver = _solver(name, problem)
  state = solver.init(X, Y, key=KEY, data=data)
  return solver.step(state, None)


_STN_SPACE = bilevel.best_response.HyperparameterSpace(
    {"l2": bilevel.best_response.positive(1e-3)})


def _stn_problem():
  """STN's contract: the objectives read hp.unconstrained / hp.values."""
  return bilevel.Problem(
      lambda hp, y, b: jnp.sum((y - 1.0) ** 2),
      lambda hp, y, b: 0.5 * jnp.sum(y ** 2) * (1 + jnp.mean(
          hp.values["l2"])) + jnp.mean(hp.unconstrained) * jnp.sum(y))


class Case(NamedTuple):
  """One kind of bad input.

  Attributes:
    id: the case's id, also the first column of its row in docs/errors.md.
    stage: when the error is raised: "construction", "init" or "run".
    make: ``make(solver_name)`` triggers the error.
    exception: the exception type raised.
    match: a regular expression the message must match.
    solvers: the solver names ``make`` is run with.
  """
  id: str
  stage: str
  make: Callable[[str], Any]
  exception: type
  match: str
  solvers: tuple = ("aid",)


CASES = [
    # The problem itself.
    Case("objective-not-callable", "construction",
         lambda name: bilevel.Problem(_upper, 3.0), TypeError,
         r"Problem.lower must be a callable objective g\(x, y, batch\)"),
    Case("projection-not-callable", "construction",
         lambda name: bilevel.Problem(_upper, _lower, project_y=(0.0, 1.0)),
         TypeError, "Problem.project_y must be None or a callable"),
    Case("constraint-not-callable", "construction",
         lambda name: bilevel.Problem(_upper, _lower,
                                      lower_constraints="y <= 1"),
         TypeError, "Problem.lower_constraints must be None or a callable"),
    Case("problem-not-a-problem", "construction",
         lambda name: _solver(name, (_upper, _lower)), TypeError,
         r"bilevel.solvers.\w+ expects a bilevel.Problem.*got tuple",
         SOLVERS),
    Case("lower-constraints-refused", "construction",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: y - 1.0)),
         ValueError,
         r"solvers.\w+ cannot handle lower-level constraints "
         r"\(Problem.lower_constraints\).*silently ignore", UNCONSTRAINED),
    Case("lower-equality-constraints-refused", "construction",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower,
             lower_equality_constraints=lambda x, y: jnp.sum(y) - 1.0)),
         ValueError, r"\(Problem.lower_equality_constraints\)",
         UNCONSTRAINED),
    Case("joint-projection-refused", "construction",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, project_xy=lambda x, y: (x, y))),
         ValueError, r"\(Problem.project_xy\).*project_x/project_y", UPPER_OPTIMIZED),
    # Step sizes, schedules and optimizers.
    Case("step-size-negative", "construction",
         lambda name: _solver(name, upper_optimizer=-1.0), ValueError,
         r"upper_optimizer \(a step size\) must be positive; got -1.0",
         UPPER_OPTIMIZED),
    Case("step-size-zero", "construction",
         lambda name: _solver(name, lower_optimizer=0.0), ValueError,
         r"lower_optimizer \(a step size\) must be positive; got 0.0",
         UPPER_OPTIMIZED),
    Case("step-size-nan", "construction",
         lambda name: _solver(name, upper_optimizer=float("nan")),
         ValueError, "upper_optimizer .* got NaN", UPPER_OPTIMIZED),
    Case("step-size-infinite", "construction",
         lambda name: _solver(name, upper_optimizer=float("inf")),
         ValueError, "must be finite; got inf", UPPER_OPTIMIZED),
    Case("step-size-string", "construction",
         lambda name: _solver(name, upper_optimizer="fast"), TypeError,
         r"upper_optimizer must be an optax optimizer.*'fast' \(type str\)",
         UPPER_OPTIMIZED),
    Case("step-size-array", "construction",
         lambda name: _solver(name, upper_optimizer=jnp.ones(3)), ValueError,
         r"must be a scalar; got an array .* shape \(3,\)", UPPER_OPTIMIZED),
    Case("step-size-negative-array", "construction",
         lambda name: _solver(name, lower_optimizer=jnp.asarray(-0.1)),
         ValueError, "lower_optimizer .* must be positive; got -0.1",
         UPPER_OPTIMIZED),
    Case("optimizer-factory-uncalled", "construction",
         lambda name: _solver(name, upper_optimizer=optax.adam), TypeError,
         r"upper_optimizer is a callable.*returned a "
         r"GradientTransformationExtraArgs.*optax.adam\(1e-3\)", UPPER_OPTIMIZED),
    Case("schedule-not-scalar", "construction",
         lambda name: _solver(name, lower_optimizer=lambda t: jnp.ones(3)),
         TypeError, r"lower_optimizer is a callable.*\[3\], not a real "
         "scalar", UPPER_OPTIMIZED),
    Case("schedule-wrong-signature", "construction",
         lambda name: _solver(name, upper_optimizer=lambda: 0.1), TypeError,
         "upper_optimizer is a callable.*failed with TypeError", UPPER_OPTIMIZED),
    # Counts and the other solver options.
    Case("count-zero", "construction",
         lambda name: _solver(name, num_lower_steps=0), ValueError,
         "num_lower_steps must be positive; got 0", COUNTED),
    Case("count-negative", "construction",
         lambda name: _solver(name, num_lower_steps=-2), ValueError,
         "num_lower_steps must be positive; got -2", COUNTED),
    Case("count-float", "construction",
         lambda name: _solver(name, num_lower_steps=10.0), TypeError,
         r"num_lower_steps must be an int .*got 10.0 \(type float\)",
         COUNTED),
    Case("count-bool", "construction",
         lambda name: _solver(name, num_lower_steps=True), TypeError,
         "num_lower_steps must be an int", COUNTED),
    Case("linear-steps-zero", "construction",
         lambda name: _solver(name, num_linear_steps=0), ValueError,
         "num_linear_steps must be positive", ("amigo",)),
    Case("neumann-terms-zero", "construction",
         lambda name: _solver(name, num_neumann_terms=0), ValueError,
         "num_neumann_terms must be positive", ("stocbio",)),
    Case("neumann-step-size-negative", "construction",
         lambda name: _solver(name, neumann_step_size=-0.5), ValueError,
         "neumann_step_size must be positive; got -0.5", ("stocbio",)),
    Case("neumann-step-size-string", "construction",
         lambda name: _solver(name, neumann_step_size="0.5"), TypeError,
         r"neumann_step_size must be a number; got '0.5' \(type str\)",
         ("stocbio",)),
    Case("linear-solver-wrong-type", "construction",
         lambda name: _solver(name, linear_solver=bilevel.linear_solve.cg),
         TypeError, r"linear_solver must be a "
         r"bilevel.linear_solve.LinearSolver.*cg\(maxiter=10\).*got the "
         "callable cg", ("aid",)),
    Case("penalty-power-out-of-range", "construction",
         lambda name: _solver(name, penalty_power=0.8), ValueError,
         r"penalty_power is the exponent p of c_k = penalty_base \(k \+ 1\)\^p",
         ("lvhba",)),
    Case("penalize-joint-projection", "construction",
         lambda name: bilevel.constraints.penalize(bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: y - 1.0,
             project_xy=lambda x, y: (x, y)), 10.0), ValueError,
         r"The problem has Problem.project_xy, which the penalized problem "
         "cannot keep"),
    Case("lisa-blocks-select-nothing", "init",
         lambda name: _solver(name, bilevel.Problem(
             lambda x, y, b: _upper(x, y["w"], b),
             lambda x, y, b: _lower(x, y["w"], b)),
                              lower_optimizer=bilevel.lisa.lisa_adamw(
                                  0.1, blocks="layers", num_active=1,
                                  period=5)).init(X, {"w": Y}, key=KEY),
         ValueError, r"blocks='layers' selects no leaf of the parameters",
         ("scalebio",)),
    Case("run-state-sharding-mismatch", "run",
         lambda name: bilevel.run(
             _solver(name), X, Y, num_steps=2,
             state_sharding=[bilevel.sharding.replicated(
                 bilevel.sharding.make_mesh())]),
         ValueError, r"state_sharding must be a pytree of "
         r"jax.sharding.Sharding that matches the solver state"),
    # Self-Tuning Networks.
    Case("stn-space-not-a-space", "construction",
         lambda name: bilevel.solvers.stn(_stn_problem(), {"l2": 1e-3}),
         TypeError, r"stn's second argument must be a bilevel.best_response."
         r"HyperparameterSpace; got dict", ("stn",)),
    Case("stn-entropy-weight-zero", "construction",
         lambda name: bilevel.solvers.stn(_stn_problem(), _STN_SPACE,
                                          entropy_weight=0.0),
         ValueError, r"stn with tune_scales=True needs entropy_weight > 0",
         ("stn",)),
    Case("stn-x-not-hyper-variables", "init",
         lambda name: bilevel.solvers.stn(_stn_problem(), _STN_SPACE).init(
             jnp.zeros(1), Y, key=KEY),
         TypeError, r"stn's upper variable x must be a bilevel.best_response."
         r"HyperVariables; got ArrayImpl", ("stn",)),
    Case("stn-x-wrong-size", "init",
         lambda name: bilevel.solvers.stn(_stn_problem(), _STN_SPACE).init(
             bilevel.best_response.HyperVariables(jnp.zeros(2), jnp.zeros(2)),
             Y, key=KEY),
         ValueError, r"x.unconstrained must have shape \(1,\), one entry per "
         r"hyperparameter \(l2\); got \(2,\)", ("stn",)),
    Case("hyperparameter-init-outside-interval", "construction",
         lambda name: bilevel.best_response.interval(0.95, 0.0, 0.9),
         ValueError, r"An interval hyperparameter's init must lie strictly "
         r"inside \(low, high\)", ("stn",)),
    Case("flag-not-bool", "construction",
         lambda name: _solver(name, warm_start_linear="no"), TypeError,
         r"warm_start_linear must be a bool \(True or False\); got 'no' "
         r"\(type str\)", ("aid",)),
    Case("linear-solver-negative-step", "construction",
         lambda name: bilevel.linear_solve.neumann(step_size=-0.5,
                                                   num_terms=5),
         ValueError, "neumann step_size must be positive; got -0.5"),
    Case("lvhba-constraints-not-affine", "init",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: jnp.sum(
                 y ** 2, keepdims=True) + x[:1] - 1.0)).init(X, Y, key=KEY),
         ValueError, r"bilevel.solvers.lvhba: the lower constraints "
         r"\(Problem.lower_constraints\) are not affine in \(x, y\)",
         ("lvhba",)),
    Case("lvhba-constraints-overlap-projection", "init",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: y + x - 1.0,
             project_y=lambda y: jnp.clip(y, 0.0, 1.0))).init(X, Y, key=KEY),
         ValueError, r"bilevel.solvers.lvhba: the problem has lower "
         r"constraints \(Problem.lower_constraints\) on the variable that "
         r"Problem.project_y projects", ("lvhba",)),
    Case("lvhba-joint-projection-infeasible", "init",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: y + x - 1.0,
             project_xy=lambda x, y: (x, y))).init(X, Y, key=KEY),
         ValueError, r"bilevel.solvers.lvhba: Problem.project_xy does not "
         r"keep y feasible", ("lvhba",)),
    Case("lvhba-joint-projection-outside-product", "init",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, project_y=lambda y: jnp.clip(y, 0.0, 1.0),
             project_xy=lambda x, y: (x, y))).init(X, Y, key=KEY),
         ValueError, r"bilevel.solvers.lvhba: Problem.project_y moves "
         r"points of Problem.project_xy", ("lvhba",)),
    Case("lower-equality-constraints-inconsistent", "init",
         lambda name: _solver(name, bilevel.Problem(
             _upper, _lower, lower_equality_constraints=lambda x, y:
             jnp.stack([jnp.sum(y), jnp.sum(y) - 1.0]))).init(X, Y, key=KEY),
         ValueError, r"bilevel.solvers.lvhba: The lower equality constraints "
         r"are affine and inconsistent", ("lvhba",)),
    Case("lvhba-normalize-constraints-invalid", "construction",
         lambda name: _solver(name, normalize_constraints=0.0), ValueError,
         r"normalize_constraints must be True", ("lvhba",)),
    Case("projection-not-differentiable", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, _lower, project_y=lambda y: jax.pure_callback(
                 lambda a: a.clip(0.0, 1.0),
                 jax.ShapeDtypeStruct(y.shape, y.dtype), y))),
         ValueError, r"Problem.project_y cannot be differentiated by JAX "
         r"\(.*\).*penalty", IMPLICIT),
    # The variables.
    Case("x-integer", "init",
         lambda name: _init(name, x=jnp.arange(3)), TypeError,
         r"x \(the upper variable\) must hold floating-point arrays; found "
         r"dtype int\d+\[3\] at x", SOLVERS),
    Case("y-empty", "init", lambda name: _init(name, y={}), TypeError,
         r"y \(the lower variable\) is an empty pytree", SOLVERS),
    Case("x-none", "init", lambda name: _init(name, x=None), TypeError,
         r"x \(the upper variable\) is an empty pytree \(None\)", SOLVERS),
    Case("y-only-none-leaves", "init",
         lambda name: _init(name, y={"w": None}), TypeError,
         r"y \(the lower variable\) is an empty pytree", SOLVERS),
    Case("x-list-of-floats", "init",
         lambda name: _init(name, x=[0.0, 0.0, 0.0]), TypeError,
         r"must be a pytree of arrays; found a float at x\[0\].*"
         r"jnp.asarray\(\[...\]\)", SOLVERS),
    Case("x-python-float", "init", lambda name: _init(name, x=1.0),
         TypeError, r"x \(the upper variable\) is a Python float \(1.0\), "
         r"not an array. For a scalar variable pass jnp.asarray\(1.0\); for "
         r"a vector, an array such as jnp.asarray\(\[...\]\) or "
         r"jnp.full\(n, 1.0\)", SOLVERS),
    Case("y-python-int", "init", lambda name: _init(name, y=0), TypeError,
         r"y \(the lower variable\) is a Python int \(0\), not an array. "
         r"For a scalar variable pass jnp.asarray\(0.0\)", SOLVERS),
    Case("x-python-float-leaf", "init",
         lambda name: _init(name, DICT_X_PROBLEM, x={"w": 0.5}), TypeError,
         r"must be a pytree of arrays; found a float at x\['w'\]. A Python "
         r"float is not an array: pass jnp.asarray\(0.5\) there", SOLVERS),
    Case("x-numpy-scalar-for-vector", "init",
         lambda name: _init(name, bilevel.Problem(_upper, _readme_lower),
                            x=np.float64(1.0), y=jnp.zeros(2)), TypeError,
         r"Calling the lower objective g\(x, y, batch\) failed with x of "
         r"structure float\d+\[\].*Note: x is a 0-d array \(shape \(\)\); "
         r"if the objective expects a vector, pass an array of that length",
         SOLVERS),
    Case("y-wrong-structure", "init",
         lambda name: _init(name, bilevel.Problem(
             lambda x, y, b: jnp.sum(y["w"] ** 2),
             lambda x, y, b: jnp.sum(y["w"] ** 2))), TypeError,
         r"Calling the upper objective f\(x, y, batch\) failed", SOLVERS),
    Case("x-wrong-shape", "init",
         lambda name: _init(name, x=jnp.zeros(4)), TypeError,
         r"objective .* failed with x of structure float\d+\[4\]", SOLVERS),
    # The objectives.
    Case("upper-not-scalar", "init",
         lambda name: _init(name, bilevel.Problem(
             lambda x, y, b: (y - 1.0) ** 2, _lower)), ValueError,
         r"upper objective f\(x, y, batch\) must return a scalar.*\[3\]",
         SOLVERS),
    Case("lower-not-scalar", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, lambda x, y, b: y * x)), ValueError,
         r"lower objective g\(x, y, batch\) must return a scalar", SOLVERS),
    Case("lower-integer", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, lambda x, y, b: jnp.sum(y > 0).astype(jnp.int32))),
         ValueError, "lower objective g.*floating-point scalar.*int32",
         SOLVERS),
    Case("objective-raises", "init",
         lambda name: _init(name, bilevel.Problem(
             lambda x, y, b: _fail(ValueError("no upper data")), _lower)),
         TypeError, r"Calling the upper objective f\(x, y, batch\) failed.*"
         "ValueError: no upper data", SOLVERS),
    Case("objective-fails-on-batch", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, lambda x, y, b: jnp.sum(y * b["w"])),
                            data=_lower_data(lower_batch_size=2)),
         TypeError, "lower objective g.*batch of structure.*KeyError",
         SOLVERS),
    Case("projection-changes-shape", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, _lower, project_x=lambda x: x[:2])), ValueError,
         "Problem.project_x must return a pytree of the structure and "
         "shapes", SOLVERS),
    Case("projection-fails", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, _lower, project_y=lambda y: y["w"])), TypeError,
         "Calling Problem.project_y on", SOLVERS),
    # Lower-level constraints (checked by bilevel.validate).
    Case("lower-constraints-fail", "init",
         lambda name: bilevel.validate(bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: y["w"]), X, Y),
         TypeError, r"Calling Problem.lower_constraints\(x, y\) failed"),
    Case("lower-constraints-not-float", "init",
         lambda name: bilevel.validate(bilevel.Problem(
             _upper, _lower, lower_equality_constraints=lambda x, y: y > 0),
                                       X, Y), ValueError,
         r"Problem.lower_equality_constraints\(x, y\) must return a pytree "
         "of floating-point arrays.*bool"),
    Case("lower-constraints-empty", "init",
         lambda name: bilevel.validate(bilevel.Problem(
             _upper, _lower, lower_constraints=lambda x, y: {}), X, Y),
         ValueError, r"Problem.lower_constraints\(x, y\) returned no arrays"),
    Case("joint-projection-wrong-output", "init",
         lambda name: bilevel.validate(bilevel.Problem(
             _upper, _lower, project_xy=lambda x, y: y), X, Y), ValueError,
         r"Problem.project_xy\(x, y\) must return a pair \(x, y\)"),
    # Non-finite values at the initial point.
    Case("x0-not-finite", "init",
         lambda name: _init(name, DICT_X_PROBLEM,
                            x={"w": jnp.array([0.0, jnp.inf, 0.0])}),
         ValueError, r"x0\['w'\] \(the initial upper variable\) is not "
         r"finite: 1 of 3 .*inf at index \(1,\)", SOLVERS),
    Case("y0-not-finite", "init",
         lambda name: _init(name, y=jnp.full(3, jnp.nan)), ValueError,
         r"y0 \(the initial lower variable\) is not finite: 3 of 3", SOLVERS),
    Case("upper-not-finite", "init",
         lambda name: _init(name, bilevel.Problem(
             lambda x, y, b: jnp.log(jnp.sum(y)), _lower)), ValueError,
         "upper objective f is -inf at the initial point.*batch=None.*log "
         "of a non-positive number", SOLVERS),
    Case("lower-not-finite", "init",
         lambda name: _init(name, bilevel.Problem(
             _upper, lambda x, y, b: jnp.mean(b["v"] / jnp.sum(y ** 2))),
                            data=_lower_data(lower_batch_size=2)),
         ValueError, r"lower objective g is inf at the initial point .* "
         r"first batch \(the first 2 samples of Data.lower\)", SOLVERS),
    # A lower objective with no minimiser in y (checked on concrete inputs
    # by _problem.check_lower_depends_on_y).
    Case("lower-arguments-swapped", "init",
         lambda name: _check_lower(README_SWAPPED), ValueError,
         r"The lower objective g\(x, y, batch\) has no curvature in y .* but "
         r"has curvature in x .*y is unconstrained.*were the arguments "
         r"swapped \(g\(y, x, batch\)\)\?"),
    Case("lower-independent-of-y", "init",
         lambda name: _check_lower(Y_FREE), ValueError,
         r"The lower objective g\(x, y, batch\) does not depend on y while "
         r"it does depend on x: .*every y minimises it.*swapped"),
    # Data and keys.
    Case("data-not-data", "init",
         lambda name: _init(name, data={"lower": jnp.ones((4, 3))}),
         TypeError, "data must be a bilevel.Data .*got dict", SOLVERS),
    Case("data-lengths-disagree", "init",
         lambda name: _init(name, data=bilevel.Data(
             lower={"a": jnp.ones((5, 3)), "b": jnp.ones(4)})), ValueError,
         r"arrays of the lower dataset \(Data.lower\) disagree in length",
         SOLVERS),
    Case("data-no-sample-axis", "init",
         lambda name: _init(name, data=bilevel.Data(upper=jnp.ones(()))),
         ValueError, r"needs a leading sample axis; found a scalar "
         r"\(shape \(\)\) at Data.upper\.", SOLVERS),
    Case("data-python-list", "init",
         lambda name: _init(name, data=bilevel.Data(
             upper=[[1.0, 2.0], [3.0, 4.0]])), ValueError,
         r"The upper dataset \(Data.upper\) is a Python list of numbers \(a "
         r"float at Data.upper\[0\]\[0\]\), not an array: a Python list is a "
         r"pytree whose leaves are the numbers themselves.*leading sample "
         r"axis.*jnp.asarray", SOLVERS),
    Case("data-nested-tuple", "init",
         lambda name: _init(name, data=bilevel.Data(
             lower={"v": ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))})), ValueError,
         r"The lower dataset \(Data.lower\) holds a Python tuple of numbers "
         r"at Data.lower\['v'\] \(a float at Data.lower\['v'\]\[0\]\[0\]\)",
         SOLVERS),
    Case("batch-size-float", "init",
         lambda name: _init(name, data=_lower_data(lower_batch_size=2.0)),
         TypeError, "Data.lower_batch_size must be an int or None; got 2.0",
         SOLVERS),
    Case("batch-size-zero", "init",
         lambda name: _init(name, data=_lower_data(lower_batch_size=0)),
         ValueError, "Data.lower_batch_size must be positive; got 0", SOLVERS),
    Case("batch-size-too-large", "init",
         lambda name: _init(name, data=_lower_data(lower_batch_size=10)),
         ValueError, r"Data.lower_batch_size=10 is larger than the lower "
         r"dataset \(5 samples\)", SOLVERS),
    Case("batch-size-without-data", "init",
         lambda name: _init(name, data=bilevel.Data(upper=jnp.ones((5, 3)),
                                                    lower_batch_size=2)),
         ValueError, "Data.lower_batch_size is set but Data.lower is None",
         SOLVERS),
    Case("key-missing", "init",
         lambda name: _init(name, data=_lower_data(lower_batch_size=2),
                            key=None), ValueError,
         r"A key is needed to shuffle minibatches.*jax.random.key\(seed\)",
         SOLVERS),
    Case("key-int", "init", lambda name: _init(name, key=0), TypeError,
         r"key must be a JAX PRNG key; got 0 \(type int\).*"
         r"jax.random.key\(seed\)", SOLVERS),
    Case("key-float-array", "init",
         lambda name: _init(name, key=jnp.zeros(2)), TypeError,
         "key must be a JAX PRNG key; got an array of dtype float", SOLVERS),
    Case("key-several", "init",
         lambda name: _init(name, key=jax.random.split(KEY, 3)), ValueError,
         r"key must be a single PRNG key; got an array of keys of shape "
         r"\(3,\)", SOLVERS),
    # Steps and runs.
    Case("step-data-differs", "run", _step_with_other_data, ValueError,
         "step.* received data whose minibatch setting differs.*same "
         "bilevel.Data", SOLVERS),
    Case("run-num-steps-zero", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=0),
         ValueError, "num_steps must be positive; got 0"),
    Case("run-num-steps-float", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3.0),
         TypeError, "num_steps must be an int"),
    Case("run-not-a-solver", "run",
         lambda name: bilevel.run(_solver(name).step, X, Y, num_steps=3),
         TypeError, r"run\(\) expects a bilevel.BilevelSolver"),
    Case("run-on-divergence-unknown", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3,
                                  on_divergence="skip"),
         ValueError, "on_divergence must be one of"),
    Case("run-state-of-another-solver", "run",
         lambda name: bilevel.run(
             _solver(name), None, None, num_steps=3,
             state=_solver("amigo" if name == "aid" else "aid").init(X, Y)),
         ValueError, "state does not match this solver and data", SOLVERS),
    Case("run-state-not-a-state", "run",
         lambda name: bilevel.run(_solver(name), None, None, num_steps=3,
                                  state={"x": X}),
         TypeError, "state must be a solver state"),
    Case("run-diverges", "run",
         lambda name: bilevel.run(
             # Lower level 100-smooth: the default lower step 0.5 blows y
             # up by about 49 per step until exp(y) overflows (LV-HBA's
             # default steps are 0.01: its saddle step is set to 0.5;
             # ScaleBiO's default AdamW takes bounded steps: plain SGD).
             _solver(name, bilevel.Problem(
                 lambda x, y, b: jnp.sum(jnp.exp(y)),
                 lambda x, y, b: 50.0 * jnp.sum(y ** 2) - jnp.sum(x * y)),
                     **{"lvhba": {"saddle_step_size": 0.5},
                        "scalebio": {"lower_optimizer": 0.5}}.get(name, {})),
             X, Y + 1.0, num_steps=50),
         bilevel.DivergenceError,
         r"bilevel.run: divergence at step \d+ of 50: ", SOLVERS),
    Case("run-blows-up", "run",
         # Phi(x) = -0.0075 |x|^2 + const is unbounded below: with an upper
         # step of 1, x grows by 1.015 per step, finite but without end.
         lambda name: bilevel.run(
             _solver(name, bilevel.Problem(
                 lambda x, y, b: -0.0075 * jnp.sum(x ** 2)
                 + 0.5 * jnp.sum((y - 1.0) ** 2),
                 lambda x, y, b: 0.5 * jnp.sum((y - 0.1 * x) ** 2)),
                     upper_optimizer=1.0),
             X + 1.0, Y, num_steps=4000),
         bilevel.DivergenceError,
         r"bilevel.run: divergence at step \d+ of 4000: values grew past "
         r"max_growth times their start", ("soba", "aid")),
    Case("run-max-growth-not-above-one", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3,
                                  max_growth=1.0),
         ValueError, "max_growth must be greater than 1"),
    Case("run-max-magnitude-negative", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3,
                                  max_magnitude=-1.0),
         ValueError, "max_magnitude must be a positive number"),
    Case("run-checkpoint-dir-is-a-file", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3,
                                  checkpoint_dir=__file__),
         ValueError, "checkpoint_dir .* exists and is not a directory"),
    Case("run-checkpoint-every-zero", "run",
         lambda name: bilevel.run(_solver(name), X, Y, num_steps=3,
                                  checkpoint_every=0),
         ValueError, "checkpoint_every must be positive; got 0"),
]


def _params():
  return [pytest.param(case, name, id=f"{case.id}[{name}]")
          for case in CASES for name in case.solvers]


@pytest.mark.parametrize("case,name", _params())
def test_bad_input_is_rejected_clearly(case, name):
  with pytest.raises(case.exception, match=case.match):
    case.make(name)


def test_case_ids_are_unique():
  ids = [case.id for case in CASES]
  assert len(ids) == len(set(ids))
  assert all(case.stage in ("construction", "init", "run") for case in CASES)


def _docs_rows():
  """``{id: (stage, exception, message start)}`` of the docs' table."""
  rows = {}
  for line in DOCS.read_text().splitlines():
    match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|(.*)\|\s*$", line)
    if match:
      cells = [cell.strip() for cell in match.group(2).split("|")]
      assert len(cells) == 3, line
      stage, exception, message = cells
      rows[match.group(1)] = (stage, exception.strip("`"),
                              message.strip("`").rstrip("…").rstrip())
  return rows


def test_docs_table_matches_cases():
  """docs/errors.md lists every case, with its stage, type and message."""
  rows = _docs_rows()
  assert set(rows) == {case.id for case in CASES}
  for case in CASES:
    stage, exception, message = rows[case.id]
    assert stage == case.stage, case.id
    assert exception == case.exception.__name__, case.id
    with pytest.raises(case.exception) as info:
      case.make(case.solvers[0])
    assert str(info.value).startswith(message), (case.id, str(info.value))


def test_docs_keep_the_run_loop_section():
  assert "\n## Run loop\n" in DOCS.read_text()


@pytest.mark.parametrize("name", SOLVERS)
def test_valid_problem_initialises(name):
  state = _init(name)
  assert state.x.shape == (3,)


@pytest.mark.parametrize("optimizer", [
    optax.adam(1e-3),
    optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    optax.schedules.cosine_decay_schedule(0.1, 100),
    lambda count: 0.1 / jnp.sqrt(count + 1.0),
    lambda count: 1,
    jnp.asarray(0.1),
    0.1,
], ids=["adam", "extra-args", "optax-schedule", "lambda-schedule",
        "int-schedule", "array", "float"])
@pytest.mark.parametrize("name", UPPER_OPTIMIZED)
def test_valid_optimizers_are_accepted(name, optimizer):
  solver = _solver(name, upper_optimizer=optimizer, lower_optimizer=optimizer)
  state = solver.init(X, Y)
  if name == "aid":  # one solver is enough to see that optax takes them
    state, _ = jax.jit(solver.step)(state)
  assert bool(jnp.all(jnp.isfinite(state.x)))


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0)],
                         ids=["typed", "legacy"])
def test_typed_and_legacy_keys_are_accepted(key):
  data = _lower_data(lower_batch_size=2)
  problem = bilevel.Problem(_upper, lambda x, y, b: _lower(x, y, b) + 0.0)
  state = _solver("soba", problem).init(X, Y, key=key, data=data)
  assert state.sampler.lower is not None


def test_keys_are_checked_under_vmap():
  keys = jax.random.split(KEY, 2)
  init = lambda key: _solver("aid").init(X, Y, key=key)
  assert jax.vmap(init)(keys).x.shape == (2, 3)
  with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
    jax.vmap(init)(jnp.zeros((2, 3)))


def test_non_finite_check_is_skipped_when_traced():
  """Under jit, vmap or eval_shape the initial values are not inspected."""
  solver = _solver("aid")
  bad = jnp.full(3, jnp.nan)
  assert jax.jit(lambda y: solver.init(X, y).y)(bad).shape == (3,)
  assert jax.vmap(lambda y: solver.init(X, y).y)(bad[None]).shape == (1, 3)
  assert jax.eval_shape(lambda: solver.init(X, bad).y).shape == (3,)


def test_non_finite_check_compiles_once_per_problem_and_shapes():
  problem = bilevel.Problem(_upper, _lower)
  solver = _solver("aid", problem)
  before = _base._initial_values._cache_size()  # pylint: disable=protected-access
  for _ in range(3):
    solver.init(X, Y)
  assert _base._initial_values._cache_size() == before + 1  # pylint: disable=protected-access


def test_non_finite_check_sees_only_the_first_batch():
  """A NaN past the first batch is the run loop's business, not init's."""
  values = jnp.ones((6, 3)).at[4].set(jnp.nan)
  problem = bilevel.Problem(_upper, lambda x, y, b: jnp.mean(b["v"] @ y))
  data = bilevel.Data(lower={"v": values}, lower_batch_size=2)
  _solver("soba", problem).init(X, Y, key=KEY, data=data)
  with pytest.raises(ValueError, match="lower objective g is nan.*whole"):
    _solver("soba", problem).init(X, Y, key=KEY,
                                  data=bilevel.Data(lower={"v": values}))


def test_lower_constraints_are_validated_and_reported():
  problem = bilevel.Problem(
      _upper, _lower, lower_constraints=lambda x, y: {"box": y - 1.0},
      lower_equality_constraints=lambda x, y: jnp.sum(y) - jnp.sum(x),
      project_xy=lambda x, y: (x, jnp.clip(y, -1.0, 1.0)))
  bilevel.validate(problem, X, Y)
  assert problem.has_lower_constraints
  assert not PROBLEM.has_lower_constraints
  assert problem.lower_constraint_fields == (
      "lower_constraints", "lower_equality_constraints", "project_xy")


def test_traced_step_sizes_are_not_checked_eagerly():
  def final(step_size):
    solver = bilevel.solvers.aid(PROBLEM, upper_optimizer=step_size)
    return bilevel.run(solver, X, Y, num_steps=3).x

  assert jax.jit(final)(0.5).shape == (3,)


def test_python_number_hints_name_the_container():
  """A number in a list gets the list hint, a bare one the scalar hint."""
  with pytest.raises(TypeError, match=r"found a float at x\[1\]\. A Python "
                     r"list or tuple of numbers"):
    _init("aid", x=(jnp.zeros(3), 1.0))
  with pytest.raises(TypeError, match=r"is a Python complex \(1j\), not an "
                     "array; the variables must be real"):
    _init("aid", x=1j)


def test_numpy_scalar_variable_is_accepted():
  """np.float64(1.0) is a valid 0-d variable when the objectives take one."""
  problem = bilevel.Problem(lambda x, y, b: jnp.sum((y - 1.0) ** 2),
                            lambda x, y, b: 0.5 * jnp.sum(y ** 2) - x * y)
  state = _solver("aid", problem).init(np.float64(1.0), np.float64(0.0))
  assert jnp.shape(state.x) == () and jnp.shape(state.y) == ()


def test_data_scalar_message_names_the_leaf():
  with pytest.raises(ValueError, match=r"found a scalar \(shape \(\)\) at "
                     r"Data.lower\['b'\]"):
    _init("aid", data=bilevel.Data(lower={"a": jnp.ones((4, 3)),
                                          "b": jnp.ones(())}))


def test_data_of_arrays_in_lists_is_accepted():
  """Lists and tuples of arrays are ordinary pytrees of datasets."""
  problem = bilevel.Problem(_upper, lambda x, y, b: _lower(x, y, b) + jnp.mean(
      b[0]) * jnp.mean(b[1][0]))
  data = bilevel.Data(lower=[jnp.ones((5, 3)), (jnp.ones(5),)],
                      lower_batch_size=2)
  state = _solver("aid", problem).init(X, Y, key=KEY, data=data)
  assert state.x.shape == (3,)


def test_lower_check_passes_the_readme_example():
  _check_lower(bilevel.Problem(_upper, _readme_lower))
  _check_lower(bilevel.Problem(_upper, _readme_lower), jnp.ones(2),
               jnp.ones(2))


def test_lower_check_fires_on_swapped_readme_away_from_zero():
  """At x0 = y0 = 1 the swapped g has a slope in y: still refused."""
  with pytest.raises(ValueError, match="has no curvature in y"):
    _check_lower(README_SWAPPED, jnp.ones(2), jnp.ones(2))


def test_lower_check_says_when_g_is_constant():
  with pytest.raises(ValueError, match="does not depend on y nor on x"):
    _check_lower(bilevel.Problem(_upper, lambda x, y, b: jnp.asarray(1.0)))


def test_lower_check_looks_again_away_from_a_flat_start():
  """y^4 has a zero Hessian at y = 0 only: the second point clears it."""
  problem = bilevel.Problem(
      _upper, lambda x, y, b: jnp.sum(y ** 4) - x @ y + x @ x)
  _check_lower(problem)
  # The same g with y entering linearly is refused: the test can fail.
  with pytest.raises(ValueError, match="has no curvature in y"):
    _check_lower(bilevel.Problem(_upper, lambda x, y, b: x @ x - x @ y))


def test_lower_check_accepts_a_linear_lower_level_on_a_set():
  """g linear in y is legitimate on a constrained Y (an LP lower level)."""
  lower = lambda x, y, b: (x ** 2 + 1.0) @ y
  simplex = optax.projections.projection_simplex
  _check_lower(bilevel.Problem(_upper, lower, project_y=simplex),
               jnp.ones(2), jnp.full(2, 0.5))
  _check_lower(bilevel.Problem(
      _upper, lower, lower_constraints=lambda x, y: -y), jnp.ones(2),
               jnp.full(2, 0.5))
  with pytest.raises(ValueError, match=r"y is unconstrained \(no "
                     r"Problem.project_y\)"):
    _check_lower(bilevel.Problem(_upper, lower), jnp.ones(2),
                 jnp.full(2, 0.5))


def test_lower_check_uses_the_batch():
  """g's dependence on y may come through the data only."""
  problem = bilevel.Problem(
      _upper, lambda x, y, b: 0.5 * jnp.mean(b["w"]) * y @ y - x @ y
      + 0.5 * x @ x)
  _check_lower(problem, batch={"w": jnp.ones(4)})
  with pytest.raises(ValueError, match="has no curvature in y"):
    _check_lower(problem, batch={"w": jnp.zeros(4)})


def test_lower_check_ignores_non_finite_derivatives():
  problem = bilevel.Problem(
      _upper, lambda x, y, b: jnp.sum(jnp.sqrt(y)) + x @ x - x @ y)
  _check_lower(problem, jnp.zeros(2), jnp.full(2, -1.0))


def test_lower_check_is_skipped_when_traced():
  jax.jit(lambda y: _check_lower(README_SWAPPED, y=y))(jnp.zeros(2))
  jax.vmap(lambda y: _check_lower(README_SWAPPED, y=y))(jnp.zeros((2, 2)))


@pytest.mark.parametrize("build", [
    lambda key: problems.quadratic(key),
    lambda key: problems.quadratic(key, num_samples=40, batch_size=8),
    lambda key: problems.box_constrained(key),
    lambda key: problems.underdetermined_least_squares(key),
    lambda key: problems.sphere_lower_level(key),
    lambda key: problems.hyper_cleaning(key, num_train=200, num_val=50),
], ids=["quadratic", "quadratic-minibatch", "box_constrained",
        "underdetermined_least_squares", "sphere_lower_level",
        "hyper_cleaning"])
def test_lower_check_passes_suite_problems(build):
  instance = build(KEY)
  _check_lower(instance.problem, instance.x0, instance.y0,
               _base._first_batch(instance.data, "lower"))  # pylint: disable=protected-access


# Fails until bilevel/_base.py calls _problem.check_lower_depends_on_y from
# check_initial_point (on concrete inputs, after the finiteness checks).
@pytest.mark.parametrize("name", SOLVERS)
def test_swapped_arguments_are_refused_at_init(name):
  with pytest.raises(ValueError, match=r"has no curvature in y.*were the "
                     r"arguments swapped"):
    _init(name, README_SWAPPED, x=jnp.zeros(2), y=jnp.zeros(2))
