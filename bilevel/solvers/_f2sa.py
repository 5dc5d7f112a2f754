r"""F2SA: fully first-order stochastic approximation (Kwon et al., ICML 2023).

The same value-function penalty as :func:`bilevel.solvers.penalty`,
:math:`\mathcal{L}_\lambda(x, y) = f(x, y) + \lambda (g(x, y) - \min_{y'}
g(x, y'))`, for an unconstrained, strongly convex lower level, with the penalty
weight and every step size on polynomial schedules of the outer step
:math:`k` (:math:`s_k = 1 + k / k_0`):

.. math::

   \lambda_k = \lambda_0 s_k^{1/7}, \quad
   \gamma_k = \gamma_0 s_k^{-4/7}, \quad
   \alpha_k = \frac{\gamma_k}{\lambda_k} = \frac{\gamma_0}{\lambda_0}
       s_k^{-5/7}, \quad
   \xi \alpha_k = \eta_0 s_k^{-5/7},

and at outer step :math:`k`, with ``y`` the iterate of the lower problem
alone (the paper's :math:`z`) and :math:`\tilde y` = ``y_penalized`` the
penalised iterate (the paper's :math:`y`):

.. math::

   &\text{repeat } T \text{ times, fresh batches:} \\
   &\qquad y \leftarrow y - \gamma_k \nabla_y g(x_k, y) \\
   &\qquad \tilde y \leftarrow \tilde y - \alpha_k \bigl(\nabla_y f(x_k,
        \tilde y) + \lambda_k \nabla_y g(x_k, \tilde y)\bigr) \\
   &x_{k+1} = \Pi_X\Bigl(x_k - \xi \alpha_k \bigl[\nabla_x f(x_k, \tilde y)
        + \lambda_k \bigl(\nabla_x g(x_k, \tilde y) - \nabla_x g(x_k, y)
        \bigr)\bigr]\Bigr).

:math:`\alpha_k \lambda_k = \gamma_k`: ``y_penalized`` and ``y`` see the
same step on ``g``, so ``lower_step_size`` is a plain lower step size
whatever :math:`\lambda`. ``y`` never sees the upper data and is what
:func:`bilevel.run` reports as ``result.y``; ``y_penalized`` is
``result.y_penalized``. The exponents give :math:`\lambda_k \to \infty` (the
bias :math:`O(1/\lambda_k)` vanishes) slowly enough for the inner iterates to
follow. As we read the paper, these exponents are its schedule for noisy
gradients at both levels, where it proves :math:`\epsilon^{-7/2}`
iterations; it proves :math:`\epsilon^{-5/2}` and :math:`\epsilon^{-3/2}`
with noise at the upper level only or none, with schedules of their own.
We have not re-checked the exponents against the paper's statements, so
they are arguments (``penalty_power``, ``lower_power``).

**Bias.** For a fixed :math:`\lambda` the iterates follow the gradient of
the surrogate :math:`\psi_\lambda(x) = \min_y \mathcal{L}_\lambda(x, y)`,
whose minimiser is :math:`O(1/(\lambda \mu))` away from :math:`x^*` on a
:math:`\mu`-strongly convex lower level: for quadratics,
:math:`\nabla \psi_\lambda` uses :math:`(\nabla^2_{yy} g + \nabla^2_{yy}
f / \lambda)^{-1}` where :math:`\nabla \Phi` uses
:math:`(\nabla^2_{yy} g)^{-1}`. On the quadratics of
``tests/conformance/quadratics.py`` (``x`` in :math:`R^{50}`, ``y`` in
:math:`R^{40}`, lower level 1-smooth, :math:`\mu = 1/\kappa`), the minimiser
of :math:`\psi_\lambda` is at relative error :math:`1.7/\lambda` for
:math:`\kappa = 2` and :math:`23/\lambda` for :math:`\kappa = 100`
(between :math:`0.2/(\lambda\mu)` and :math:`0.9/(\lambda\mu)`). The
defaults stop after 5000 steps at relative error
:math:`\|x - x^*\| / \|x^*\|` = 0.071 (:math:`\kappa = 2`) and 0.52
(:math:`\kappa = 100`), deterministic or with minibatches of 32: by then
:math:`\lambda_k = 24`, whose surrogate minimiser is at 0.064 and 0.49, and
the ``x`` step has decayed to 1.2% of :math:`\eta_0`. The growth
:math:`k^{1/7}` cannot close that gap (:math:`\lambda_k = 10^4` takes
:math:`10^{22}` steps); a large constant penalty does: ``penalty=1e8,
penalty_power=0, lower_power=0`` (constant :math:`\lambda` and steps)
reaches 1.7e-8 (:math:`\kappa = 2`) and 2.3e-7 (:math:`\kappa = 100`) in
5000 steps; with minibatches it leaves only the noise of constant steps
(2.4e-3 and 1.1e-3 for the last iterate, 2.6e-4 and 2e-5 for the average of
the last 2500): ``y_penalized`` and ``y`` step on the same lower batch, and
on these problems (additive noise) its noise cancels in their difference. Take
:math:`\lambda \ge 1/(\epsilon \mu)` for accuracy :math:`\epsilon`. This
needs float64: in float32 the difference of the lower gradients at
``y_penalized`` and ``y``, of relative size :math:`1/\lambda`, is lost to
rounding, and
:math:`\lambda = 10^4` is about the best (2.1e-4 and 2.3e-3 measured;
:math:`10^8` gives 0.70 and 0.09). ``tests/test_defaults.py`` checks the
bias of the defaults against the closed form and the constant penalty.

Differences from benchmark_bilevel's ``f2sa`` (the only public JAX F2SA),
where we follow the paper: it grows the penalty additively, :math:`\lambda
\leftarrow \lambda + 0.1 (k + 1)^{-1/7}`, so :math:`\lambda_k` grows like
:math:`k^{6/7}` instead of :math:`k^{1/7}`, and it decays the ``x`` step
with exponent 4/7 instead of 5/7. Like it (and unlike a third-party F2BA
script that evaluates the penalised iterate's lower gradient at the lower
iterate), every gradient here is taken at its own iterate.

References:
  Kwon, Kwon, Wright & Nowak, "A fully first-order method for stochastic
  bilevel optimization", ICML 2023.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from bilevel import _base, _data
from bilevel._problem import Problem
from bilevel._validation import (check_in_interval, check_positive,
                                 check_positive_int)
from bilevel.solvers._penalty import (PenaltyInfo, PenaltyState, inner_loop,
                                      penalty_hypergradient)

PyTree = Any

_EMPTY = optax.EmptyState()


def f2sa(problem: Problem, *, upper_step_size: float = 0.2,
         lower_step_size: float = 0.5, penalty: float = 10.0,
         num_inner_steps: int = 10, schedule_offset: float = 10.0,
         penalty_power: float = 1 / 7, lower_power: float = 4 / 7
         ) -> _base.BilevelSolver:
  r"""F2SA with the paper's polynomial schedules (see the module docstring).

  **Which y to use.** ``y`` (``state.y``, ``result.y``) descends ``g``
  alone and never saw the upper data: it is the model to evaluate or
  deploy. ``y_penalized`` (``state.y_penalized``, ``result.y_penalized``)
  descends :math:`f + \lambda g` and has trained on the upper data; it
  approaches the optimistic lower solution (the lower minimiser best for
  ``f``) as :math:`\lambda` grows, the one to report when the lower
  solutions are not unique. ``init(x, y0)`` starts both at ``y0``.

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``;
      ``project_x`` is applied to ``x``, ``project_y`` to ``y`` and
      ``y_penalized``).
    upper_step_size: :math:`\eta_0 = \xi \alpha_0`, the ``x`` step at
      :math:`k = 0`.
    lower_step_size: :math:`\gamma_0`, the ``y`` step (and
      ``y_penalized``'s step on ``g``) at :math:`k = 0`.
    penalty: :math:`\lambda_0`. The default 10 is ours: with
      :math:`\lambda_k` growing like :math:`k^{1/7}` (a factor 2.1 over
      2000 outer steps from :math:`k_0 = 10`), the starting value sets the
      bias :math:`O(1/(\lambda \mu))` of most runs; measured on
      ``problems.quadratic`` after 2000 steps at the default step sizes:
      relative error to :math:`x^*` 0.44 from :math:`\lambda_0 = 1`, 0.086
      from 10, 0.026 from 100. See the module docstring for the rule
      :math:`\lambda \ge 1/(\epsilon \mu)` and a setting that reaches
      :math:`x^*`.
    num_inner_steps: ``T``.
    schedule_offset: :math:`k_0`: the schedules start to decay after about
      :math:`k_0` outer steps.
    penalty_power: exponent of :math:`\lambda_k` (1/7).
    lower_power: decay exponent of :math:`\gamma_k` (4/7);
      ``y_penalized``'s and ``x``'s steps decay with ``penalty_power +
      lower_power`` (5/7).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`PenaltyState` and
    :class:`PenaltyInfo`. One outer step costs ``(T + 1) Gf + 2 (T + 1) Gg``.
  """
  _base.require_unconstrained(problem, "f2sa")
  check_positive("upper_step_size", upper_step_size)
  check_positive("lower_step_size", lower_step_size)
  check_positive("penalty", penalty)
  check_positive_int("num_inner_steps", num_inner_steps)
  check_positive("schedule_offset", schedule_offset)
  check_in_interval("penalty_power", penalty_power, 0.0, 1.0)
  check_in_interval("lower_power", lower_power, 0.0, 1.0)

  def schedules(count):
    s = 1.0 + jnp.asarray(count, jnp.float32) / schedule_offset
    weight = penalty * s ** penalty_power
    lower = lower_step_size * s ** -lower_power
    upper = upper_step_size * s ** -(penalty_power + lower_power)
    return weight, lower, upper

  def init(x, y, *, key=None, data=None) -> PenaltyState:
    sampler = _base.prepare(problem, x, y, data, key)
    return PenaltyState(x=x, y=y, y_penalized=y, upper_opt_state=_EMPTY,
                        y_opt_state=_EMPTY, y_penalized_opt_state=_EMPTY,
                        sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: PenaltyState, data=None):
    _base.check_step_data(state.sampler, data)
    x = state.x
    weight, lower, upper = schedules(state.num_steps)
    y_penalized, y, _, _, sampler, lower_grad_norm = inner_loop(
        problem, optax.scale(-lower / weight), optax.scale(-lower), x,
        state.y_penalized, state.y, _EMPTY, _EMPTY, state.sampler, data,
        num_inner_steps, upper_weight=1.0, lower_weight=weight)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")
    hypergradient, upper_loss, lower_gap = penalty_hypergradient(
        problem, x, y_penalized, y, weight, upper_batch, lower_batch)
    x, _ = _base.update_x(problem, optax.scale(-upper), hypergradient,
                          _EMPTY, x)
    info = PenaltyInfo(
        upper_loss=upper_loss, lower_grad_norm=lower_grad_norm,
        hypergradient_norm=optax.tree.norm(hypergradient),
        penalty=jnp.asarray(weight, upper_loss.dtype), lower_gap=lower_gap)
    return PenaltyState(
        x=x, y=y, y_penalized=y_penalized, upper_opt_state=_EMPTY,
        y_opt_state=_EMPTY, y_penalized_opt_state=_EMPTY, sampler=sampler,
        num_steps=state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(
      upper_grads=num_inner_steps + 1,
      lower_grads=2 * (num_inner_steps + 1), hvps=0, cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
