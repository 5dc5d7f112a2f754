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
reaches the same solutions. :math:`\Pi_C` is ``Problem.project_xy`` when
set, else ``project_x`` and ``project_y``; :math:`\Pi_Y` is ``project_y``.

Choosing the steps (measured on the problems of :mod:`problems.constrained`;
see ``paper_repro/lvhba``):

* the descent-ascent step on :math:`(\theta, \lambda)` is simultaneous, so it
  is stable only when :math:`\eta` is small against
  :math:`(1/\gamma_1 + 1/\gamma_2) / \|\nabla_y c\|^2`: with many
  constraints or large :math:`\nabla_y c` (the LLC toy, 100 coordinates in
  one sum; the SVM, one row per sample) lower :math:`\eta` or
  :math:`\gamma_2`, and prefer well-scaled constraint rows;
* :math:`f - v_\gamma \ge 0` only where ``y`` is feasible: at an infeasible
  ``y`` the maximisation over :math:`\lambda` makes :math:`-v_\gamma`
  concave, and the penalised objective is unbounded below once
  :math:`F / c_k` no longer compensates. Let :math:`C` keep ``y``
  feasible (``project_xy``), as the paper's experiments do;
* the bias shrinks like :math:`1 / c_k` (:math:`1/(c_k \gamma_1)` on the LLC
  toy) and the progress of ``x`` like :math:`\alpha / c_k`: a larger
  :math:`p` reaches a smaller bias, in more steps.

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

References:
  Yao, Yu, Zeng & Zhang, "Constrained bi-level optimization: proximal
  Lagrangian value function approach and Hessian-free algorithm", ICLR 2024
  (Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, constraints, derivatives
from bilevel._problem import Problem
from bilevel._validation import as_schedule, check_positive, check_schedule

PyTree = Any


class LVHBAState(NamedTuple):
  r"""State of :func:`lvhba`.

  Attributes:
    x: upper variable :math:`x^k`.
    y: lower variable :math:`y^k`.
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
  z: tuple[PyTree, PyTree]
  theta: PyTree
  multipliers: tuple[PyTree, PyTree]
  sampler: _data.SamplerState
  num_steps: jax.Array


class LVHBAInfo(NamedTuple):
  r"""Diagnostics of one step (at :math:`(x^k, y^k)` and the new saddle).

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


def _project_joint(problem: Problem, x, y):
  if problem.project_xy is not None:
    return problem.project_xy(x, y)
  return problem.projected_x(x), problem.projected_y(y)


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


def lvhba(problem: Problem, *, step_size: Any = 0.01,
          z_step_size: Any = 0.1, saddle_step_size: Any = 0.01,
          gamma1: float = 10.0, gamma2: float = 10.0,
          multiplier_bound: float = 1000.0, penalty_base: Any = 1.0,
          penalty_power: float = 0.3) -> _base.BilevelSolver:
  r"""LV-HBA (see the module docstring for the update rule).

  The defaults are those of the paper's code (toy and SVM scripts) where
  they agree: :math:`\gamma_1 = \gamma_2 = 10`, :math:`p = 0.3`.

  Args:
    problem: the bilevel problem; its lower constraints
      (``lower_constraints``, ``lower_equality_constraints``) may couple
      ``x`` and ``y``. Without constraints the method still applies
      (a value-function method for convex, not necessarily strongly convex,
      lower levels).
    step_size: :math:`\alpha_k`, the step on ``(x, y)`` (number or schedule).
    z_step_size: :math:`\beta_k`, the step on ``z``.
    saddle_step_size: :math:`\eta_k`, the descent-ascent step on
      :math:`(\theta, \lambda)`.
    gamma1: :math:`\gamma_1 > 0`, the proximal parameter of :math:`\theta`.
    gamma2: :math:`\gamma_2 > 0`, the proximal parameter of :math:`\lambda`.
    multiplier_bound: :math:`u`, the bound of the multiplier box :math:`Z`
      (``math.inf``: none). The analysis needs it finite and larger than the
      lower level's multipliers; the default is the toy code's 1000.
    penalty_base: :math:`\underline{c} > 0`, or a schedule ``k -> c_k``.
    penalty_power: :math:`p \in (0, 1/2]` of
      :math:`c_k = \underline{c}\,(k + 1)^p` (ignored for a schedule).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`LVHBAState` and
    :class:`LVHBAInfo`. ``init(x, y, *, key=None, data=None)`` starts from
    :math:`\theta^0 = \Pi_Y(y^0)` and :math:`\lambda^0 = z^0 = 0`. One step
    costs ``1 Gf + 3 Gg``, two vector-Jacobian products and two evaluations
    of the constraints, and the projections.
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

  def init(x, y, *, key=None, data=None) -> LVHBAState:
    sampler = _base.prepare(problem, x, y, data, key)
    values = jax.tree.map(jnp.zeros_like,
                          constraints.values(problem, x, y))
    return LVHBAState(x=x, y=y, z=values, theta=problem.projected_y(y),
                      multipliers=values, sampler=sampler,
                      num_steps=jnp.zeros((), jnp.int32))

  def step(state: LVHBAState, data=None):
    _base.check_step_data(state.sampler, data)
    k = state.num_steps
    alpha, beta, eta = (steps[name](k) for name in (
        "step_size", "z_step_size", "saddle_step_size"))
    x, y, z = state.x, state.y, state.z
    theta, multipliers = state.theta, state.multipliers
    upper_batch, sampler = _data.sample(state.sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")

    # (1) One descent-ascent step on the proximal Lagrangian at (x^k, y^k).
    (_, values), grad_theta = jax.value_and_grad(
        _lagrangian, argnums=2, has_aux=True)(problem, x, theta, multipliers,
                                              lower_batch)
    d_theta = jax.tree.map(lambda g, t, y_: g + (t - y_) / gamma1,
                           grad_theta, theta, y)
    d_multipliers = jax.tree.map(lambda c, m, z_: -c + (m - z_) / gamma2,
                                 values, multipliers, z)
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
    new_x, new_y = _project_joint(
        problem, jax.tree.map(lambda v, d: (v - alpha * d).astype(v.dtype),
                              x, d_x),
        jax.tree.map(lambda v, d: (v - alpha * d).astype(v.dtype), y, d_y))
    new_z = constraints.project_multipliers(
        jax.tree.map(lambda z_, d: z_ - beta * d, z, d_z), multiplier_bound)

    proximal_value = (saddle_lagrangian
                      + optax.tree.norm(optax.tree.sub(theta, y),
                                        squared=True) / (2 * gamma1))
    if jax.tree.leaves(multipliers):
      proximal_value -= optax.tree.norm(optax.tree.sub(multipliers, z),
                                        squared=True) / (2 * gamma2)
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
    return LVHBAState(new_x, new_y, new_z, theta, multipliers, sampler,
                      k + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1, lower_grads=3, hvps=0,
                                   cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
