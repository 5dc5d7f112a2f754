r"""LV-HBA: a Hessian-free single loop for lower levels with coupled constraints.

Yao, Yu, Zeng & Zhang solve

.. math::

   \min_{(x, y) \in C} F(x, y) \quad \text{s.t.} \quad
   y \in \arg\min_{y' \in Y} \{\, f(x, y') : c(x, y') \le 0 \,\}

where the lower objective :math:`f` (our ``Problem.lower``, :math:`g` in the
rest of this library) is convex in :math:`y` but need not be strongly convex,
and the constraints :math:`c` (``Problem.lower_constraints``) may involve
:math:`x`. The lower level is replaced by the proximal Lagrangian value
function

.. math::

   v_\gamma(x, y, z) = \min_{\theta \in Y} \max_{\lambda \in Z}\;
   f(x, \theta) + \langle \lambda, c(x, \theta) \rangle
   + \tfrac{1}{2\gamma_1} \|\theta - y\|^2
   - \tfrac{1}{2\gamma_2} \|\lambda - z\|^2,

with :math:`Z = [0, u]^l`, and the problem by the penalised single level
:math:`\min_{(x, y) \in C,\, z \in Z}\ F/c_k + f - v_\gamma` with
:math:`c_k = \underline{c}\,(k + 1)^p` increasing. Iteration :math:`k` is
one descent-ascent step on the saddle point :math:`(\theta, \lambda)`,
then one projected gradient step on :math:`(x, y, z)` through Danskin's
formula at the new :math:`(\theta^{k+1}, \lambda^{k+1})`:

.. math::

   d_\theta &= \nabla_y f(x^k, \theta^k)
       + \nabla_y c(x^k, \theta^k)^\top \lambda^k
       + (\theta^k - y^k) / \gamma_1 \\
   d_\lambda &= -c(x^k, \theta^k) + (\lambda^k - z^k) / \gamma_2 \\
   \theta^{k+1} &= \Pi_Y(\theta^k - \eta_k d_\theta), \qquad
   \lambda^{k+1} = \Pi_Z(\lambda^k - \eta_k d_\lambda) \\
   d_x &= \nabla_x F(x^k, y^k) / c_k + \nabla_x f(x^k, y^k)
       - \nabla_x f(x^k, \theta^{k+1})
       - \nabla_x c(x^k, \theta^{k+1})^\top \lambda^{k+1} \\
   d_y &= \nabla_y F(x^k, y^k) / c_k + \nabla_y f(x^k, y^k)
       - (y^k - \theta^{k+1}) / \gamma_1 \\
   d_z &= -(\lambda^{k+1} - z^k) / \gamma_2 \\
   (x^{k+1}, y^{k+1}) &= \Pi_C\bigl((x^k, y^k) - \alpha_k (d_x, d_y)\bigr),
   \qquad z^{k+1} = \Pi_Z(z^k - \beta_k d_z).

No Hessian and no Hessian-vector product: per step one gradient of
:math:`F`, three gradients of :math:`f` and two vector-Jacobian products of
the constraints. Equality constraints :math:`e(x, y) = 0`
(``Problem.lower_equality_constraints``) enter the Lagrangian the same way
with multipliers in :math:`[-u, u]`; writing them as the pair of
inequalities :math:`e \le 0,\ -e \le 0` is a different iteration (two
nonnegative multipliers whose difference plays the part of one) that
reaches the same solutions. :math:`\Pi_Y` (for :math:`\theta`) is
``project_y``.

**Which y to use.** The paper's :math:`y^k` above is ``state.y_penalized``
(``bilevel.run(...).y_penalized``): it descends :math:`F / c_k + f -
v_\gamma`, so it is fitted to the upper (validation) data, and
:math:`\theta` is a proximal point of the lower level pulled towards it,
so neither is a model of the lower problem alone. It approaches the
optimistic lower solution (the lower minimiser best for :math:`F`) as
:math:`c_k` grows: report it when lower solutions are not unique and that
solution is wanted.

* *Without lower constraints* (no ``lower_constraints``,
  ``lower_equality_constraints`` or ``project_xy``; ``project_y`` allowed),
  the lower feasible set is :math:`Y` and ``state.y``
  (``bilevel.run(...).y``) is a lower iterate of our own,

  .. math:: w^{k+1} = \Pi_Y\bigl(w^k - \eta_k \nabla_y f(x^k, w^k)\bigr),
     \qquad w^0 = y^0,

  on the step's lower batch, warm-started, one lower gradient per step. It
  never reads :math:`y^k`, :math:`\theta^k` or :math:`F`, so it depends on
  the upper data only through :math:`x`, and it does not enter the
  update of :math:`(x, y, z, \theta, \lambda)`: it is the model to
  evaluate or deploy. Like the lower iterate of a single-loop method it
  follows :math:`\arg\min_Y f(x^k, \cdot)` at the rate of one step per
  change of :math:`x`.
* *With lower constraints*, ``state.y`` is the paper's :math:`y^k`, the
  same array as ``state.y_penalized``, and the solver does not spend the
  extra gradient. A lower iterate would need the projection onto the
  slice :math:`\{y \in Y : c(x, y) \le 0,\ e(x, y) = 0\}` at the
  current :math:`x`; ``project_xy`` is the projection onto the joint set
  :math:`C`, which moves :math:`x` too (and may hold upper constraints,
  as :math:`Bx = 0` in the LLSC toy), so it is not that projection, and
  stepping on the Lagrangian instead would leave the iterate infeasible.
  Here ``state.y`` is feasible for :math:`x` (it is kept in :math:`C`),
  ``info.lower_gap`` estimates :math:`f - v_\gamma` at it, and it has
  seen the upper data.

**The joint set** :math:`C`. The reformulation holds only where ``y`` is
feasible for ``x``: at an infeasible ``y`` the maximisation over
:math:`\lambda` makes :math:`-v_\gamma` concave, and the penalised objective
is unbounded below once :math:`F / c_k` no longer compensates (without
:math:`C` the LLC toy diverges at every setting we tried). So
:math:`\Pi_C` must keep ``y`` feasible,
:math:`C \subseteq \{(x, y) : c(x, y) \le 0,\ e(x, y) = 0\}`, as in the
paper's experiments; intersecting :math:`C` with that set removes no
solution of the bilevel problem, since :math:`y \in S(x)` implies it. At
``init``, once per layout of ``(x, y)``:

* with ``Problem.project_xy``: it is :math:`\Pi_C`. It is checked at two
  test points (random entries of scale 1 and 10): the projected points must
  satisfy the constraints (to :math:`\epsilon^{1/3}(1 + 10 s)` at scale
  :math:`s`, :math:`\epsilon` the machine epsilon) and, if ``project_x`` or
  ``project_y`` is set, lie in :math:`X \times Y`; otherwise ``init``
  raises ``ValueError``;
* without it, with constraints: if ``lower_constraints`` and
  ``lower_equality_constraints`` are affine in ``(x, y)``, :math:`\Pi_C` is
  built from their matrices (:func:`bilevel.constraints.linear_form` says
  how affinity is detected: the linearisation at one random point must
  predict the values at two others, and a directional derivative must agree
  at two points). Rows :math:`\pm(g^\top v - b) \le 0` count as one
  equality. The projection is exact with equalities only
  (:func:`bilevel.projections.affine`) or inequality rows orthogonal to each
  other and to the equalities
  (:func:`bilevel.projections.orthogonal_halfspaces`), and otherwise the QP
  of :func:`bilevel.projections.polyhedron` (feasible to about 1e-8, and far
  slower: write an exact projection when the set has structure). With
  ``project_x`` or ``project_y`` as well, the set is the intersection with
  :math:`X \times Y`: accepted when the constraint rows do not involve the
  projected variable (the projection is then the product), refused
  otherwise. Constraints that are not affine are refused, with a message
  that names ``project_xy`` and how to build it;
* without constraints: :math:`\Pi_C` is ``project_xy`` if set, else
  ``project_x`` and ``project_y``.

**Normalised constraints** (``normalize_constraints=True``, the default).
The descent-ascent step on :math:`(\theta, \lambda)` is simultaneous, so it
is stable only when :math:`\eta` is small against
:math:`(1/\gamma_1 + 1/\gamma_2) / \sigma^2`, with :math:`\sigma` the
spectral norm of :math:`\nabla_y (c, e)`: :math:`\sigma = \sqrt{200}` on the
LLC toy, whose one constraint sums 300 coordinates. We run the iteration on
the equivalent constraints :math:`(c, e) / \sigma`. Written in the
multipliers of the constraints as given, only two terms change:

.. math::

   d_\lambda = -c(x^k, \theta^k) / \sigma^2 + (\lambda^k - z^k) / \gamma_2,
   \qquad \text{and } v_\gamma \text{ has }
   -\tfrac{\sigma^2}{2\gamma_2}\|\lambda - z\|^2;

the feasible set, the solutions and the KKT multipliers are unchanged
(``state.multipliers`` and :math:`u` refer to the constraints as written).
:math:`\sigma` is the spectral norm of the ``y`` columns of the matrices
when :math:`C` was built from affine constraints, and otherwise the largest
of 50 power iterations at the projected test points.
``normalize_constraints=False`` runs the paper's iteration (:math:`\sigma =
1`); a number sets :math:`\sigma`.

**Defaults** (ours): :math:`\alpha = \eta = 0.3`, :math:`\beta = 0.1`,
:math:`\gamma_1 = 10`, :math:`\gamma_2 = 1`,
:math:`c_k = 2\,(k + 1)^{1/2}`, :math:`u = 1000`, normalised constraints.
Measured in float64 (``tests/test_lvhba.py``): on the LLC toy
(:math:`n = 100`, :math:`x^0 = \mathbf 1`, :math:`y^0 = 0`, the coupling as
one equality or as two inequalities, no ``project_xy``) the relative error
to :math:`x^*` is 6.5e-4 after 60,000 steps, with the coupling satisfied to
1e-13 and the multiplier at its KKT value :math:`-1`; on a box lower level
(:math:`g = \tfrac12\|y - x\|^2`, :math:`Y = [0, 1]^3`, an upper objective
of curvature 0.1 in ``x``) it is 5.2e-4 after 60,000 steps. What limits
them:

* the bias shrinks like :math:`1 / c_k` (:math:`0.3 / c_k` in relative
  error on the LLC toy), while ``x`` progresses like
  :math:`\alpha \mu \sum_k 1 / c_k` (:math:`\mu` the curvature of
  :math:`\Phi`): a faster penalty lowers the bias and slows ``x``; these
  settings balance the two problems above. :math:`p = 1/2` is the edge of
  the analysis's range :math:`(0, 1/2)`, as in the official SVM code;
* :math:`\alpha` is bounded by the curvature of :math:`f - v_\gamma` in
  ``(x, y)``, about that of :math:`f`: on :math:`f = \tfrac12\|Ay - x\|^2`
  (curvature 4.6 in ``(x, y)``) :math:`\alpha = 0.4` converges and 0.5
  diverges; lower :math:`\alpha` and :math:`\eta` on stiffer lower levels;
* :math:`\eta \ge \alpha` keeps :math:`\theta` ahead of ``y``; we measured
  no setting with :math:`\eta < \alpha` that converged on the LLC toy;
* settings tuned for the paper's iteration do not carry over to the
  normalised one: on the SVM problems of :mod:`problems.constrained`
  (:math:`\sigma \approx 62`) the settings of ``paper_repro/lvhba`` need
  ``normalize_constraints=False`` (with normalisation their
  :math:`\eta = 0.001` leaves :math:`\lambda` nearly frozen). With the
  defaults, hyper-cleaning on breast cancer lowers the validation loss from
  0.037 to -0.009 in 1000 steps, but does not single out the flipped labels
  as those settings do (recall 0.39 against 0.81).

**The official settings** are in :data:`OFFICIAL_SETTINGS` (``"llc"``,
``"llsc"``, ``"svm"``: the values of the official scripts, with
``normalize_constraints=False``); pass them as
``lvhba(problem, **OFFICIAL_SETTINGS["llc"])``. On the LLC toy they do not
converge (the iteration map has spectral radius 1.011-1.014; see
``paper_repro/lvhba``). We read them from the code; we could not check the
values stated in the paper's text against them.

The official code deviates from the paper; we follow the paper:

* its SVM and data-cleaning scripts never update the hyperparameter (the
  gradient step is the out-of-place ``C.data.add(...)``, whose result is
  discarded), never update :math:`z`, and leave :math:`\lambda` unprojected;
  a variant updates :math:`z` along the hyperparameter's gradient and sets
  :math:`\eta = 0`;
* its toy clips the multiplier of an inequality to :math:`[-u, u]`, letting
  it go negative, and imposes the coupling constraint through a projection
  of :math:`(x, y)` instead;
* it projects onto :math:`C` with a CPU QP solver (cvxpy/ECOS, tolerance up
  to 2) at every iteration and swallows its failures; here every projection
  is traced into the compiled step (see :mod:`bilevel.projections`);
* the direction of the penalty flips between scripts (one multiplies
  :math:`F` by an increasing :math:`(k + 1)^{0.3}`), and the SVM scripts
  write :math:`1/\gamma` where the toys write :math:`\gamma`.

**Accuracy on unconstrained lower levels.** LV-HBA's penalty grows like
:math:`c_k = 2 (k + 1)^{1/2}`, so it approaches ``x*`` slowly where a
hypergradient method converges linearly. On the quadratics of
``tests/conformance/quadratics.py`` (x in R^50, y in R^40, lower level
1-smooth and mu = 1/kappa strongly convex, no constraints), the defaults
stop at relative error 4.8e-2 (kappa = 2) and 0.51 (kappa = 100) after 5000
steps, and 4.7e-3 and 0.18 after 50000. A larger ``penalty_base`` is worse
(c = 20: 0.41 and 0.52 after 20000 steps; c = 200: 0.88 and 0.91), and the
theory caps ``penalty_power`` at 1/2; we found no setting that removes the
gap faster than more steps. For a strongly convex lower level without
coupling constraints, :func:`bilevel.solvers.aid` or
:func:`bilevel.solvers.soba` reach ``x*`` (``tests/test_defaults.py``
checks the 50000-step figure at kappa = 2).

References:
  Yao, Yu, Zeng & Zhang, "Constrained bi-level optimization: proximal
  Lagrangian value function approach and Hessian-free algorithm", ICLR 2024
  (Algorithm 1).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bilevel import _base, _data, constraints, derivatives
from bilevel._problem import Problem
from bilevel._validation import as_schedule, check_positive, check_schedule

PyTree = Any

# The official code's settings, per experiment (see the module docstring).
OFFICIAL_SETTINGS = {
    # Toy-example/LLC/LV-HBA.py: alpha, beta, eta, gamma1, gamma2, u and
    # c_k = 0.025 (k + 1)^0.3.
    "llc": dict(step_size=0.008, z_step_size=0.02, saddle_step_size=0.01,
                gamma1=10.0, gamma2=10.0, multiplier_bound=1000.0,
                penalty_base=0.025, penalty_power=0.3,
                normalize_constraints=False),
    # Toy-example/LLSC/LV-HBA.py: c_k = (k + 1)^0.3.
    "llsc": dict(step_size=0.1, z_step_size=0.1, saddle_step_size=0.1,
                 gamma1=0.1, gamma2=1.0, penalty_base=1.0, penalty_power=0.3,
                 normalize_constraints=False),
    # Hyperparameter optimization/Linear SVM/*/LV-HBA.py: the code
    # multiplies by 1/gamma = 0.1 and weighs F by (k + 1)^-0.5.
    "svm": dict(step_size=0.01, z_step_size=0.1, saddle_step_size=0.01,
                gamma1=10.0, gamma2=10.0, penalty_base=1.0,
                penalty_power=0.5, normalize_constraints=False),
}


class LVHBAState(NamedTuple):
  r"""State of :func:`lvhba`.

  Attributes:
    x: upper variable :math:`x^k`.
    y: without lower constraints (no ``lower_constraints``,
      ``lower_equality_constraints`` or ``project_xy``), the lower iterate
      :math:`w^k`: projected gradient steps on :math:`f(x^k, \cdot)` over
      :math:`Y` alone, which never see the upper data. With lower
      constraints, the paper's :math:`y^k` (equal to ``y_penalized``):
      LV-HBA then has no iterate of the lower problem alone (see the module
      docstring, "Which y to use"). What :func:`bilevel.run` reports as
      ``result.y``.
    y_penalized: the paper's :math:`y^k`, fitted to :math:`F / c_k + f -
      v_\gamma` (``result.y_penalized``).
    z: proximal centre of the multipliers, :math:`z^k`, a pair
      ``(inequality, equality)`` shaped like the constraint values (``()``
      for an absent kind).
    theta: :math:`\theta^k`, the proximal lower point.
    multipliers: :math:`\lambda^k`, a pair like ``z``.
    sampler: minibatch sampler state.
    num_steps: :math:`k`.
  """
  x: PyTree
  y: PyTree
  y_penalized: PyTree
  z: tuple[PyTree, PyTree]
  theta: PyTree
  multipliers: tuple[PyTree, PyTree]
  sampler: _data.SamplerState
  num_steps: jax.Array


class LVHBAInfo(NamedTuple):
  r"""Diagnostics of one step (at :math:`(x^k, y^k)` and the new saddle).

  :math:`y^k` is the paper's, ``state.y_penalized``.

  Attributes:
    upper_loss: :math:`F(x^k, y^k)` on the upper batch.
    lower_grad_norm: :math:`\|d_\theta\|`, the saddle step's
      :math:`\theta`-gradient.
    hypergradient_norm: :math:`\|d_x\|`.
    lower_gap: :math:`f(x^k, y^k) - \hat v`, where :math:`\hat v` is the
      proximal Lagrangian at :math:`(\theta^{k+1}, \lambda^{k+1})`: an
      estimate of the reformulation's constraint :math:`f - v_\gamma \ge 0`
      (negative while :math:`(\theta, \lambda)` is far from the saddle
      point, or while ``y`` is infeasible).
    constraint_violation: :func:`bilevel.constraints.violation` at
      :math:`(x^k, y^k)`.
    multiplier_norm: :math:`\|\lambda^{k+1}\|`.
    penalty: :math:`c_k`.
  """
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  lower_gap: jax.Array
  constraint_violation: jax.Array
  multiplier_norm: jax.Array
  penalty: jax.Array


def _lagrangian(problem: Problem, x, theta, multipliers, batch):
  """``f(x, theta) + <lambda, (c, e)(x, theta)>`` and the constraint values."""
  values = constraints.values(problem, x, theta)
  pairing = optax.tree.vdot(multipliers, values) if jax.tree.leaves(
      values) else 0.0
  return problem.lower(x, theta, batch) + pairing, values


def _as_penalty_schedule(penalty_base, penalty_power) -> Callable:
  if callable(penalty_base):
    check_schedule("penalty_base", penalty_base)
    return penalty_base
  check_positive("penalty_base", penalty_base)
  if not isinstance(penalty_power, (int, float)) or not (
      0.0 < penalty_power <= 0.5):
    raise ValueError(
        "penalty_power is the exponent p of c_k = penalty_base (k + 1)^p; "
        f"the analysis needs 0 < p < 1/2 (the code uses up to 1/2); got "
        f"{penalty_power!r}.")

  def schedule(count):
    return penalty_base * (count + 1.0) ** penalty_power

  return schedule


def _check_normalize(value) -> None:
  if isinstance(value, bool):
    return
  if isinstance(value, numbers.Real) and math.isfinite(value) and value > 0:
    return
  raise ValueError(
      "normalize_constraints must be True (divide the constraints by the "
      "spectral norm of their y-Jacobian, measured at init), False (use them "
      f"as written) or a positive scale; got {value!r}.")


# ---------------------------------------------------------------------------
# The joint set C and the constraint scale, read once per (x, y) layout.


class _Setup(NamedTuple):
  r"""What ``init`` reads from the problem for one layout of ``(x, y)``.

  Attributes:
    project: ``(x, y) -> (x, y)``, the projection onto C.
    scale: :math:`\sigma`, the constraints are divided by it.
    built: whether ``project`` was built from affine constraints.
  """
  project: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]
  scale: float
  built: bool


def _signature(x, y):
  leaves, treedef = jax.tree.flatten((x, y))
  return treedef, tuple((jnp.shape(leaf), jnp.result_type(leaf))
                        for leaf in leaves)


def _constraint_fields(problem: Problem) -> str:
  return " and ".join(
      f"Problem.{name}" for name in ("lower_constraints",
                                     "lower_equality_constraints")
      if getattr(problem, name) is not None)


_HOW_TO_BUILD = (
    "bilevel.projections builds it for linear constraints G v <= h, M v = r "
    "in v = jax.flatten_util.ravel_pytree((x, y))[0]: "
    "bilevel.projections.joint(bilevel.projections.affine(M, r)) for "
    "equalities (exact), bilevel.projections.joint("
    "bilevel.projections.polyhedron(G, h, M, r)) with inequalities (a QP "
    "inside the step); for other convex sets write the projection.")


def _sample_points(x, y, seed: int = 1):
  """Two concrete ``(x, y)`` pairs: N(0, 1) and N(0, 10^2) entries."""
  _, n, dtype, unravel = constraints.flat_layout(x, y)
  rng = np.random.default_rng(seed)
  with jax.ensure_compile_time_eval():
    return [(scale, unravel(jnp.asarray(scale * rng.standard_normal(n),
                                        dtype))) for scale in (1.0, 10.0)]


def _tolerance(x, y) -> float:
  dtype = constraints.flat_layout(x, y)[2]
  return float(np.finfo(np.dtype(dtype)).eps ** (1.0 / 3.0))


def _check_joint_set(problem: Problem, project, x, y, built: bool) -> list:
  """Checks C at projected sample points; returns those points.

  Raises:
    ValueError: if projected points violate the lower constraints (C does
      not keep y feasible), or leave X x Y.
  """
  tol = _tolerance(x, y)
  projected = []
  with jax.ensure_compile_time_eval():
    for scale, (px, py) in _sample_points(x, y):
      px, py = jax.jit(project)(px, py)
      projected.append((px, py))
      bound = tol * (1.0 + 10.0 * scale)
      violation = float(constraints.violation(problem, px, py))
      if not violation <= bound:
        if built:
          raise ValueError(
              "bilevel.solvers.lvhba: the projection built from the affine "
              f"constraints ({_constraint_fields(problem)}) leaves them "
              f"violated by {violation:.3g} at a test point: the feasible "
              "set may be empty, or the QP of bilevel.projections.polyhedron "
              "did not converge. Pass Problem.project_xy. " + _HOW_TO_BUILD)
        raise ValueError(
            "bilevel.solvers.lvhba: Problem.project_xy does not keep y "
            "feasible: at project_xy(x, y) of a test point the lower "
            f"constraints ({_constraint_fields(problem)}) are violated by "
            f"{violation:.3g}. LV-HBA needs the joint set C inside "
            "{(x, y) : c(x, y) <= 0, e(x, y) = 0}; with an infeasible y its "
            "penalised objective is unbounded below. Make project_xy "
            "project onto the intersection of C with that set, or leave it "
            "None when the constraints are affine (the solver then builds "
            "the projection). " + _HOW_TO_BUILD)
      for name, own, value in (("project_x", problem.project_x, px),
                               ("project_y", problem.project_y, py)):
        if own is None:
          continue
        moved = float(optax.tree.norm(optax.tree.sub(own(value), value),
                                      ord=jnp.inf))
        if not moved <= bound:
          raise ValueError(
              f"bilevel.solvers.lvhba: Problem.{name} moves points of "
              f"Problem.project_xy (by {moved:.3g} at a test point). "
              "LV-HBA projects (x, y) with project_xy alone, so its set "
              "must lie inside X x Y; include X and Y in project_xy "
              f"(Problem.{name} still applies to the lower point theta).")
  return projected


def _y_jacobian_norm(problem: Problem, x, y, num_iterations: int = 50):
  """Power iteration for the spectral norm of the y-Jacobian of (c, e)."""
  flat_y, unravel_y = ravel_pytree(y)

  def values(v):
    return ravel_pytree(constraints.values(problem, x, unravel_y(v)))[0]

  _, forward = jax.linearize(values, flat_y)
  backward = jax.linear_transpose(forward, flat_y)
  start = jnp.asarray(np.random.default_rng(2).standard_normal(
      flat_y.size), flat_y.dtype)

  def body(_, carry):
    u, _ = carry
    w = backward(forward(u))[0]
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1.0), norm

  _, norm = jax.lax.fori_loop(0, num_iterations, body,
                              (start / jnp.linalg.norm(start),
                               jnp.zeros((), flat_y.dtype)))
  return jnp.sqrt(norm)


def _setup(problem: Problem, x, y, normalize) -> _Setup:
  r"""The projection onto C and the scale :math:`\sigma` (see ``lvhba``)."""
  has_constraints = (problem.lower_constraints is not None or
                     problem.lower_equality_constraints is not None)
  if not has_constraints:
    if problem.project_xy is None:
      def project(x, y):
        return problem.projected_x(x), problem.projected_y(y)
      return _Setup(project, 1.0, False)
    if problem.project_x is not None or problem.project_y is not None:
      _check_joint_set(problem, problem.project_xy, x, y, built=False)
    return _Setup(problem.project_xy, 1.0, False)

  if problem.project_xy is not None:
    project, built = problem.project_xy, False
    scale = None
  else:
    try:
      form = constraints.linear_form(problem, x, y)
    except ValueError as error:
      raise ValueError(f"bilevel.solvers.lvhba: {error}") from error
    if form is None:
      raise ValueError(
          f"bilevel.solvers.lvhba: the lower constraints "
          f"({_constraint_fields(problem)}) are not affine in (x, y) "
          "(checked at random points), and the problem has no "
          "Problem.project_xy. LV-HBA keeps y feasible for x by projecting "
          "(x, y) onto a convex set C inside {(x, y) : c(x, y) <= 0, "
          "e(x, y) = 0} at every step; without it the constraints would "
          "act only through the multipliers, and the iteration diverges. "
          "Pass Problem.project_xy, the Euclidean projection onto that set "
          "(intersected with X x Y). " + _HOW_TO_BUILD)
    matrix = np.concatenate([form.inequality_matrix, form.equality_matrix])
    uses_x = bool(np.any(matrix[:, :form.num_x]))
    uses_y = bool(np.any(matrix[:, form.num_x:]))
    for name, own, uses in (("project_x", problem.project_x, uses_x),
                            ("project_y", problem.project_y, uses_y)):
      if own is not None and uses:
        raise ValueError(
            f"bilevel.solvers.lvhba: the problem has lower constraints "
            f"({_constraint_fields(problem)}) on the variable that "
            f"Problem.{name} projects, and no Problem.project_xy. LV-HBA "
            "projects (x, y) onto one set, the intersection of X x Y with "
            "{(x, y) : c(x, y) <= 0, e(x, y) = 0}, and projecting onto each "
            "set in turn is not the projection onto their intersection. "
            "Pass Problem.project_xy for the intersection (a box adds rows "
            f"to G, h below); Problem.{name} may stay, for the lower point "
            "theta. " + _HOW_TO_BUILD)
    flat_projection = constraints.feasible_set_projection(form)

    def project(x, y):
      # The constraint rows and X x Y involve disjoint variables (checked
      # above), so the product of the projections is the projection.
      x, y = flat_projection(x, y)
      return problem.projected_x(x), problem.projected_y(y)

    built = True
    scale = float(np.linalg.norm(matrix[:, form.num_x:], 2)) if (
        matrix.size) else 0.0
  projected = _check_joint_set(problem, project, x, y, built)
  if normalize is False:
    scale = 1.0
  elif normalize is not True:
    scale = float(normalize)
  elif scale is None:
    with jax.ensure_compile_time_eval():
      norm = jax.jit(lambda a, b: _y_jacobian_norm(problem, a, b))
      scale = max(float(norm(px, py)) for px, py in projected)
  return _Setup(project, scale if scale > 0 else 1.0, built)


def lvhba(problem: Problem, *, step_size: Any = 0.3,
          z_step_size: Any = 0.1, saddle_step_size: Any = 0.3,
          gamma1: float = 10.0, gamma2: float = 1.0,
          multiplier_bound: float = 1000.0, penalty_base: Any = 2.0,
          penalty_power: float = 0.5,
          normalize_constraints: bool | float = True
          ) -> _base.BilevelSolver:
  r"""LV-HBA (see the module docstring for the update rule).

  Args:
    problem: the bilevel problem; its lower constraints
      (``lower_constraints``, ``lower_equality_constraints``) may couple
      ``x`` and ``y``. Without constraints the method still applies
      (a value-function method for convex, not necessarily strongly convex,
      lower levels).
    step_size: :math:`\alpha_k`, the step on ``(x, y)`` (number or schedule).
    z_step_size: :math:`\beta_k`, the step on ``z``.
    saddle_step_size: :math:`\eta_k`, the descent-ascent step on
      :math:`(\theta, \lambda)`; without lower constraints, also the step
      of the lower iterate ``state.y``.
    gamma1: :math:`\gamma_1 > 0`, the proximal parameter of :math:`\theta`.
    gamma2: :math:`\gamma_2 > 0`, the proximal parameter of :math:`\lambda`.
    multiplier_bound: :math:`u`, the bound of the multiplier box :math:`Z`
      (``math.inf``: none). The analysis needs it finite and larger than the
      lower level's multipliers.
    penalty_base: :math:`\underline{c} > 0`, or a schedule ``k -> c_k``.
    penalty_power: :math:`p \in (0, 1/2]` of
      :math:`c_k = \underline{c}\,(k + 1)^p` (ignored for a schedule).
    normalize_constraints: ``True``: run the iteration on the constraints
      divided by :math:`\sigma`, the spectral norm of their Jacobian in
      ``y`` (see the module docstring); ``False``: on the constraints as
      written (the paper's iteration); a positive number: that
      :math:`\sigma`.

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`LVHBAState` and
    :class:`LVHBAInfo`. ``init(x, y, *, key=None, data=None)`` reads the
    joint set and :math:`\sigma` (once per layout of ``(x, y)``), and
    starts ``state.y`` and ``state.y_penalized`` at ``y``, and from
    :math:`\theta^0 = \Pi_Y(y^0)` and
    :math:`\lambda^0 = z^0 = 0`. One step costs ``1 Gf + 3 Gg``, two
    vector-Jacobian products and two evaluations of the constraints, and
    the projections; without lower constraints, one more ``Gg`` for the
    lower iterate ``state.y`` (``1 Gf + 4 Gg``).

  Raises:
    ValueError: at ``init``, if the problem has lower constraints that
      LV-HBA cannot keep satisfied (see the module docstring), with a
      message naming ``Problem.project_xy`` and how to build it.
  """
  if not isinstance(problem, Problem):
    raise TypeError("bilevel.solvers.lvhba expects a bilevel.Problem as its "
                    f"first argument; got {type(problem).__name__}.")
  steps = {name: as_schedule(name, value) for name, value in (
      ("step_size", step_size), ("z_step_size", z_step_size),
      ("saddle_step_size", saddle_step_size))}
  check_positive("gamma1", gamma1)
  check_positive("gamma2", gamma2)
  if multiplier_bound != math.inf:
    check_positive("multiplier_bound", multiplier_bound)
  penalty_fn = _as_penalty_schedule(penalty_base, penalty_power)
  _check_normalize(normalize_constraints)
  # Without lower constraints the lower feasible set is Y and the lower
  # iterate w (state.y) is tracked; with them, state.y is the paper's y.
  tracks_lower = not problem.has_lower_constraints
  setups = {}

  def setup(x, y) -> _Setup:
    key = _signature(x, y)
    if key not in setups:
      setups[key] = _setup(problem, x, y, normalize_constraints)
    return setups[key]

  def init(x, y, *, key=None, data=None) -> LVHBAState:
    sampler = _base.prepare(problem, x, y, data, key)
    setup(x, y)
    values = jax.tree.map(jnp.zeros_like,
                          constraints.values(problem, x, y))
    return LVHBAState(x=x, y=y, y_penalized=y, z=values,
                      theta=problem.projected_y(y), multipliers=values,
                      sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: LVHBAState, data=None):
    _base.check_step_data(state.sampler, data)
    project, scale, _ = setup(state.x, state.y_penalized)
    # The constraints divided by sigma, in the multipliers' own units.
    inverse_square = 1.0 / scale ** 2
    k = state.num_steps
    alpha, beta, eta = (steps[name](k) for name in (
        "step_size", "z_step_size", "saddle_step_size"))
    x, y, z = state.x, state.y_penalized, state.z
    theta, multipliers = state.theta, state.multipliers
    upper_batch, sampler = _data.sample(state.sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")

    # (1) One descent-ascent step on the proximal Lagrangian at (x^k, y^k).
    (_, values), grad_theta = jax.value_and_grad(
        _lagrangian, argnums=2, has_aux=True)(problem, x, theta, multipliers,
                                              lower_batch)
    d_theta = jax.tree.map(lambda g, t, y_: g + (t - y_) / gamma1,
                           grad_theta, theta, y)
    d_multipliers = jax.tree.map(
        lambda c, m, z_: -c * inverse_square + (m - z_) / gamma2, values,
        multipliers, z)
    theta = problem.projected_y(jax.tree.map(lambda t, d: t - eta * d,
                                             theta, d_theta))
    multipliers = constraints.project_multipliers(
        jax.tree.map(lambda m, d: m - eta * d, multipliers, d_multipliers),
        multiplier_bound)

    # (2) One projected gradient step on F / c_k + f - v_gamma.
    upper_loss, grad_x_upper, grad_y_upper = (
        derivatives.upper_value_and_grads(problem, x, y, upper_batch))
    # In the iterates' precision (a float64 c_k would promote a float32 run).
    c_k = jnp.asarray(penalty_fn(k.astype(upper_loss.dtype)),
                      upper_loss.dtype)
    lower_loss, (grad_x_lower, grad_y_lower) = jax.value_and_grad(
        problem.lower, (0, 1))(x, y, lower_batch)
    (saddle_lagrangian, _), grad_x_saddle = jax.value_and_grad(
        _lagrangian, argnums=1, has_aux=True)(problem, x, theta, multipliers,
                                              lower_batch)
    d_x = jax.tree.map(lambda fu, fl, fs: fu / c_k + fl - fs, grad_x_upper,
                       grad_x_lower, grad_x_saddle)
    d_y = jax.tree.map(lambda fu, fl, y_, t: fu / c_k + fl - (y_ - t) / gamma1,
                       grad_y_upper, grad_y_lower, y, theta)
    d_z = jax.tree.map(lambda m, z_: -(m - z_) / gamma2, multipliers, z)
    new_x, new_y = project(
        jax.tree.map(lambda v, d: (v - alpha * d).astype(v.dtype), x, d_x),
        jax.tree.map(lambda v, d: (v - alpha * d).astype(v.dtype), y, d_y))
    new_z = constraints.project_multipliers(
        jax.tree.map(lambda z_, d: z_ - beta * d, z, d_z), multiplier_bound)

    proximal_value = (saddle_lagrangian
                      + optax.tree.norm(optax.tree.sub(theta, y),
                                        squared=True) / (2 * gamma1))
    if jax.tree.leaves(multipliers):
      proximal_value -= optax.tree.norm(
          optax.tree.sub(multipliers, z), squared=True) * (
              scale ** 2 / (2 * gamma2))
      multiplier_norm = optax.tree.norm(multipliers)
    else:
      multiplier_norm = jnp.zeros_like(upper_loss)
    dtype = upper_loss.dtype
    info = LVHBAInfo(
        upper_loss=upper_loss,
        lower_grad_norm=optax.tree.norm(d_theta).astype(dtype),
        hypergradient_norm=optax.tree.norm(d_x).astype(dtype),
        lower_gap=(lower_loss - proximal_value).astype(dtype),
        constraint_violation=constraints.violation(problem, x, y).astype(
            dtype),
        multiplier_norm=multiplier_norm.astype(dtype),
        penalty=jnp.asarray(c_k, dtype))
    multipliers = jax.tree.map(lambda m, old: m.astype(old.dtype),
                               multipliers, state.multipliers)
    new_z = jax.tree.map(lambda m, old: m.astype(old.dtype), new_z, z)
    theta = jax.tree.map(lambda t, old: t.astype(old.dtype), theta,
                         state.theta)
    if tracks_lower:
      # (3) The lower iterate w: one projected step on f(x^k, .) over Y, on
      # the same lower batch; it reads neither y nor F.
      grad_w = derivatives.lower_grad(problem, x, state.y, lower_batch)
      new_w = problem.projected_y(jax.tree.map(
          lambda w, d: (w - eta * d).astype(w.dtype), state.y, grad_w))
    else:
      new_w = new_y
    return LVHBAState(new_x, new_w, new_y, new_z, theta, multipliers,
                      sampler, k + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1,
                                   lower_grads=4 if tracks_lower else 3,
                                   hvps=0, cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
