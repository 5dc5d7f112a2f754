"""LV-HBA, lower-level constraints, projections and the constrained problems."""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import bilevel
from bilevel import constraints, projections
from bilevel.solvers._lvhba import OFFICIAL_SETTINGS
import problems
from tests.conformance.y_meaning import (flat_lower_problem,
                                         shifted_validation_labels)
from problems import constrained

# The settings of paper_repro/lvhba for the SVM problems, with the paper's
# iteration (constraints as written).
SVM_SETTINGS = dict(step_size=0.01, z_step_size=0.1, saddle_step_size=0.001,
                    gamma1=1.0, gamma2=1.0, penalty_base=0.01,
                    penalty_power=0.5, normalize_constraints=False)


def _scan(solver, state, num_steps, metric=None):
  def body(state, _):
    state, info = solver.step(state)
    return state, (info if metric is None else metric(state))
  return jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_steps))(
      state)


def _relative_error(instance):
  return lambda state: (jnp.linalg.norm(state.x - instance.x_star)
                        / jnp.linalg.norm(instance.x_star))


# ---------------------------------------------------------------------------
# The LLC toy: closed forms, then LV-HBA reaching x*.


def test_llc_closed_forms():
  instance = constrained.llc_toy(dim=7)
  x = jax.random.normal(jax.random.key(0), (7,))
  # The optimistic lower solution is feasible and stationary for the
  # Lagrangian with multiplier -1.
  y = instance.lower_solution(x)
  coupling = instance.problem.lower_equality_constraints
  assert abs(float(coupling(x, y)[0])) < 1e-12
  grad_y = jax.grad(instance.problem.lower, 1)(x, y, None)
  grad_c = jax.grad(lambda y_: coupling(x, y_)[0])(y)
  chex.assert_trees_all_close(
      jax.tree.map(lambda g, c: g - c, grad_y, grad_c),
      jax.tree.map(jnp.zeros_like, y), atol=1e-12)
  # Phi's gradient against central differences; x* is its minimiser.
  step = 1e-6
  fd = jnp.stack([(instance.value(x + step * e) - instance.value(x - step * e))
                  / (2 * step) for e in jnp.eye(7)])
  np.testing.assert_allclose(instance.hypergradient(x), fd, atol=1e-7)
  np.testing.assert_allclose(instance.hypergradient(instance.x_star), 0.0,
                             atol=1e-12)
  np.testing.assert_allclose(instance.x_star, -0.3)
  y1, y2 = instance.lower_solution(instance.x_star)
  np.testing.assert_allclose(y1, 0.7, atol=1e-12)
  np.testing.assert_allclose(y2, -0.4, atol=1e-12)


def _llc_paper_start(dim=100):
  """The paper's start: x0 = 1, y0 = (y1, y2) = 0 (infeasible for y0)."""
  return jnp.ones(dim), (jnp.zeros(dim), jnp.zeros(dim))


@pytest.mark.parametrize("as_inequalities", [False, True])
def test_lvhba_defaults_reach_llc_solution_without_joint_projection(
    as_inequalities):
  # The toy as written from the paper's math: the coupling
  # 1'x + 1'y1 + 1'y2 = 0 as one equality or two inequalities, no
  # project_xy. The solver reads the coupling as affine and projects onto
  # its hyperplane.
  instance = constrained.llc_toy(as_inequalities=as_inequalities)
  assert instance.problem.project_xy is None
  solver = bilevel.solvers.lvhba(instance.problem)
  x0, y0 = _llc_paper_start()
  state, errors = _scan(solver, solver.init(x0, y0), 60_000,
                        _relative_error(instance))
  # Measured: 6.5e-4 in both forms (4.3 at the start; 7.1e-4 after 50,000
  # steps); the coupling to 1e-13; multiplier -1.00004.
  assert float(errors[0]) > 1.0
  assert float(errors[-1]) < 1e-3
  assert float(constraints.violation(instance.problem, state.x,
                                     state.y)) < 1e-10
  y1, y2 = state.y
  np.testing.assert_allclose(y1, 0.7, atol=1e-3)
  np.testing.assert_allclose(y2, -0.4, atol=1e-3)
  inequality, equality = state.multipliers
  multiplier = (equality[0] if not as_inequalities
                else inequality[0] - inequality[1])
  # The KKT multiplier of the coupling is -1.
  assert abs(float(multiplier) + 1.0) < 1e-3
  if as_inequalities:
    assert float(jnp.min(inequality)) >= 0.0


def test_lvhba_built_projection_is_the_explicit_one():
  # Without project_xy the iterates are those of the run with the exact
  # projection onto the coupling hyperplane given by hand.
  x0, y0 = _llc_paper_start()
  runs = []
  for joint_projection in (False, True):
    instance = constrained.llc_toy(joint_projection=joint_projection)
    solver = bilevel.solvers.lvhba(instance.problem)
    runs.append(_scan(solver, solver.init(x0, y0), 2000,
                      lambda state: state.x)[1])
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-9, atol=1e-12)


