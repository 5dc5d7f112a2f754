r"""Property-based tests of derivatives, linear solves and hypergradients.

Hypothesis draws a pytree structure for ``x`` and for ``y`` (a bare array, a
dict, a tuple or a list of arrays, possibly nested one level, leaves of shape
``()``, ``(k,)`` or ``(k, m)``, at most 12 numbers in all) and a seed. From
the seed, numpy builds a random bilevel problem in the flat coordinates given
by ``jax.flatten_util.ravel_pytree``:

.. math::

   g(x, y) = \tfrac12 y^\top A y - y^\top B x
             + \gamma \textstyle\sum \mathrm{softplus}(D y + C x + d),

   f(x, y) = \tfrac12 \|y - c\|^2 + \beta \textstyle\sum \log\cosh(E y + F x)
             + \tfrac{\lambda}{2} \|x\|^2 + 0.1 \textstyle\sum \sin x,

with ``A`` symmetric positive definite of known spectrum ``[mu, L]``, so
``g`` is ``mu``-strongly convex in ``y``. The coefficients reach ``f`` and
``g`` as their ``batch`` argument (so one jitted function serves every
problem of a given structure), and ``f`` and ``g`` see ``x`` and ``y``
through the drawn pytrees. References are dense Hessians and Jacobians of
the flat functions (``jax.hessian``, ``jax.jacfwd``), numpy formulas for the
derivatives, and, for a quadratic lower level (``gamma = 0``), the closed
form ``y*(x) = A^{-1} B x``, ``grad Phi(x) = grad_x f + B' A^{-1} grad_y f``.

Properties (one test each):

1. ``derivatives.lower_vjp``, ``lower_hvp``, ``lower_cross``,
   ``lower_hvp_and_cross``, ``lower_grad`` and ``lower_value_and_grad``
   agree with dense ``H v``, ``J v`` and ``grad_y g``, in pytrees shaped like
   ``y`` (``H v``) and ``x`` (``J v``).
2. ``derivatives.upper_value_and_grads`` agrees with ``jax.grad`` of the flat
   ``f``.
3. ``linear_solve``: CG with ``maxiter`` equal to the dimension solves an SPD
   system to a relative residual below 1e-8; the Neumann series obeys its
   geometric error bound and converges to the same solution; both solvers
   return an exact warm start; ``residual_norm`` is the residual.
4. ``implicit_hypergradient`` at ``y*(x)`` with an accurate CG is the closed
   form (with a Neumann solve, within the bound the Neumann error implies);
   ``unrolled_hypergradient`` is the truncated closed form, and its error
   obeys a geometric bound derived in the test's docstring.
5. Structure invariance: every hypergradient estimate on the pytrees, raveled,
   equals the one on the raveled problem to 1e-10.

Every example runs in float64 (``tests/conftest.py``); the examples are
derandomized, so every run draws the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import bilevel
from bilevel import derivatives
from bilevel import hypergradient
from bilevel import linear_solve

MAX_SIZE = 12  # Most numbers in a drawn pytree.


def _settings(max_examples: int) -> hypothesis.settings:
  """Reproducible settings: derandomized, no example database, no deadline.

  Every example with a new structure compiles its jitted function once, so
  there is no per-example deadline, the number of examples is modest and a
  failing example is reported as drawn, not shrunk.
  """
  return hypothesis.settings(
      max_examples=max_examples, deadline=None, derandomize=True,
      database=None, print_blob=False,
      # Every shrink step compiles anew: shrinking a failure would take
      # minutes. Add hypothesis.Phase.shrink here to minimise one locally.
      phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate))


# ---------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------


def _size(tree: Any) -> int:
  return sum(np.size(leaf) for leaf in jax.tree.leaves(tree))


@st.composite
def _shapes(draw, budget: int) -> tuple[int, ...]:
  """A leaf shape ``()``, ``(k,)`` or ``(k, m)`` of at most ``budget``."""
  ndim = draw(st.integers(0, 2))
  if ndim == 0:
    return ()
  if ndim == 1:
    return (draw(st.integers(1, min(4, budget))),)
  rows = draw(st.integers(1, min(3, budget)))
  return (rows, draw(st.integers(1, min(3, budget // rows))))


@st.composite
def _subtrees(draw, budget: int, depth: int) -> Any:
  """A pytree of float64 zeros holding at most ``budget`` numbers.

  A container (dict, tuple or list) holds one to three children; one at
  ``depth`` 1 holds arrays only, so containers nest one level at most.
  """
  kinds = ["array", "dict", "tuple", "list"] if depth < 2 else ["array"]
  kind = draw(st.sampled_from(kinds))
  if kind == "array":
    return np.zeros(draw(_shapes(budget)))
  num_children = draw(st.integers(1, min(3, budget)))
  children = []
  remaining = budget
  for index in range(num_children):
    # Keep at least one number for each child still to draw.
    child = draw(_subtrees(remaining - (num_children - index - 1), depth + 1))
    remaining -= _size(child)
    children.append(child)
  if kind == "dict":
    return dict(zip(("w", "b", "z"), children))
  return tuple(children) if kind == "tuple" else children


def pytree_templates(max_size: int = MAX_SIZE) -> st.SearchStrategy:
  """Pytrees of float64 zeros: a structure and leaf shapes."""
  return _subtrees(max_size, 0)


seeds = st.integers(0, 2 ** 32 - 1)


# ---------------------------------------------------------------------------
# The problem: f and g read their coefficients from the batch.
# ---------------------------------------------------------------------------


def _log_cosh(z):
  return jnp.logaddexp(z, -z) - jnp.log(2.0)


def _flat_lower(xf, yf, coeffs):
  """Flat ``g(x, y)`` of the module docstring."""
  z = coeffs["d"] @ yf + coeffs["c_soft"] @ xf + coeffs["d0"]
  return (0.5 * yf @ (coeffs["a"] @ yf) - yf @ (coeffs["b"] @ xf)
          + coeffs["gamma"] * jnp.sum(jax.nn.softplus(z)))


def _flat_upper(xf, yf, coeffs):
  """Flat ``f(x, y)`` of the module docstring."""
  return (0.5 * jnp.sum((yf - coeffs["c"]) ** 2)
          + coeffs["beta"] * jnp.sum(_log_cosh(coeffs["e"] @ yf
                                               + coeffs["f"] @ xf))
          + 0.5 * coeffs["lam"] * jnp.sum(xf ** 2)
          + 0.1 * jnp.sum(jnp.sin(xf)))


def _tree_lower(x, y, batch):
  return _flat_lower(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)


def _tree_upper(x, y, batch):
  return _flat_upper(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)


# ravel_pytree of a 1-D array is the array itself, so this one problem serves
# the pytrees and the raveled vectors alike.
PROBLEM = bilevel.Problem(_tree_upper, _tree_lower)


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


@dataclasses.dataclass(frozen=True)
class _Instance:
  """A random problem: coefficients, points and constants.

  Attributes:
    upper: coefficients of ``f`` (the upper batch).
    lower: coefficients of ``g`` (the lower batch).
    unravel_x: flat vector to ``x`` pytree.
    unravel_y: flat vector to ``y`` pytree.
    x, y, v: random flat points (``v`` shaped like ``y``).
    mu, big_l: extreme eigenvalues of ``A``.
    lipschitz_yy: Lipschitz constant of ``grad_y f`` in ``y``.
    lipschitz_xy: Lipschitz constant of ``grad_x f`` in ``y``.
  """
  upper: dict[str, Any]
  lower: dict[str, Any]
  unravel_x: Callable[[jax.Array], Any]
  unravel_y: Callable[[jax.Array], Any]
  x: np.ndarray
  y: np.ndarray
  v: np.ndarray
  mu: float
  big_l: float
  lipschitz_yy: float
  lipschitz_xy: float

  def trees(self, *, y=None, v=None):
    """``(x, y, v)`` as pytrees (flat ``y``/``v`` may be overridden)."""
    return (self.unravel_x(self.x),
            self.unravel_y(self.y if y is None else y),
            self.unravel_y(self.v if v is None else v))

  def upper_grads(self, x, y):
    """Numpy ``(grad_x f, grad_y f)`` at flat ``(x, y)``."""
    u = self.upper
    t = np.tanh(u["e"] @ y + u["f"] @ x)
    return (u["beta"] * u["f"].T @ t + u["lam"] * x + 0.1 * np.cos(x),
            y - u["c"] + u["beta"] * u["e"].T @ t)

  def upper_value(self, x, y):
    """Numpy ``f(x, y)``."""
    u = self.upper
    z = u["e"] @ y + u["f"] @ x
    return (0.5 * np.sum((y - u["c"]) ** 2)
            + u["beta"] * np.sum(np.logaddexp(z, -z) - np.log(2.0))
            + 0.5 * u["lam"] * np.sum(x ** 2) + 0.1 * np.sum(np.sin(x)))

  def lower_derivatives(self, x, y):
    """Numpy ``(grad_y g, H, J')``; ``J' v`` is ``J v``, shaped like ``x``.
    """
    lo = self.lower
    s = _sigmoid(lo["d"] @ y + lo["c_soft"] @ x + lo["d0"])
    curvature = lo["gamma"] * s * (1 - s)
    return (lo["a"] @ y - lo["b"] @ x + lo["gamma"] * lo["d"].T @ s,
            lo["a"] + lo["d"].T @ (curvature[:, None] * lo["d"]),
            -lo["b"].T + lo["c_soft"].T @ (curvature[:, None] * lo["d"]))


def _spd(rng: np.random.Generator, dim: int, condition_number: float
         ) -> tuple[np.ndarray, float, float]:
  """A random SPD matrix with spectrum in ``[1, condition_number]``.

  Returns:
    ``(matrix, mu, L)``: its smallest and largest eigenvalues are exactly 1
    and ``condition_number`` (only ``mu`` when ``dim == 1``).
  """
  eigenvalues = rng.uniform(1.0, condition_number, dim)
  eigenvalues[0] = 1.0
  if dim > 1:
    eigenvalues[-1] = condition_number
  basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  matrix = (basis * eigenvalues) @ basis.T
  return (matrix + matrix.T) / 2, eigenvalues.min(), eigenvalues.max()


def _make_instance(x_template: Any, y_template: Any, seed: int, *,
                   gamma: float) -> _Instance:
  """The module docstring's problem, drawn from ``seed``.

  Args:
    x_template: a pytree with the structure of ``x``.
    y_template: a pytree with the structure of ``y``.
    seed: numpy seed of every coefficient and point.
    gamma: weight of the softplus term of ``g``; 0 makes ``g`` quadratic.
  """
  rng = np.random.default_rng(seed)
  n, m = _size(x_template), _size(y_template)
  a, mu, big_l = _spd(rng, m, rng.uniform(1.5, 20.0))
  lower = dict(a=a, b=rng.normal(size=(m, n)) / math.sqrt(n),
               d=rng.normal(size=(3, m)) / math.sqrt(m),
               c_soft=rng.normal(size=(3, n)) / math.sqrt(n),
               d0=rng.normal(size=3), gamma=np.float64(gamma))
  upper = dict(c=rng.normal(size=m), e=rng.normal(size=(2, m)) / math.sqrt(m),
               f=rng.normal(size=(2, n)) / math.sqrt(n),
               beta=np.float64(0.5), lam=np.float64(0.3))
  norm_e = np.linalg.norm(upper["e"], 2)
  return _Instance(
      upper=upper, lower=lower, unravel_x=ravel_pytree(x_template)[1],
      unravel_y=ravel_pytree(y_template)[1], x=rng.normal(size=n),
      y=rng.normal(size=m), v=rng.normal(size=m), mu=float(mu),
      big_l=float(big_l),
      # grad_y f = y - c + beta E' tanh(E y + F x) and
      # grad_x f = beta F' tanh(E y + F x) + lam x + 0.1 cos x, with tanh
      # 1-Lipschitz.
      lipschitz_yy=1.0 + 0.5 * norm_e ** 2,
      lipschitz_xy=0.5 * norm_e * np.linalg.norm(upper["f"], 2))


# ---------------------------------------------------------------------------
# Assertions.
# ---------------------------------------------------------------------------


def _flat(tree: Any) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0])


def _assert_like(tree: Any, template: Any) -> None:
  """``tree`` has the structure and leaf shapes of ``template``, in float64.
  """
  assert jax.tree.structure(tree) == jax.tree.structure(template), (
      jax.tree.structure(tree), jax.tree.structure(template))
  for leaf, like in zip(jax.tree.leaves(tree), jax.tree.leaves(template)):
    assert jnp.shape(leaf) == np.shape(like), (jnp.shape(leaf),
                                                np.shape(like))
    assert jnp.result_type(leaf) == np.float64, jnp.result_type(leaf)


def _assert_close(actual, expected, rtol: float, atol: float = 1e-13
                  ) -> None:
  """``||actual - expected|| <= rtol ||expected|| + atol`` on flat arrays."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  error = np.linalg.norm(actual - expected)
  assert error <= rtol * np.linalg.norm(expected) + atol, (
      f"error {error:.3e}, reference norm {np.linalg.norm(expected):.3e}, "
      f"{actual=}, {expected=}")


# ---------------------------------------------------------------------------
# 1-2. Derivatives.
# ---------------------------------------------------------------------------


@jax.jit
def _lower_products(x, y, v, coeffs):
  """Every lower-level product of the library, and dense references."""
  grad_y, pullback = derivatives.lower_vjp(PROBLEM, x, y, coeffs)
  cross, hvp = pullback(v)
  value, grad_y2 = derivatives.lower_value_and_grad(PROBLEM, x, y, coeffs)
  grad_y3, hvp2, cross2 = derivatives.lower_hvp_and_cross(PROBLEM, x, y, v,
                                                          coeffs)
  xf, yf = ravel_pytree(x)[0], ravel_pytree(y)[0]
  dense = dict(
      hess=jax.hessian(_flat_lower, 1)(xf, yf, coeffs),
      # d/dx of grad_y g: rows indexed by y, columns by x.
      jac=jax.jacfwd(jax.grad(_flat_lower, 1), 0)(xf, yf, coeffs),
      grad=jax.grad(_flat_lower, 1)(xf, yf, coeffs),
      value=_flat_lower(xf, yf, coeffs))
  return dict(
      grad_y=(grad_y, grad_y2, grad_y3,
              derivatives.lower_grad(PROBLEM, x, y, coeffs)),
      hvp=(hvp, hvp2, derivatives.lower_hvp(PROBLEM, x, y, v, coeffs)),
      cross=(cross, cross2,
             derivatives.lower_cross(PROBLEM, x, y, v, coeffs)),
      value=value, dense=dense)


@_settings(max_examples=15)
@hypothesis.given(x_template=pytree_templates(),
                  y_template=pytree_templates(), seed=seeds)
def test_lower_derivatives_match_dense(x_template, y_template, seed):
  """All lower-level products agree with dense ``H v`` and ``J v``."""
  inst = _make_instance(x_template, y_template, seed, gamma=1.0)
  out = _lower_products(*inst.trees(), inst.lower)
  dense = jax.tree.map(np.asarray, out["dense"])
  expected_hvp = dense["hess"] @ inst.v
  expected_cross = dense["jac"].T @ inst.v
  # The dense references agree with the numpy formulas the later tests use.
  grad, hess, jac_t = inst.lower_derivatives(inst.x, inst.y)
  _assert_close(dense["grad"], grad, rtol=1e-12)
  _assert_close(dense["hess"], hess, rtol=1e-12)
  _assert_close(dense["jac"].T, jac_t, rtol=1e-12)

  for grad_y in out["grad_y"]:
    _assert_like(grad_y, y_template)
    _assert_close(_flat(grad_y), dense["grad"], rtol=1e-13)
  for hvp in out["hvp"]:
    _assert_like(hvp, y_template)
    _assert_close(_flat(hvp), expected_hvp, rtol=1e-12)
  for cross in out["cross"]:
    _assert_like(cross, x_template)
    _assert_close(_flat(cross), expected_cross, rtol=1e-12)
  np.testing.assert_allclose(out["value"], dense["value"], rtol=1e-13)


@jax.jit
def _upper_grads(x, y, coeffs):
  xf, yf = ravel_pytree(x)[0], ravel_pytree(y)[0]
  return (derivatives.upper_value_and_grads(PROBLEM, x, y, coeffs),
          jax.value_and_grad(_flat_upper, (0, 1))(xf, yf, coeffs))


@_settings(max_examples=20)
@hypothesis.given(x_template=pytree_templates(),
                  y_template=pytree_templates(), seed=seeds)
def test_upper_value_and_grads_match_flat_autodiff(x_template, y_template,
                                                   seed):
  """``upper_value_and_grads`` agrees with ``jax.grad`` of the flat ``f``."""
  inst = _make_instance(x_template, y_template, seed, gamma=1.0)
  x, y, _ = inst.trees()
  (value, grad_x, grad_y), (expected_value, expected) = _upper_grads(
      x, y, inst.upper)
  _assert_like(grad_x, x_template)
  _assert_like(grad_y, y_template)
  np.testing.assert_allclose(value, expected_value, rtol=1e-13)
  _assert_close(_flat(grad_x), expected[0], rtol=1e-13)
  _assert_close(_flat(grad_y), expected[1], rtol=1e-13)
  numpy_grads = inst.upper_grads(inst.x, inst.y)
  _assert_close(_flat(grad_x), numpy_grads[0], rtol=1e-12)
  _assert_close(_flat(grad_y), numpy_grads[1], rtol=1e-12)


# ---------------------------------------------------------------------------
# 3. Linear solves.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("terms", "many_terms"))
def _linear_solves(matrix, b, warm, eta, *, terms, many_terms):
  """CG, two Neumann solves, both warm-started, and ``residual_norm``."""
  unravel = ravel_pytree(b)[1]

  def matvec(tree):
    return unravel(matrix @ ravel_pytree(tree)[0])

  dim = matrix.shape[0]
  cg = linear_solve.cg(tol=1e-12, maxiter=dim)
  solution = cg.solve(matvec, b)
  warm_cg = linear_solve.cg(tol=1e-12, maxiter=1).solve(matvec, b, warm)
  neumann = [linear_solve.neumann(step_size=eta, num_terms=k).solve(matvec, b)
             for k in (terms, many_terms)]
  warm_neumann = linear_solve.neumann(step_size=eta, num_terms=5).solve(
      matvec, b, warm)
  return dict(cg=solution, neumann=neumann, warm=(warm_cg, warm_neumann),
              residual=linear_solve.residual_norm(matvec(solution), b))


@_settings(max_examples=20)
@hypothesis.given(b_template=pytree_templates(), seed=seeds,
                  condition_number=st.floats(1.0, 30.0),
                  step_fraction=st.floats(0.25, 1.9),
                  num_terms=st.sampled_from([1, 2, 5, 20, 100, 300]))
def test_linear_solvers_on_random_spd_systems(b_template, seed,
                                              condition_number,
                                              step_fraction, num_terms):
  """CG solves in ``dim`` steps; Neumann obeys its geometric bound.

  With step ``eta = step_fraction / L``, the Neumann iterate after ``K``
  matvecs from ``v_0 = eta b`` is the partial sum
  ``eta sum_{j<=K} (I - eta H)^j b``, whose error is
  ``-(I - eta H)^{K+1} H^{-1} b``, of norm at most ``q^{K+1} ||H^{-1} b||``
  with ``q = max(|1 - eta mu|, |1 - eta L|) < 1``.
  """
  rng = np.random.default_rng(seed)
  unravel = ravel_pytree(b_template)[1]
  dim = _size(b_template)
  matrix, mu, big_l = _spd(rng, dim, condition_number)
  b_flat = rng.normal(size=dim)
  exact = np.linalg.solve(matrix, b_flat)
  eta = step_fraction / big_l
  rate = max(abs(1.0 - eta * mu), abs(1.0 - eta * big_l))
  assert rate < 1.0
  many_terms = max(1, math.ceil(math.log(1e-11) / math.log(max(rate, 1e-3))))
  out = _linear_solves(matrix, unravel(b_flat), unravel(exact), eta,
                       terms=num_terms, many_terms=many_terms)

  def relative_residual(tree):
    return (np.linalg.norm(matrix @ _flat(tree) - b_flat)
            / np.linalg.norm(b_flat))

  # Conjugate gradients terminates in at most dim steps.
  _assert_like(out["cg"], b_template)
  assert relative_residual(out["cg"]) <= 1e-8
  _assert_close(_flat(out["cg"]), exact, rtol=condition_number * 1e-8)

  # Neumann: the geometric bound, and convergence to the CG solution.
  norm_exact = np.linalg.norm(exact)
  for terms, approx in zip((num_terms, many_terms), out["neumann"]):
    _assert_like(approx, b_template)
    error = np.linalg.norm(_flat(approx) - exact)
    bound = rate ** (terms + 1) * norm_exact
    assert error <= bound * (1 + 1e-6) + 1e-13 * norm_exact, (
        terms, error, bound)
  _assert_close(_flat(out["neumann"][1]), _flat(out["cg"]),
                rtol=1e-10 + condition_number * 1e-8)

  # An exact warm start comes back unchanged, with a residual ~ 0.
  for restarted in out["warm"]:
    _assert_like(restarted, b_template)
    _assert_close(_flat(restarted), exact, rtol=1e-12)
    assert relative_residual(restarted) <= 1e-12

  np.testing.assert_allclose(
      out["residual"], np.linalg.norm(matrix @ _flat(out["cg"]) - b_flat),
      rtol=1e-8, atol=1e-15)


# ---------------------------------------------------------------------------
# 4. Hypergradients against the closed form.
# ---------------------------------------------------------------------------


def _closed_form(inst: _Instance) -> tuple[np.ndarray, np.ndarray,
                                             np.ndarray]:
  """``(y*(x), v*, grad Phi(x))`` for a quadratic lower level."""
  a, b = inst.lower["a"], inst.lower["b"]
  y_star = np.linalg.solve(a, b @ inst.x)
  grad_x, grad_y = inst.upper_grads(inst.x, y_star)
  v_star = np.linalg.solve(a, grad_y)
  return y_star, v_star, grad_x + b.T @ v_star


@functools.partial(jax.jit, static_argnames=("maxiter", "num_terms"))
def _implicit(x, y, v, upper, lower, eta, *, maxiter, num_terms):
  """Implicit estimates with CG and Neumann, and the one from ``v``."""
  cg = linear_solve.cg(tol=1e-14, maxiter=maxiter)
  estimate, info = hypergradient.implicit_hypergradient_and_info(
      PROBLEM, x, y, upper, lower, linear_solver=cg)
  neumann = bilevel.implicit_hypergradient(
      PROBLEM, x, y, upper, lower,
      linear_solver=linear_solve.neumann(step_size=eta, num_terms=num_terms))
  _, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(PROBLEM, x, y,
                                                            upper)
  from_v = hypergradient.hypergradient_from_solution(
      PROBLEM, x, y, v, grad_x_f, grad_y_f, lower)
  return estimate, info, neumann, from_v


@_settings(max_examples=12)
@hypothesis.given(x_template=pytree_templates(),
                  y_template=pytree_templates(), seed=seeds,
                  num_terms=st.sampled_from([1, 3, 10, 30]))
def test_implicit_hypergradient_matches_closed_form(x_template, y_template,
                                                    seed, num_terms):
  """AID at ``y*(x)``: the closed form with CG, bounded error with Neumann.

  Here ``J = -B'``, so a Neumann solution ``v_K`` of ``A v = grad_y f``
  (step ``1 / L``) gives the error ``B' (v_K - v*)``, of norm at most
  ``||B|| (1 - mu / L)^{K+1} ||v*||``.
  """
  inst = _make_instance(x_template, y_template, seed, gamma=0.0)
  y_star, v_star, exact = _closed_form(inst)
  estimate, info, neumann, (from_v, residual) = _implicit(
      *inst.trees(y=y_star, v=v_star), inst.upper, inst.lower,
      1.0 / inst.big_l, maxiter=4 * inst.y.size, num_terms=num_terms)
  for tree in (estimate, neumann, from_v):
    _assert_like(tree, x_template)
  _assert_like(info.v, y_template)
  _assert_close(_flat(estimate), exact, rtol=1e-8)
  _assert_close(_flat(info.v), v_star, rtol=1e-8)
  grad_y_f = inst.upper_grads(inst.x, y_star)[1]
  assert info.lower_grad_norm <= 1e-12 * (1 + np.linalg.norm(y_star))
  assert info.linear_residual_norm <= 1e-10 * np.linalg.norm(grad_y_f)
  np.testing.assert_allclose(info.upper_loss, inst.upper_value(inst.x, y_star),
                             rtol=1e-12)
  # From the exact v*, hypergradient_from_solution is the closed form.
  _assert_close(_flat(from_v), exact, rtol=1e-11)
  assert residual <= 1e-11 * np.linalg.norm(grad_y_f)
  # Neumann: the bound implied by the linear solve's.
  rate = 1.0 - inst.mu / inst.big_l
  bound = (np.linalg.norm(inst.lower["b"], 2) * rate ** (num_terms + 1)
           * np.linalg.norm(v_star))
  error = np.linalg.norm(_flat(neumann) - exact)
  assert error <= bound * (1 + 1e-6) + 1e-12 * np.linalg.norm(exact), (
      error, bound)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _unrolled(x, y, upper, lower, eta, *, num_steps):
  return hypergradient.unrolled_hypergradient_and_info(
      PROBLEM, x, y, upper, lower, lower_optimizer=eta, num_steps=num_steps)


@_settings(max_examples=15)
@hypothesis.given(x_template=pytree_templates(),
                  y_template=pytree_templates(), seed=seeds,
                  step_fraction=st.floats(0.25, 1.9),
                  num_steps=st.sampled_from([1, 3, 10, 30, 100]))
def test_unrolled_hypergradient_converges_geometrically(
    x_template, y_template, seed, step_fraction, num_steps):
  """ITD through ``K`` gradient steps: exact truncation, geometric error.

  Gradient descent with step ``eta`` on the quadratic ``g`` gives
  ``y_K - y* = M^K (y_0 - y*)`` with ``M = I - eta A`` and, ``y_0`` being a
  constant, ``dy_K / dx = (I - M^K) A^{-1} B``. So the unrolled
  hypergradient is exactly
  ``grad_x f(x, y_K) + B' A^{-1} (I - M^K) grad_y f(x, y_K)``.
  Subtracting ``grad Phi = grad_x f(x, y*) + B' A^{-1} grad_y f(x, y*)``,
  with ``q = ||M|| = max(|1 - eta mu|, |1 - eta L|) < 1`` and the Lipschitz
  constants of ``grad f`` in ``y``, its error is at most
  ``q^K [(L_xy + ||A^{-1} B|| L_yy) ||y_0 - y*||
  + ||B|| ||A^{-1} grad_y f(x, y_K)||]``.
  """
  inst = _make_instance(x_template, y_template, seed, gamma=0.0)
  a, b = inst.lower["a"], inst.lower["b"]
  y_star, _, exact = _closed_form(inst)
  eta = step_fraction / inst.big_l
  rate = max(abs(1.0 - eta * inst.mu), abs(1.0 - eta * inst.big_l))
  assert rate < 1.0
  x, y, _ = inst.trees()
  estimate, info = _unrolled(x, y, inst.upper, inst.lower, eta,
                             num_steps=num_steps)
  _assert_like(estimate, x_template)
  _assert_like(info.y, y_template)

  # The iterates: y_k = y* + M^k (y_0 - y*).
  contraction = np.eye(inst.y.size) - eta * a
  y_before = y_star + np.linalg.matrix_power(
      contraction, num_steps - 1) @ (inst.y - y_star)
  y_k = y_star + contraction @ (y_before - y_star)
  _assert_close(_flat(info.y), y_k, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(info.upper_loss, inst.upper_value(inst.x, y_k),
                             rtol=1e-10)
  np.testing.assert_allclose(
      info.lower_grad_norm, np.linalg.norm(a @ y_before - b @ inst.x),
      rtol=1e-9, atol=1e-12)

  # The estimate is the truncated closed form...
  grad_x, grad_y = inst.upper_grads(inst.x, y_k)
  a_inv_grad_y = np.linalg.solve(a, grad_y)
  power = np.linalg.matrix_power(contraction, num_steps)
  truncated = grad_x + b.T @ (a_inv_grad_y - power @ a_inv_grad_y)
  _assert_close(_flat(estimate), truncated, rtol=1e-9, atol=1e-12)
  # ... whose distance to the true hypergradient is geometric in K.
  bound = rate ** num_steps * (
      (inst.lipschitz_xy
       + np.linalg.norm(np.linalg.solve(a, b), 2) * inst.lipschitz_yy)
      * np.linalg.norm(inst.y - y_star)
      + np.linalg.norm(b, 2) * np.linalg.norm(a_inv_grad_y))
  error = np.linalg.norm(_flat(estimate) - exact)
  assert error <= bound * (1 + 1e-6) + 1e-12 * np.linalg.norm(exact), (
      error, bound)


# ---------------------------------------------------------------------------
# 5. Structure invariance.
# ---------------------------------------------------------------------------


def _all_estimates(x, y, v, upper, lower, *, with_info: bool):
  """Implicit (CG), unrolled and from-``v`` estimates at ``(x, y)``.

  With ``with_info`` the unrolled estimate comes from
  ``unrolled_hypergradient_and_info``, otherwise from the plain
  ``unrolled_hypergradient``.
  """
  cg = linear_solve.cg(tol=1e-13, maxiter=50)
  implicit, info = hypergradient.implicit_hypergradient_and_info(
      PROBLEM, x, y, upper, lower, linear_solver=cg)
  unrolled_kwargs = dict(lower_optimizer=0.05, num_steps=15)
  if with_info:
    unrolled = hypergradient.unrolled_hypergradient_and_info(
        PROBLEM, x, y, upper, lower, **unrolled_kwargs)[0]
  else:
    unrolled = bilevel.unrolled_hypergradient(PROBLEM, x, y, upper, lower,
                                              **unrolled_kwargs)
  _, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(PROBLEM, x, y,
                                                            upper)
  from_v, residual = hypergradient.hypergradient_from_solution(
      PROBLEM, x, y, v, grad_x_f, grad_y_f, lower)
  return dict(implicit=implicit, v=info.v, unrolled=unrolled, from_v=from_v,
              scalars=jnp.stack([info.upper_loss, info.lower_grad_norm,
                                 residual]),
              cg_residual=info.linear_residual_norm,
              grad_y_f_norm=optax.tree.norm(grad_y_f))


@jax.jit
def _on_trees_and_flat(trees, flat, upper, lower):
  return (_all_estimates(*trees, upper, lower, with_info=True),
          _all_estimates(*flat, upper, lower, with_info=False))


@_settings(max_examples=10)
@hypothesis.given(x_template=pytree_templates(),
                  y_template=pytree_templates(), seed=seeds)
def test_hypergradients_do_not_depend_on_the_pytree_structure(
    x_template, y_template, seed):
  """Pytree and raveled problems give the same (raveled) estimates.

  The lower level is not quadratic and ``y`` is an arbitrary point: the
  estimators are compared with each other, not with the true gradient.
  """
  inst = _make_instance(x_template, y_template, seed, gamma=1.0)
  on_trees, on_flat = _on_trees_and_flat(
      inst.trees(), (inst.x, inst.y, inst.v), inst.upper, inst.lower)
  for name, template in [("implicit", x_template), ("unrolled", x_template),
                         ("from_v", x_template), ("v", y_template)]:
    _assert_like(on_trees[name], template)
    _assert_close(_flat(on_trees[name]), on_flat[name], rtol=1e-10,
                  atol=1e-14)
  np.testing.assert_allclose(on_trees["scalars"], on_flat["scalars"],
                             rtol=1e-10, atol=1e-14)
  # The residuals of converged CG solves are rounding errors, which differ:
  # both are tiny.
  for out in (on_trees, on_flat):
    assert out["cg_residual"] <= 1e-11 * out["grad_y_f_norm"], (
        out["cg_residual"], out["grad_y_f_norm"])
