r"""SOBA and MA-SOBA: single-loop stochastic bilevel optimization.

At step :math:`t`, with one lower batch for :math:`\nabla_y g`, :math:`H` and
:math:`J` (all three from one ``jax.vjp``) and one upper batch for
:math:`\nabla f`, all evaluated at :math:`(x_t, y_t, v_t)`:

.. math::

   y_{t+1} &= y_t - \rho_t \nabla_y g(x_t, y_t) \\
   v_{t+1} &= v_t - \rho^v_t \big(H v_t - \nabla_y f(x_t, y_t)\big) \\
   x_{t+1} &= \Pi_X\big(x_t - \gamma_t (\nabla_x f(x_t, y_t) - J v_t)\big)

(steps through the three optax optimizers). Sign convention: here
:math:`v \approx +H^{-1} \nabla_y f` as in every solver of this library; SOBA's
paper and benchopt's code store :math:`-v`.

MA-SOBA (:func:`ma_soba`) runs the same step with a moving average of the
hypergradient estimates in place of the last estimate in the update of
``x``. Its analysis (Chen, Xiao & Balasubramanian) asks only for Lipschitz
gradients of ``f`` and Lipschitz second derivatives of ``g``, where SOBA's
relied on higher-order smoothness of both levels, and keeps SOBA's
optimal sample complexity.

**Accuracy.** On the quadratics of ``tests/conformance/quadratics.py`` (x in
R^50, y in R^40, lower level 1-smooth and mu = 1/kappa strongly convex),
SOBA's defaults reach x*: relative error 6.9e-16 (kappa = 2) and 4.7e-9
(kappa = 100) after 5000 deterministic steps. ``v`` takes one step per
iteration and converges like (1 - rho mu)^t, so ill-conditioned lower levels
need more steps. With minibatches (batches of 32) only the noise of constant
steps remains: 9.1e-3 and 3.1e-4 for the last iterate, 1.5e-4 and 5.9e-6 for
the mean of the last 2500 iterates.

**Stability.** A single loop tracks a moving ``y*(x)`` with one lower step
per upper step, so the upper step must be small against the lower
contraction rho mu (the analysis' two time scales): on the conformance
bank's quadratic with kappa = 10, x in R^10 and y in R^8, the default upper
step 0.5 diverges (relative error 15 after 1000 steps, growing) while 0.1 reaches 2.3e-6 after 3000 steps, and with
kappa = 30 on that shape even 0.1 is too large. No constant default suits
every problem: lower ``upper_optimizer`` (or use a decreasing schedule, as
the paper's theory) when the hyper-objective grows.

References:
  Dagréou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that
  enables stochastic and global variance reduction algorithms", NeurIPS 2022.

  Chen, Xiao & Balasubramanian, "Optimal algorithms for stochastic bilevel
  optimization under relaxed smoothness conditions", Journal of Machine
  Learning Research 25(151):1-51, 2024; arXiv 2306.12067.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from bilevel import _base, _data
from bilevel._problem import Problem
from bilevel._validation import (as_optimizer, check_in_interval,
                                 check_positive, check_step_size)
from bilevel.hypergradient import linear_descent, single_loop_estimate

PyTree = Any


class SOBAState(NamedTuple):
  """State of :func:`soba`."""
  x: PyTree
  y: PyTree
  v: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  linear_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


def soba(problem: Problem, *, upper_optimizer: Any = 0.5,
         lower_optimizer: Any = 0.5, linear_optimizer: Any = 0.5,
         linear_radius: float | None = None) -> _base.BilevelSolver:
  """SOBA.

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``).
    upper_optimizer: optax optimizer, step size or schedule for ``x``
      (:math:`\\gamma`). The paper's theory uses decreasing steps, e.g.
      ``optax.schedules.polynomial_schedule`` or ``lambda t: c / sqrt(t+1)``.
    lower_optimizer: same for ``y`` (:math:`\\rho`).
    linear_optimizer: same for ``v`` (:math:`\\rho^v`).
    linear_radius: radius of a ball ``v`` is projected onto after each step
      (``None``: no projection).

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs
    ``1 Gf + 1 Gg + 1 HVP + 1 JVP``.
  """
  return _soba(problem, "soba", upper_optimizer=upper_optimizer,
               lower_optimizer=lower_optimizer,
               linear_optimizer=linear_optimizer, linear_radius=linear_radius)


def ma_soba(problem: Problem, *, upper_step_size: Any = 0.4,
            momentum: float = 0.2, lower_optimizer: Any = 0.5,
            linear_optimizer: Any = 0.5, linear_radius: float | None = None
            ) -> _base.BilevelSolver:
  r"""MA-SOBA: SOBA with a moving average of the hypergradient estimates.

  .. math::

     m_{t+1} = \beta m_t + (1 - \beta) (\nabla_x f - J v_t), \qquad
     x_{t+1} = \Pi_X(x_t - \alpha_t m_{t+1}),

  ``y`` and ``v`` as in :func:`soba`, every oracle at
  :math:`(x_t, y_t, v_t)`, ``m_0 = 0``. It is BO-REP
  (:func:`bilevel.solvers.borep`) without normalization, refinement and
  periodic lower updates: its natural ablation. The analysis projects ``v``
  onto a ball (``linear_radius``).

  **Parametrisation.** The paper weights the *new* estimate,
  :math:`h_{t+1} = (1 - \theta_t) h_t + \theta_t D_x^t`; ``momentum`` weights
  the *old* average: :math:`\beta = 1 - \theta`. Here the step uses the
  average that already contains the current estimate (``optax.ema``, then
  the step); whether the paper's step uses the average before or after the
  current estimate is mixed in (a shift of one iteration) was not checked
  against its text. As we read its main theorem (not checked against the
  PDF here), every step is a constant multiple of the upper one,
  :math:`\theta_t = c_\theta \alpha_t` and likewise for the lower and
  linear-system steps, all of order :math:`1/\sqrt{K}` over ``K``
  iterations: the average must adapt at the pace ``x`` moves.

  **Defaults** :math:`\alpha = 0.4`, :math:`\beta = 0.2`, i.e.
  :math:`\theta = 0.8 = 2 \alpha`, below the lower and linear-system steps
  (0.5). The earlier defaults (:math:`\alpha = 0.5`, :math:`\beta = 0.9`,
  :math:`\theta = \alpha / 5`) diverge on strongly coupled problems. Written
  in ``x`` alone, the step is a heavy ball,
  :math:`x_{t+1} - x_t = \beta (x_t - x_{t-1}) - \alpha (1 - \beta) h_t`,
  that oscillates with little damping when :math:`\beta` is close to 1,
  and :math:`h_t` sees ``x`` only through ``y`` and ``v``, which lag it by
  about :math:`1 / (\rho \mu)` iterations each; that lag turns the
  oscillation unstable. On quadratics the step is affine in
  :math:`(x, y, v, m)`: on ``quadratic(2.0)`` of ``tests/conformance``
  (lower condition number 2, :math:`\Phi` 0.9-smooth) the spectral radius of
  its linear part is 1.024 with the earlier defaults (a factor of
  :math:`10^{51}` in 5000 steps) and 0.979 with these. In 5000 steps from
  ``x = 0`` these reach :math:`x^*` to a relative error of 7e-16 on
  ``quadratic(2.0)`` and 2e-7 on ``quadratic(100.0)`` (the rate of the
  slow lower directions); with minibatches of 32 of 256 samples they stop
  at the noise floor of constant steps, 6e-3 and 2e-4 (SOBA at step 0.5:
  8e-3 and 2e-4). Stronger averaging (smaller :math:`\theta`) needs a
  proportionally smaller :math:`\alpha`, e.g. ``upper_step_size=0.1,
  momentum=0.9``, which converges on ``quadratic(2.0)`` but is far slower
  on ``quadratic(100.0)``.

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``).
    upper_step_size: :math:`\alpha`, a float or an optax schedule.
    momentum: :math:`\beta = 1 - \theta \in [0, 1)`, the weight of the old
      average (0: SOBA).
    lower_optimizer: optax optimizer, step size or schedule for ``y``.
    linear_optimizer: same for ``v``.
    linear_radius: radius of the ball of ``v`` (``None``: no projection).

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs
    ``1 Gf + 1 Gg + 1 HVP + 1 JVP``.

  References:
    Chen, Xiao & Balasubramanian, "Optimal algorithms for stochastic bilevel
    optimization under relaxed smoothness conditions", Journal of Machine
    Learning Research 25(151):1-51, 2024; arXiv 2306.12067.
  """
  check_step_size("upper_step_size", upper_step_size)
  check_in_interval("momentum", momentum, 0.0, 1.0)
  upper_optimizer = optax.chain(optax.ema(momentum, debias=False),
                                optax.scale_by_learning_rate(upper_step_size))
  return _soba(problem, "ma_soba", upper_optimizer=upper_optimizer,
               lower_optimizer=lower_optimizer,
               linear_optimizer=linear_optimizer, linear_radius=linear_radius)


def _soba(problem: Problem, name: str, *, upper_optimizer, lower_optimizer,
          linear_optimizer, linear_radius) -> _base.BilevelSolver:
  """SOBA's step with any upper optimizer (``name`` for error messages)."""
  _base.require_unconstrained(problem, name)
  upper_optimizer = as_optimizer("upper_optimizer", upper_optimizer)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  linear_optimizer = as_optimizer("linear_optimizer", linear_optimizer)
  if linear_radius is not None:
    check_positive("linear_radius", linear_radius)

  def init(x, y, *, key=None, data=None) -> SOBAState:
    sampler = _base.prepare(problem, x, y, data, key,
                            differentiates_projection=True)
    return SOBAState(
        x=x, y=y, v=optax.tree.zeros_like(y),
        upper_opt_state=upper_optimizer.init(x),
        lower_opt_state=lower_optimizer.init(y),
        linear_opt_state=linear_optimizer.init(y), sampler=sampler,
        num_steps=jax.numpy.zeros((), jax.numpy.int32))

  def step(state: SOBAState, data=None):
    _base.check_step_data(state.sampler, data)
    x, y, v = state.x, state.y, state.v
    lower_batch, sampler = _data.sample(state.sampler, data, "lower")
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    estimate = single_loop_estimate(problem, x, y, v, upper_batch,
                                    lower_batch)
    updates, lower_opt_state = lower_optimizer.update(
        estimate.lower_grad, state.lower_opt_state, y)
    y_next = problem.projected_y(optax.apply_updates(y, updates))
    v_next, linear_opt_state = linear_descent(
        linear_optimizer, estimate.linear_grad, state.linear_opt_state, v,
        linear_radius)
    x_next, upper_opt_state, info = _base.upper_step(
        problem, upper_optimizer, estimate.hypergradient,
        state.upper_opt_state, x, upper_loss=estimate.upper_loss,
        lower_grad_norm=optax.tree.norm(estimate.lower_grad),
        linear_residual_norm=estimate.linear_residual_norm)
    return SOBAState(x_next, y_next, v_next, upper_opt_state,
                     lower_opt_state, linear_opt_state, sampler,
                     state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1, lower_grads=1, hvps=1,
                                   cross_products=1)
  return _base.BilevelSolver(init, step, oracle_calls)