# A box lower level: g = ||y - x||^2 / 2 on Y = [0, 1]^3, so y*(x) =
# clip(x, 0, 1), and f = ||y - t||^2 / 2 + 0.05 ||x - s||^2. Coordinates 1 and
# 3 leave the box (y* = 1, 0: Phi = 0.05 (x - s)^2 + const, x* = s); the
# second stays inside: Phi = (x - 0.5)^2 / 2 + 0.05 x^2, x* = 0.5 / 1.1.
BOX_T = jnp.array([2.0, 0.5, -1.0])
BOX_S = jnp.array([3.0, 0.0, -2.0])
BOX_X_STAR = jnp.array([3.0, 0.5 / 1.1, -2.0])


def _box_problem():
  return bilevel.Problem(
      lambda x, y, b: (0.5 * jnp.sum((y - BOX_T) ** 2)
                       + 0.05 * jnp.sum((x - BOX_S) ** 2)),
      lambda x, y, b: 0.5 * jnp.sum((y - x) ** 2),
      project_y=lambda y: jnp.clip(y, 0.0, 1.0))


def test_lvhba_defaults_reach_box_solution():
  problem = _box_problem()
  solver = bilevel.solvers.lvhba(problem)
  start = jnp.full(3, 0.5)

  def error(state):
    return (jnp.linalg.norm(state.x - BOX_X_STAR)
            / jnp.linalg.norm(BOX_X_STAR))

  state, errors = _scan(solver, solver.init(start, start), 60_000, error)
  # Measured: 5.2e-4 (0.97 at the start; 0.45 after 5000 steps with the
  # previous defaults, 9.9e-4 after 50,000 with these).
  assert float(errors[0]) > 0.9
  assert float(errors[-1]) < 1e-3
  np.testing.assert_allclose(state.y, jnp.clip(BOX_X_STAR, 0.0, 1.0),
                             atol=1e-3)
  assert float(jnp.min(state.y)) >= 0.0 and float(jnp.max(state.y)) <= 1.0


def test_lvhba_official_settings_do_not_converge_on_llc():
  # The official toy's settings (alpha 0.008, beta 0.02, eta 0.01, gamma 10,
  # c_k = 0.025 (k + 1)^0.3, u = 1000, constraints as written): the
  # iteration map is unstable.
  assert OFFICIAL_SETTINGS["llc"]["normalize_constraints"] is False
  instance = constrained.llc_toy(joint_projection=True)
  solver = bilevel.solvers.lvhba(instance.problem, **OFFICIAL_SETTINGS["llc"])
  _, errors = _scan(solver, solver.init(instance.x0, instance.y0), 1500,
                    _relative_error(instance))
  assert float(jnp.max(errors[500:])) > 1.0


def test_penalized_baseline_violates_constraint_by_one_over_rho():
  instance = constrained.llc_toy(joint_projection=True)
  rho = 10.0
  problem = constraints.penalize(instance.problem, rho,
                                 drop_joint_projection=True)
  assert not problem.has_lower_constraints
  solver = bilevel.solvers.penalty(problem, upper_optimizer=0.05,
                                   lower_optimizer=0.9 / (200 * rho + 2),
                                   penalty=1000.0, num_inner_steps=10)
  state, errors = _scan(solver, solver.init(instance.x0, instance.y0), 3000,
                        _relative_error(instance))
  assert float(errors[-1]) < 1e-2
  # The penalised lower solution has 1'x + 1'y = -1/rho (multiplier -1).
  violation = float(constraints.violation(instance.problem, state.x, state.y))
  assert abs(violation - 1.0 / rho) < 0.01


# ---------------------------------------------------------------------------
# The LLSC toy.


def test_llsc_lower_solution_is_the_projection():
  instance = constrained.llsc_toy(jax.random.key(1), dim=12,
                                  num_constraints=8, num_upper_constraints=8)
  x = jax.random.normal(jax.random.key(2), (12,))
  y = instance.lower_solution(x)
  coupling = instance.problem.lower_equality_constraints
  np.testing.assert_allclose(coupling(x, y), 0.0, atol=1e-10)
  # Brute force: minimise 1/2 |x - y|^2 on A y = -H x by least squares on
  # the null space of A.
  a = jax.jacobian(coupling, 1)(x, y)
  y_particular = np.linalg.lstsq(a, -(coupling(x, y) - a @ y), rcond=None)[0]
  null = scipy.linalg.null_space(np.asarray(a))
  best = y_particular + null @ (null.T @ (np.asarray(x) - y_particular))
  np.testing.assert_allclose(y, best, atol=1e-10)
  # project_xy lands on C = {Hx + Ay = 0, Bx = 0} and is idempotent.
  px, py = instance.problem.project_xy(x, x + 1.0)
  np.testing.assert_allclose(coupling(px, py), 0.0, atol=1e-10)
  chex.assert_trees_all_close(instance.problem.project_xy(px, py), (px, py),
                              atol=1e-10)


