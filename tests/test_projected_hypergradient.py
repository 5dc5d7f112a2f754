"""Hypergradients through a projection onto Y, against closed forms.

For g(x, y) = 1/2 y'Ay - y'(Bx + b) on a convex set Y and
f(x, y) = 1/2 ||y - c||^2 + 1/2 r ||x||^2, the lower solution is found by a
long projected-gradient run in NumPy and its derivative from the KKT
conditions on the active face, written here from the math:

* box: dy_F/dx = A_FF^{-1} B_F on the free coordinates F, dy_A/dx = 0;
* simplex (support S): [A_SS 1; 1' 0] [dy_S; dnu] = [B_S; 0];
* ball ||y|| <= R, active: [A + mu I, y; y', 0] [dy; dmu] = [B; 0], with
  (A + mu I) y = Bx + b.

Each closed form is itself checked by central finite differences of Phi.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from bilevel import derivatives, linear_solve

DIM_X, DIM_Y = 4, 6
R_X = 0.1


def _matrices(seed=0):
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.standard_normal((DIM_Y, DIM_Y)))
  A = (basis * np.linspace(0.3, 1.0, DIM_Y)) @ basis.T
  A = 0.5 * (A + A.T)
  B = rng.standard_normal((DIM_Y, DIM_X))
  b = rng.standard_normal(DIM_Y)
  c = rng.standard_normal(DIM_Y)
  x = rng.standard_normal(DIM_X)
  return A, B, b, c, x


def _projections():
  return {
      "box": (lambda y: np.clip(y, -0.3, 0.4),
              lambda y: optax.projections.projection_box(y, -0.3, 0.4)),
      "simplex": (_simplex_np, optax.projections.projection_simplex),
      "ball": (lambda y: y * min(1.0, 0.5 / np.linalg.norm(y)),
               lambda y: optax.projections.projection_l2_ball(y, 0.5)),
  }


def _simplex_np(z):
  u = np.sort(z)[::-1]
  cumulative = np.cumsum(u) - 1.0
  k = np.nonzero(u - cumulative / np.arange(1, len(z) + 1) > 0)[0][-1]
  return np.maximum(z - cumulative[k] / (k + 1), 0.0)


def _lower_solution(A, B, b, project, x, num_iters=20000):
  y = np.zeros(DIM_Y)
  rhs = B @ x + b
  for _ in range(num_iters):
    y = project(y - (A @ y - rhs))
  return y


def _jacobian(kind, A, B, b, y):
  """dy*/dx from the KKT conditions on the active face (module docstring)."""
  if kind == "box":
    free = (y > -0.3 + 1e-9) & (y < 0.4 - 1e-9)
    jac = np.zeros((DIM_Y, DIM_X))
    jac[free] = np.linalg.solve(A[np.ix_(free, free)], B[free])
    return jac
  if kind == "simplex":
    support = y > 1e-9
    k = int(support.sum())
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = A[np.ix_(support, support)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = np.vstack([B[support], np.zeros((1, DIM_X))])
    jac = np.zeros((DIM_Y, DIM_X))
    jac[support] = np.linalg.solve(kkt, rhs)[:k]
    return jac
  # ball: the multiplier from (A + mu I) y = Bx + b along y.
  mu = float(y @ (B @ _X_CACHE[0] + b - A @ y) / (y @ y))
  assert mu > 0.1   # strictly active
  kkt = np.zeros((DIM_Y + 1, DIM_Y + 1))
  kkt[:DIM_Y, :DIM_Y] = A + mu * np.eye(DIM_Y)
  kkt[:DIM_Y, DIM_Y] = kkt[DIM_Y, :DIM_Y] = y
  rhs = np.vstack([B, np.zeros((1, DIM_X))])
  return np.linalg.solve(kkt, rhs)[:DIM_Y]


_X_CACHE = [None]


@functools.lru_cache(maxsize=None)
def _case(kind):
  A, B, b, c, x = _matrices()
  # Scales chosen so that each case has active and free directions.
  scale_x, scale_b = {"box": (0.05, 0.3), "simplex": (0.05, 0.0),
                      "ball": (0.2, 0.3)}[kind]
  x, b = scale_x * x, scale_b * b
  project_np, project_jax = _projections()[kind]
  y = _lower_solution(A, B, b, project_np, x)
  _X_CACHE[0] = x
  jac = _jacobian(kind, A, B, b, y)
  hypergradient = R_X * x + jac.T @ (y - c)

  A_, B_, b_, c_ = (jnp.asarray(m) for m in (A, B, b, c))
  problem = bilevel.Problem(
      upper=lambda x_, y_, _: (0.5 * jnp.sum((y_ - c_) ** 2)
                               + 0.5 * R_X * x_ @ x_),
      lower=lambda x_, y_, _: 0.5 * y_ @ A_ @ y_ - y_ @ (B_ @ x_ + b_),
      project_y=project_jax)

  def phi(x_):
    y_ = _lower_solution(A, B, b, project_np, x_, num_iters=3000)
    return 0.5 * np.sum((y_ - c) ** 2) + 0.5 * R_X * x_ @ x_

  return dict(problem=problem, x=x, y=y, hypergradient=hypergradient,
              phi=phi, A=A, B=B, b=b)


KINDS = ["box", "simplex", "ball"]


def test_cases_have_active_constraints():
  box = _case("box")["y"]
  assert np.any(np.isclose(box, -0.3)) and np.any(np.isclose(box, 0.4))
  assert np.sum((box > -0.29) & (box < 0.39)) >= 2   # and free coordinates
  simplex = _case("simplex")["y"]
  assert 1 < np.sum(simplex > 1e-9) < DIM_Y
  ball = _case("ball")
  assert np.linalg.norm(ball["y"]) == pytest.approx(0.5, abs=1e-12)
  # The constraint binds: the unconstrained minimiser lies outside the ball.
  unconstrained = np.linalg.solve(ball["A"], ball["B"] @ ball["x"] + ball["b"])
  assert np.linalg.norm(unconstrained) > 0.6


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_matches_finite_differences(kind):
  case = _case(kind)
  eps = 1e-5
  fd = np.array([(case["phi"](case["x"] + eps * e) -
                  case["phi"](case["x"] - eps * e)) / (2 * eps)
                 for e in np.eye(DIM_X)])
  np.testing.assert_allclose(fd, case["hypergradient"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_implicit_hypergradient_matches_closed_form(kind):
  case = _case(kind)
  h = bilevel.implicit_hypergradient(
      case["problem"], jnp.asarray(case["x"]), jnp.asarray(case["y"]),
      linear_solver=linear_solve.cg(tol=1e-14, maxiter=100))
  np.testing.assert_allclose(h, case["hypergradient"], rtol=1e-9,
                             atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_unconstrained_formula_would_be_wrong(kind):
  """The test above can fail: without D the estimate is off."""
  case = _case(kind)
  problem = bilevel.Problem(case["problem"].upper, case["problem"].lower)
  h = bilevel.implicit_hypergradient(
      problem, jnp.asarray(case["x"]), jnp.asarray(case["y"]))
  assert np.linalg.norm(h - case["hypergradient"]) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_unrolled_hypergradient_agrees(kind):
  case = _case(kind)
  h = bilevel.unrolled_hypergradient(
      case["problem"], jnp.asarray(case["x"]), jnp.asarray(case["y"]),
      lower_optimizer=1.0, num_steps=400)
  np.testing.assert_allclose(h, case["hypergradient"], rtol=1e-8,
                             atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_size", [0.1, 1.0, 10.0])
def test_fixed_point_step_size_does_not_matter(kind, step_size):
  """At an exact fixed point, J D u with D((u - Du)/eta + H D u) = D grad_y f
  does not depend on eta (dense check)."""
  case = _case(kind)
  problem, x, y = case["problem"], jnp.asarray(case["x"]), jnp.asarray(
      case["y"])
  grad = derivatives.lower_grad(problem, x, y)
  tangent = derivatives.lower_tangent(problem, y, grad, step_size)
  eye = np.eye(DIM_Y)
  D = np.stack([np.asarray(tangent(jnp.asarray(e))) for e in eye], axis=1)
  operator = D @ ((eye - D) / step_size + case["A"] @ D)
  _, grad_x, grad_y = derivatives.upper_value_and_grads(problem, x, y)
  u = np.linalg.lstsq(operator, D @ np.asarray(grad_y), rcond=None)[0]
  h = np.asarray(grad_x) + case["B"].T @ (D @ u)   # J = -B'
  np.testing.assert_allclose(h, case["hypergradient"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_single_loop_and_neumann_pieces_agree(kind):
  """SOBA's estimate at the exact v, and StocBiO's Neumann pieces, give the
  closed-form hypergradient (every implicit solver goes through these)."""
  case = _case(kind)
  problem, x, y = case["problem"], jnp.asarray(case["x"]), jnp.asarray(
      case["y"])
  _, info = bilevel.implicit_hypergradient_and_info(
      problem, x, y, linear_solver=linear_solve.cg(tol=1e-14, maxiter=100))
  estimate = bilevel.hypergradient.single_loop_estimate(problem, x, y, info.v)
  np.testing.assert_allclose(estimate.hypergradient, case["hypergradient"],
                             rtol=1e-9, atol=1e-11)
  assert float(estimate.linear_residual_norm) < 1e-10
  tangent = derivatives.implicit_tangent(problem, x, y)
  _, _, grad_y = derivatives.upper_value_and_grads(problem, x, y)
  v = linear_solve.neumann_series(
      lambda u: derivatives.implicit_hvp(problem, x, y, u, None, tangent),
      derivatives.tangent_apply(tangent, grad_y), step_size=0.9,
      num_terms=400)
  _, grad_x, _ = derivatives.upper_value_and_grads(problem, x, y)
  h, residual = bilevel.hypergradient.hypergradient_from_solution(
      problem, x, y, v, grad_x, grad_y, None, tangent)
  np.testing.assert_allclose(h, case["hypergradient"], rtol=1e-8, atol=1e-10)
  assert float(residual) < 1e-8


def test_without_projection_nothing_changes():
  """D = I: the projected pieces are the unconstrained ones, bit for bit."""
  case = _case("box")
  problem = bilevel.Problem(case["problem"].upper, case["problem"].lower)
  x, y = jnp.asarray(case["x"]), jnp.asarray(case["y"])
  u = jnp.arange(DIM_Y, dtype=float)
  assert derivatives.implicit_tangent(problem, x, y) is None
  np.testing.assert_array_equal(
      derivatives.implicit_hvp(problem, x, y, u),
      derivatives.lower_hvp(problem, x, y, u))
  _, pullback, tangent = derivatives.implicit_vjp(problem, x, y)
  _, reference = derivatives.lower_vjp(problem, x, y)
  assert tangent is None
  for got, want in zip(pullback(u), reference(u)):
    np.testing.assert_array_equal(got, want)


def _undifferentiable_box_problem(case):
  """The box case with a projection JAX cannot differentiate (a callback)."""
  def project(y):
    return jax.pure_callback(lambda a: np.clip(a, -0.3, 0.4),
                             jax.ShapeDtypeStruct(y.shape, y.dtype), y)

  return bilevel.Problem(case["problem"].upper, case["problem"].lower,
                         project_y=project)


def test_a_projection_jax_cannot_differentiate_is_refused():
  case = _case("box")
  problem = _undifferentiable_box_problem(case)
  with pytest.raises(ValueError, match="project_y cannot be differentiated"):
    bilevel.implicit_hypergradient(problem, jnp.asarray(case["x"]),
                                   jnp.asarray(case["y"]))


@pytest.mark.parametrize("name", ["aid", "amigo", "stocbio", "ttsa", "soba",
                                  "ma_soba", "borep", "itd"])
def test_solvers_refuse_a_projection_jax_cannot_differentiate_at_init(name):
  case = _case("box")
  problem = _undifferentiable_box_problem(case)
  solver = getattr(bilevel.solvers, name)(problem)
  with pytest.raises(ValueError, match="penalty"):
    solver.init(jnp.asarray(case["x"]), jnp.asarray(case["y"]))