def test_lvhba_on_llsc_tracks_the_lower_solution():
  instance = constrained.llsc_toy()
  # The official code's settings (alpha = beta = eta = 0.1, gamma1 = 0.1,
  # gamma2 = 1, c_k = (k + 1)^0.3).
  solver = bilevel.solvers.lvhba(instance.problem,
                                 **OFFICIAL_SETTINGS["llsc"])

  def gap(state):
    return jnp.linalg.norm(state.y - instance.lower_solution(state.x))

  state, gaps = _scan(solver, solver.init(instance.x0, instance.y0), 5000,
                      gap)
  # Measured: the distance to y*(x) falls from 1.7 to 0.24 (step 1000) and
  # 0.20 (step 5000), shrinking with 1/c_k; Phi from 0.97 to -0.069.
  assert float(gaps[0]) > 1.0 and float(gaps[-1]) < 0.25
  assert float(gaps[-1]) < float(gaps[999])
  assert float(constraints.violation(instance.problem, state.x,
                                     state.y)) < 1e-8
  assert float(instance.value(state.x)) < float(instance.value(
      instance.x0)) - 0.5


# ---------------------------------------------------------------------------
# Projections against brute force.


def _brute_force_polyhedron(v, g, h, m=None, r=None):
  """The projection onto {G u <= h, M u = r} by enumerating active sets."""
  best = None
  for size in range(len(h) + 1):
    for active in itertools.combinations(range(len(h)), size):
      rows = [g[list(active)]] + ([m] if m is not None else [])
      rhs = [h[list(active)]] + ([r] if r is not None else [])
      a, b = np.concatenate(rows), np.concatenate(rhs)
      u = v - np.linalg.pinv(a) @ (a @ v - b) if len(b) else v
      feasible = np.all(g @ u <= h + 1e-9) and (
          m is None or np.allclose(m @ u, r, atol=1e-9))
      if feasible and (best is None or
                       np.linalg.norm(u - v) < np.linalg.norm(best - v)):
        best = u
  return best


def test_affine_projection_matches_least_squares():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, 6))
  r = rng.normal(size=3)
  project = jax.jit(projections.affine(m, r))
  v = rng.normal(size=6)
  expected = _brute_force_polyhedron(v, np.zeros((0, 6)), np.zeros(0), m, r)
  np.testing.assert_allclose(project(jnp.asarray(v)), expected, atol=1e-10)


def test_polyhedron_projection_matches_brute_force_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  n, p = 5, 6
  g = rng.normal(size=(p, n))
  inside = rng.normal(size=n)
  h = g @ inside + rng.uniform(0.0, 1.0, size=p)
  m = rng.normal(size=(1, n))
  r = m @ inside
  project = projections.polyhedron(g, h, m, r, tol=1e-10)
  points = 3.0 * rng.normal(size=(4, n))
  projected = jax.jit(jax.vmap(project))(jnp.asarray(points))
  for v, u in zip(points, projected):
    np.testing.assert_allclose(u, _brute_force_polyhedron(v, g, h, m, r),
                               atol=1e-6)


def test_orthogonal_halfspaces_match_brute_force():
  rng = np.random.default_rng(3)
  basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  # Two halfspaces with orthogonal normals (scaled), one equality row
  # orthogonal to both.
  g = basis[:2] * np.array([[2.0], [0.5]])
  h = np.array([0.3, -0.2])
  m, r = basis[2:3] * 3.0, np.array([1.0])
  project = jax.jit(projections.orthogonal_halfspaces(g, h, m, r))
  for _ in range(4):
    v = 2.0 * rng.normal(size=6)
    np.testing.assert_allclose(project(jnp.asarray(v)),
                               _brute_force_polyhedron(v, g, h, m, r),
                               atol=1e-10)
  with pytest.raises(ValueError, match="not orthogonal"):
    projections.orthogonal_halfspaces(g + 0.1 * basis[1:2], h)


@pytest.mark.parametrize("kind", ["exact", "qp"])
def test_svm_margin_projections_match_brute_force(kind):
  rng = np.random.default_rng(2)
  n, d = 6, 2
  features = rng.normal(size=(n, d))
  labels = np.sign(rng.normal(size=n))
  project = (constrained.svm_margin_projection(features, labels)
             if kind == "exact" else constrained.svm_margin_qp_projection(
                 features, labels, tol=1e-10, maxiter=100_000))
  g = -np.concatenate([features * labels[:, None], labels[:, None],
                       np.eye(n)], 1)
  for _ in range(3):
    params = {"w": jnp.asarray(rng.normal(size=d)),
              "b": jnp.asarray(rng.normal()),
              "xi": jnp.asarray(rng.normal(size=n) - 1.0)}
    out = jax.jit(project)(params)
    v = np.concatenate([params["w"], [params["b"]], params["xi"]])
    expected = _brute_force_polyhedron(v, g, -np.ones(n))
    got = np.concatenate([out["w"], [out["b"]], out["xi"]])
    np.testing.assert_allclose(got, expected,
                               atol=1e-10 if kind == "exact" else 1e-6)


def test_joint_projection_flattens_x_then_y():
  project_xy = projections.joint(projections.affine(np.ones((1, 5))))
  x, y = jnp.arange(2.0), {"a": jnp.ones(3)}
  px, py = project_xy(x, y)
  assert float(jnp.sum(px) + jnp.sum(py["a"])) == pytest.approx(0.0, abs=1e-12)
  # The mean of the five coordinates, 4/5, is subtracted from each.
  chex.assert_trees_all_close((px, py), (x - 0.8, {"a": y["a"] - 0.8}))


# ---------------------------------------------------------------------------
# Constraint utilities.


def test_violation_and_penalize():
  problem = bilevel.Problem(
      lambda x, y, b: jnp.sum(y ** 2), lambda x, y, b: jnp.sum((y - x) ** 2),
      lower_constraints=lambda x, y: {"c": y - 1.0},
      lower_equality_constraints=lambda x, y: jnp.sum(y, keepdims=True) - x[:1])
  x, y = jnp.array([0.5, 0.0]), jnp.array([2.0, -1.0])
  # Inequality violations [1, 0]; equality |1 - 0.5| = 0.5.
  assert float(constraints.violation(problem, x, y)) == pytest.approx(1.0)
  penalized = constraints.penalize(problem, 4.0)
  expected = problem.lower(x, y, None) + 0.5 * 4.0 * (1.0 + 0.25)
  assert float(penalized.lower(x, y, None)) == pytest.approx(float(expected))
  assert float(constraints.violation(bilevel.Problem(
      problem.upper, problem.lower), x, y)) == 0.0
  multipliers = constraints.project_multipliers(
      ({"c": jnp.array([-2.0, 5.0])}, jnp.array([-5.0])), 3.0)
  chex.assert_trees_all_close(
      multipliers, ({"c": jnp.array([0.0, 3.0])}, jnp.array([-3.0])))


# ---------------------------------------------------------------------------
# The SVM problems.


def test_svm_lower_solution_matches_scipy():
  instance = constrained.svm_hyperparameter(dataset="fourclass",
                                            num_train=60, num_val=30)
  x = instance.x0 + 3.0
  y = jax.jit(instance.lower_solution)(x)
  assert float(constraints.violation(instance.problem, x, y)) < 1e-12
  # The lower level in (w, b) with the slacks at their best.
  def reduced(u):
    params = {"w": u[:-1], "b": u[-1]}
    xi = jnp.maximum(instance.problem.lower_constraints(
        x, {**params, "xi": jnp.zeros_like(x)}), 0.0)
    return instance.problem.lower(x, {**params, "xi": xi}, None)
  result = scipy.optimize.minimize(
      jax.jit(reduced), np.zeros(3), jac=jax.jit(jax.grad(reduced)),
      method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15,
                                  "maxiter": 10_000})
  got = np.concatenate([y["w"], [y["b"]]])
  np.testing.assert_allclose(got, result.x, atol=1e-5)
  assert float(reduced(jnp.asarray(got))) <= result.fun + 1e-12


@pytest.mark.parametrize("make", [constrained.svm_hyperparameter,
                                  constrained.svm_hyper_cleaning])
def test_lvhba_on_svm_updates_x_and_stays_feasible(make):
  instance = make(dataset="breast_cancer")
  solver = bilevel.solvers.lvhba(instance.problem, **SVM_SETTINGS)
  state, info = _scan(solver, solver.init(instance.x0, instance.y0), 1000)
  # The official code never moves x (a non-in-place torch add): ours does
  # (measured: by 10 and 8 at most).
  assert float(jnp.max(jnp.abs(state.x - instance.x0))) > 1.0
  assert float(info.constraint_violation[-1]) < 1e-10
  before = instance.evaluate(instance.x0, instance.y0)
  after = instance.evaluate(state.x, state.y)
  assert float(after["val_loss"]) < float(before["val_loss"]) - 0.5
  assert float(after["val_accuracy"]) > 0.9
  if "flip_recall" in after:
    # Measured 0.81 against 0.36 at x0: the flipped samples get the
    # smallest penalties.
    assert float(after["flip_recall"]) > 0.6

def test_svm_hyper_cleaning_flips_labels():
  clean = constrained.svm_hyperparameter(dataset="fourclass")
  noisy = constrained.svm_hyper_cleaning(dataset="fourclass", label_noise=0.4)
  evaluate = noisy.evaluate(noisy.x0, noisy.y0)
  assert "flip_recall" in evaluate and "flip_recall" not in clean.evaluate(
      clean.x0, clean.y0)
  with pytest.raises(ValueError, match="label_noise"):
    constrained.svm_hyper_cleaning(label_noise=0.6)


def test_fourclass_like_is_not_linearly_separable():
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  features, labels = constrained.fourclass_like()
  assert features.shape == (862, 2)
  score = LinearSVC().fit(features[:500], labels[:500]).score(
      features[650:], labels[650:])
  assert 0.7 < score < 0.85


# ---------------------------------------------------------------------------
# The solver's contract.


@pytest.mark.parametrize("normalize", [True, False])
def test_lvhba_step_follows_the_paper_order(normalize):
  # One step by hand on a small problem with an inequality coupling x, y,
  # written 2 (x + y - 1) <= 0: the y-Jacobian is 2 I, so sigma = 2 when
  # the constraints are normalised (sigma^2 = 4 divides c in d_lambda and
  # multiplies the proximal term of lambda), 1 otherwise.
  def upper(x, y, b):
    return jnp.sum((y - 2.0) ** 2) + jnp.sum(x ** 2)

  def lower(x, y, b):
    return 0.5 * jnp.sum((y - x) ** 2)

  def coupled(x, y):
    return 2.0 * (y + x - 1.0)

  def project_xy(x, y):  # onto {x_i + y_i <= 1}, exact
    excess = jnp.maximum(x + y - 1.0, 0.0) / 2.0
    return x - excess, y - excess

  problem = bilevel.Problem(upper, lower, lower_constraints=coupled,
                            project_xy=project_xy)
  kw = dict(step_size=0.1, z_step_size=0.2, saddle_step_size=0.3, gamma1=2.0,
            gamma2=4.0, penalty_base=1.5, penalty_power=0.5,
            normalize_constraints=normalize)
  solver = bilevel.solvers.lvhba(problem, **kw)
  x, y = jnp.array([0.3, -0.2]), jnp.array([1.0, 0.5])
  state = solver.init(x, y)
  state = state._replace(theta=jnp.array([0.8, 0.1]),
                         multipliers=(jnp.array([0.5, 0.0]), ()),
                         z=(jnp.array([0.2, 0.3]), ()))
  new, info = solver.step(state)
  sigma2 = 4.0 if normalize else 1.0
  theta, lam, z = state.theta, state.multipliers[0], state.z[0]
  d_theta = (theta - x) + 2.0 * lam + (theta - y) / 2.0
  d_lam = -coupled(x, theta) / sigma2 + (lam - z) / 4.0
  theta1 = theta - 0.3 * d_theta
  lam1 = jnp.clip(lam - 0.3 * d_lam, 0.0)
  c_k = 1.5
  d_x = 2 * x / c_k + (x - y) - ((x - theta1) + 2.0 * lam1)
  d_y = 2 * (y - 2.0) / c_k + (y - x) - (y - theta1) / 2.0
  d_z = -(lam1 - z) / 4.0
  x1, y1 = project_xy(x - 0.1 * d_x, y - 0.1 * d_y)
  # The projection is active in the first coordinate.
  assert float(jnp.sum(jnp.abs(x1 - (x - 0.1 * d_x)))) > 0.01
  np.testing.assert_allclose(new.theta, theta1, rtol=1e-12)
  np.testing.assert_allclose(new.multipliers[0], lam1, rtol=1e-12)
  np.testing.assert_allclose(new.x, x1, rtol=1e-12)
  np.testing.assert_allclose(new.y, y1, rtol=1e-12)
  np.testing.assert_allclose(new.z[0], jnp.clip(z - 0.2 * d_z, 0.0),
                             rtol=1e-12)
  proximal_value = (lower(x, theta1, None) + lam1 @ coupled(x, theta1)
                    + jnp.sum((theta1 - y) ** 2) / 4.0
                    - sigma2 * jnp.sum((lam1 - z) ** 2) / 8.0)
  assert float(info.lower_gap) == pytest.approx(
      float(lower(x, y, None) - proximal_value), rel=1e-12)
  assert float(info.penalty) == pytest.approx(c_k)
  assert int(new.num_steps) == 1


def test_lvhba_vmaps_over_starting_points():
  instance = constrained.llc_toy(dim=5)
  solver = bilevel.solvers.lvhba(instance.problem)
  starts = jnp.stack([instance.x0, -instance.x0])
  states = jax.vmap(lambda x: solver.init(x, instance.y0))(starts)
  stepped, _ = jax.jit(jax.vmap(solver.step))(states)
  for i in range(2):
    single, _ = solver.step(solver.init(starts[i], instance.y0))
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], stepped.x),
                                single.x, rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma1=0.0), "gamma1"),
    (dict(gamma2=-1.0), "gamma2"),
    (dict(multiplier_bound=0.0), "multiplier_bound"),
    (dict(penalty_power=0.0), "penalty_power"),
    (dict(penalty_base=-1.0), "penalty_base"),
    (dict(saddle_step_size=-0.1), "saddle_step_size"),
])
def test_lvhba_rejects_bad_hyperparameters(kwargs, match):
  instance = constrained.llc_toy(dim=3)
  with pytest.raises(ValueError, match=match):
    bilevel.solvers.lvhba(instance.problem, **kwargs)


def test_lvhba_oracle_calls():
  solver = bilevel.solvers.lvhba(constrained.llc_toy(dim=3).problem)
  assert solver.oracle_calls == bilevel.OracleCalls(1, 3, 0, 0)


# ---------------------------------------------------------------------------
# The joint set C: built from affine constraints, checked, or refused.


def _upper(x, y, b):
  return jnp.sum((y - 2.0) ** 2) + jnp.sum(x ** 2)


def _lower(x, y, b):
  return 0.5 * jnp.sum((y - x) ** 2)


def test_lvhba_refuses_nonaffine_coupling_without_joint_projection():
  problem = bilevel.Problem(
      _upper, _lower,
      lower_constraints=lambda x, y: jnp.sum(y ** 2, keepdims=True) + x - 1.0)
  solver = bilevel.solvers.lvhba(problem)
  with pytest.raises(ValueError, match=(
      r"the lower constraints \(Problem.lower_constraints\) are not affine "
      r"in \(x, y\).*Pass Problem.project_xy.*bilevel.projections.joint\("
      r"bilevel.projections.affine")):
    solver.init(jnp.zeros(1), jnp.zeros(3))


def _pytree_constraints():
  """Affine constraints on nested pytrees, with their matrices by hand.

  x = {"a": R^2, "b": R}, y = ({"w": R^{2x2}}, u in R^3); flat v = (a, b,
  w row-major, u), 10 entries. Inequalities {"sum": w11 + w12 + w21 + w22 - a1 - 1,
  "cap": 2 u - b}; one equality a2 + u1 - u3 = 0.5.
  """
  x = {"a": jnp.zeros(2), "b": jnp.zeros(())}
  y = ({"w": jnp.zeros((2, 2))}, jnp.zeros(3))

  def inequality(x, y):
    w, u = y[0]["w"], y[1]
    return {"sum": jnp.sum(w, keepdims=True) - x["a"][:1] - 1.0,
            "cap": 2.0 * u - x["b"]}

  def equality(x, y):
    u = y[1]
    return x["a"][1] + u[0] - u[2] - 0.5

  g = np.zeros((4, 10))
  g[0, 3:7], g[0, 0] = 1.0, -1.0
  g[1:, 7:], g[1:, 2] = 2.0 * np.eye(3), -1.0
  h = np.array([1.0, 0.0, 0.0, 0.0])
  m = np.zeros((1, 10))
  m[0, [1, 7, 9]] = 1.0, 1.0, -1.0
  return x, y, inequality, equality, g, h, m, np.array([0.5])


def test_linear_form_reads_affine_pytree_constraints():
  x, y, inequality, equality, g, h, m, r = _pytree_constraints()
  problem = bilevel.Problem(_upper, lambda x, y, b: 0.0,
                            lower_constraints=inequality,
                            lower_equality_constraints=equality)
  form = constraints.linear_form(problem, x, y)
  assert form is not None and form.num_x == 3
  # Rows in the order of the output's leaves: "cap" (3 rows), then "sum".
  np.testing.assert_allclose(form.inequality_matrix, g[[1, 2, 3, 0]],
                             atol=1e-12)
  np.testing.assert_allclose(form.inequality_bound, h[[1, 2, 3, 0]],
                             atol=1e-12)
  np.testing.assert_allclose(form.equality_matrix, m, atol=1e-12)
  np.testing.assert_allclose(form.equality_bound, r, atol=1e-12)


def test_linear_form_merges_opposite_inequalities_and_rejects_curvature():
  x, y = jnp.zeros(2), jnp.zeros(3)

  def pair(x, y):
    s = jnp.sum(y) - 2.0 * x[0] + 1.0
    return jnp.stack([s, -3.0 * s])  # -3 s <= 0 is s >= 0, scaled

  form = constraints.linear_form(
      bilevel.Problem(_upper, _lower, lower_constraints=pair), x, y)
  assert form.inequality_matrix.shape == (0, 5)
  np.testing.assert_allclose(form.equality_matrix,
                             [[-2.0, 0.0, 1.0, 1.0, 1.0]], atol=1e-12)
  np.testing.assert_allclose(form.equality_bound, [-1.0], atol=1e-12)
  for nonaffine in (lambda x, y: jnp.sum(y ** 2) - x[0],
                    lambda x, y: jnp.maximum(y, 0.0) - x[1],
                    lambda x, y: jnp.sin(y) + x[0],
                    lambda x, y: y * x[0]):
    assert constraints.linear_form(bilevel.Problem(
        _upper, _lower, lower_constraints=nonaffine), x, y) is None


def test_feasible_set_projection_of_pytree_constraints():
  # The rows of _pytree_constraints are not orthogonal ("sum" and the
  # equality share no column, but the "cap" rows share b): the QP path.
  x, y, inequality, equality, g, h, m, r = _pytree_constraints()
  problem = bilevel.Problem(_upper, lambda x, y, b: 0.0,
                            lower_constraints=inequality,
                            lower_equality_constraints=equality)
  project_xy = constraints.feasible_set_projection(
      constraints.linear_form(problem, x, y))
  start = ({"a": jnp.array([2.0, -1.0]), "b": jnp.array(3.0)},
           ({"w": jnp.ones((2, 2))}, jnp.array([1.0, 2.0, 3.0])))
  # Violated by 3 (the last "cap" row) and 3.5 (the equality).
  assert float(constraints.violation(problem, *start)) == pytest.approx(3.5)
  projected = jax.jit(project_xy)(*start)
  assert float(constraints.violation(problem, *projected)) < 1e-7
  v, p = (ravel_pytree(point)[0] for point in (start, projected))
  np.testing.assert_allclose(p, _brute_force_polyhedron(
      np.asarray(v), g, h, m, r), atol=1e-6)


def test_lvhba_on_pytree_constraints_with_orthogonal_rows():
  # x = {"a": R^2}, y = ({"w": R^2}, R^2): the budget w1 + w2 <= 1 + a1,
  # the cap u1 <= 0.5 and the equality u2 = a2 have orthogonal rows, so the
  # built projection is exact. g pulls y to (a1, a1, a2, a2); f pulls y
  # to 1 and x to 0.
  def flat_y(y):
    return jnp.concatenate([y[0]["w"], y[1]])

  def inequality(x, y):
    return {"budget": jnp.sum(y[0]["w"], keepdims=True) - 1.0 - x["a"][:1],
            "cap": y[1][:1] - 0.5}

  def equality(x, y):
    return y[1][1:] - x["a"][1:]

  def upper(x, y, b):
    return 0.5 * jnp.sum((flat_y(y) - 1.0) ** 2) + 0.5 * jnp.sum(
        x["a"] ** 2)

  def lower(x, y, b):
    target = jnp.repeat(x["a"], 2)
    return 0.5 * jnp.sum((flat_y(y) - target) ** 2)

  problem = bilevel.Problem(upper, lower, lower_constraints=inequality,
                            lower_equality_constraints=equality)
  form = constraints.linear_form(problem, {"a": jnp.zeros(2)},
                                 ({"w": jnp.zeros(2)}, jnp.zeros(2)))
  assert form.inequality_matrix.shape == (2, 6)
  assert form.equality_matrix.shape == (1, 6)
  solver = bilevel.solvers.lvhba(problem)
  start = ({"a": jnp.array([2.0, -1.0])},
           ({"w": jnp.array([3.0, 3.0])}, jnp.array([1.0, 1.0])))
  state = solver.init(*start)
  state, info = _scan(solver, state, 200)
  # Violated by 3 (the budget), 0.5 (the cap) and 2 (the equality).
  assert float(constraints.violation(problem, *start)) == pytest.approx(3.0)
  assert float(jnp.max(info.constraint_violation[1:])) < 1e-12
  assert float(constraints.violation(problem, state.x, state.y)) < 1e-12


def test_lvhba_accepts_a_box_on_x_with_constraints_on_y_only():
  problem = bilevel.Problem(
      _upper, _lower,
      lower_constraints=lambda x, y: jnp.sum(y, keepdims=True) - 1.0,
      project_x=lambda x: jnp.clip(x, 0.0, 0.5))
  solver = bilevel.solvers.lvhba(problem)
  state, _ = _scan(solver, solver.init(jnp.ones(3), jnp.ones(3)), 5)
  assert float(jnp.max(state.x)) <= 0.5
  assert float(jnp.sum(state.y)) <= 1.0 + 1e-7


@pytest.mark.parametrize("case,match", [
    ("overlap", r"lower constraints \(Problem.lower_constraints\) on the "
     r"variable that Problem.project_y projects, and no Problem.project_xy"),
    ("infeasible", r"Problem.project_xy does not keep y feasible"),
    ("outside", r"Problem.project_y moves points of Problem.project_xy"),
    ("inconsistent", r"affine and inconsistent"),
])
def test_lvhba_refuses_joint_sets_it_cannot_keep(case, match):
  box = lambda v: jnp.clip(v, 0.0, 1.0)  # pylint: disable=unnecessary-lambda-assignment
  coupling = lambda x, y: y + x - 1.0  # pylint: disable=unnecessary-lambda-assignment
  problem = {
      "overlap": bilevel.Problem(_upper, _lower, lower_constraints=coupling,
                                 project_y=box),
      "infeasible": bilevel.Problem(_upper, _lower,
                                    lower_constraints=coupling,
                                    project_xy=lambda x, y: (x, y)),
      "outside": bilevel.Problem(_upper, _lower, project_y=box,
                                 project_xy=lambda x, y: (x, y)),
      "inconsistent": bilevel.Problem(
          _upper, _lower, lower_equality_constraints=lambda x, y: jnp.stack(
              [jnp.sum(y), jnp.sum(y) - 1.0])),
  }[case]
  solver = bilevel.solvers.lvhba(problem)
  with pytest.raises(ValueError, match=match):
    solver.init(jnp.zeros(3), jnp.zeros(3))


@pytest.mark.parametrize("value", [0.0, -1.0, "yes", float("nan")])
def test_lvhba_rejects_bad_normalize_constraints(value):
  with pytest.raises(ValueError, match="normalize_constraints must be True"):
    bilevel.solvers.lvhba(constrained.llc_toy(dim=3).problem,
                          normalize_constraints=value)


# ---------------------------------------------------------------------------
# state.y: the lower iterate w without lower constraints; the paper's y
# (state.y_penalized) otherwise.


def test_lvhba_lower_iterate_step_and_oracle_calls():
  problem = _box_problem()
  solver = bilevel.solvers.lvhba(problem, saddle_step_size=0.4)
  assert solver.oracle_calls == bilevel.OracleCalls(1, 4, 0, 0)
  x, y = jnp.array([2.0, 0.3, -1.0]), jnp.array([0.9, 0.2, 0.6])
  state = solver.init(x, y)
  np.testing.assert_array_equal(state.y_penalized, y)
  for _ in range(2):  # warm-started from its own previous value
    x, w = state.x, state.y
    state, _ = solver.step(state)
    # One projected step on f(x^k, .) = |y - x|^2 / 2 over [0, 1]^3.
    np.testing.assert_allclose(state.y, jnp.clip(w - 0.4 * (w - x), 0.0,
                                                 1.0), rtol=1e-12)
  assert float(jnp.max(jnp.abs(state.y - state.y_penalized))) > 1e-2
  # With lower constraints state.y is the paper's y, and costs nothing.
  instance = constrained.llc_toy(dim=3)
  solver = bilevel.solvers.lvhba(instance.problem)
  assert solver.oracle_calls == bilevel.OracleCalls(1, 3, 0, 0)
  state, _ = solver.step(solver.init(instance.x0, instance.y0))
  chex.assert_trees_all_equal(state.y, state.y_penalized)


def test_lvhba_y_never_sees_the_validation_labels():
  # Hyper-cleaning with x held at x0: the validation labels move only
  # y_penalized (through grad F), never y.
  instance = problems.hyper_cleaning(jax.random.key(0), batch_size=64)
  x0 = instance.x0
  problem = dataclasses.replace(instance.problem, project_x=lambda x: x0)
  shifted = shifted_validation_labels(instance.data)
  solver = bilevel.solvers.lvhba(problem)
  runs = [bilevel.run(solver, x0, instance.y0, data, num_steps=300,
                      key=jax.random.key(1))
          for data in (instance.data, shifted)]
  for run in runs:
    np.testing.assert_array_equal(run.x, x0)
  chex.assert_trees_all_equal(runs[0].y, runs[1].y)
  assert max(float(jnp.max(jnp.abs(leaf)))
             for leaf in jax.tree.leaves(runs[0].y)) > 0.1
  # Measured: entries differ by 0.32; test accuracy 0.89 with the true
  # labels, 0.80 with the shifted ones, 0.85 for y.
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(runs[0].y_penalized),
      jax.tree.leaves(runs[1].y_penalized)))
  assert difference > 0.1, difference


def test_lvhba_y_converges_to_the_lower_solution():
  instance = problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                                condition_number=10.0)

  def relative(y, x):
    y_star = instance.lower_solution(x)
    return float(jnp.linalg.norm(y - y_star) / jnp.linalg.norm(y_star))

  # A decaying step on (x, y_penalized) stops x (0.60 from x*); w, with the
  # constant saddle step, converges to y*(x). Measured: 1.3e-10
  # (y_penalized: 0.099).
  solver = bilevel.solvers.lvhba(
      instance.problem, step_size=optax.exponential_decay(0.3, 500, 0.1))
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=4000)
  assert relative(result.y, result.x) < 1e-9
  assert relative(result.y_penalized, result.x) > 0.05
  # With the defaults x keeps moving and w lags: 1.6e-4 after 5000 steps,
  # y_penalized 0.027.
  solver = bilevel.solvers.lvhba(instance.problem)
  result = bilevel.run(solver, instance.x0, instance.y0, num_steps=5000)
  assert relative(result.y, result.x) < 1e-3
  assert relative(result.y_penalized, result.x) > 0.01


def test_lvhba_nonunique_lower_solutions():
  # g flat in y2 (tests/conformance/y_meaning.py): lower solutions
  # {y1 = x}, the optimistic one y2 = 1, x* = 0.
  solver = bilevel.solvers.lvhba(flat_lower_problem())
  result = bilevel.run(solver, jnp.asarray(1.0), jnp.array([0.5, -0.5]),
                       num_steps=20_000)
  # Measured: x 1.5e-14, y_penalized (1.5e-14, 1.0).
  assert abs(float(result.x)) < 1e-10
  np.testing.assert_allclose(result.y_penalized, [0.0, 1.0], atol=1e-10)
  assert float(result.y[1]) == -0.5
  assert abs(float(result.y[0] - result.x)) < 1e-10
