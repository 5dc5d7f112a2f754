r"""BO-REP: bilevel optimization under unbounded smoothness.

For upper objectives whose smoothness grows with the gradient norm (recurrent
networks), BO-REP moves ``x`` by normalized momentum, so that every upper
step has length exactly :math:`\eta`, and keeps ``y`` close to
:math:`y^*(x)` with two devices: an *initialization refinement* of ``y`` at
``x_0`` before the first upper step, and *periodic* lower updates (``N``
steps every ``I`` iterations, ``y`` frozen in between: ``x`` moves at most
:math:`\eta I` between two updates). The linear-system variable ``z`` takes
one stochastic step per iteration on :math:`\tfrac12 z^\top H z -
\nabla_y f^\top z`, optionally projected onto a ball.

.. math::

   y_0 &= \text{Refine}(x_0, y_0') \quad (T_0 \text{ lower steps, in init}) \\
   y_t &= \begin{cases} \text{N lower steps on } g(x_t, \cdot) \text{ from }
          y_{t-1} & t \ge 1,\ t \bmod I = 0 \\ y_{t-1} & \text{otherwise}
          \end{cases} \\
   h_t &= \nabla_x f(x_t, y_t) - J_t z_t \\
   z_{t+1} &= \Pi_{\|z\| \le R}\big(z_t - \nu (H_t z_t
              - \nabla_y f(x_t, y_t))\big) \\
   m_{t+1} &= \beta m_t + (1 - \beta) h_t \\
   x_{t+1} &= \Pi_X\big(x_t - \eta_t\, m_{t+1} / \|m_{t+1}\|\big)

with :math:`H_t = \nabla^2_{yy} g`, :math:`J_t = \nabla^2_{xy} g` at
:math:`(x_t, y_t)`; ``H z``, ``J z`` and :math:`\nabla_y g` come from one
``jax.vjp`` on one lower batch, :math:`\nabla_x f` and :math:`\nabla_y f`
from one backward pass on one upper batch. The estimate :math:`h_t` uses
:math:`z_t`, the ``z`` of the HVP, before its update. Sign convention as
everywhere in this library: :math:`z \approx +H^{-1} \nabla_y f`.

**Against the official code and the paper.** The code is that of
https://github.com/MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-Smoothness
(commit 1b06bcf; ``bo_rep.py`` of ``data_cleaning``, ``hyperparam_opt``
and ``meta_learning``), read line by line. The paper's Algorithm 1 could not
be read here: what is said of the paper is our reading of it, not checked
against its text. Where the two differ we follow the paper, except where
said:

* **Order of the z update and the hypergradient.** The code updates ``z``
  first and builds the cross term with the *updated* :math:`z_{t+1}`, in all
  three scripts. The paper's estimate uses :math:`z_t`, as here.
* **Lower update at t = 0.** The code runs its periodic update whenever
  ``step % I == 0``, step 0 included (the first update stands in for the
  refinement), and its ``step`` restarts at 0 at every epoch (data
  cleaning) or meta-batch (the other two, where it counts the tasks of the
  batch), so an update also fires at each restart whatever the period. The
  paper refines :math:`y_0` at :math:`x_0` and then updates ``y`` at the
  multiples of ``I`` after 0; here ``init`` runs ``num_refine_steps`` lower
  steps at :math:`x_0` and ``step`` updates ``y`` when :math:`t \ge 1` and
  :math:`t \bmod I = 0`.
* **Batch of the cross term.** The paper draws independent samples for
  each oracle (the cross term's apart from the HVP's). The code uses a third
  training batch, apart from the HVP's and the upper one (data cleaning), or
  the upper (query) batch, i.e. ``g`` on the upper level's data (the other
  two). Here it follows neither: the cross term, the HVP and
  :math:`\nabla_y g` share one lower batch, from one ``jax.vjp`` instead
  of two, and :math:`\nabla_x f`, :math:`\nabla_y f` one upper batch. Each
  estimate stays unbiased; the cross term and the ``z`` update of one step
  are correlated.
* **Point of the HVP.** The data-cleaning script computes the HVP before
  the lower update and the upper gradient after it, the other two scripts
  everything after it; here every oracle of iteration ``t`` is evaluated at
  :math:`(x_t, y_t)`, after the lower update, as in the paper.
* **The lower update.** The code calls ``backward`` N times without zeroing
  the gradients, so the k-th step uses the sum of the k gradients so far (a
  growing effective step); data cleaning also takes one more step first,
  with the gradient of the HVP's batch (N + 1 steps). Here each of the N
  steps is a plain optimizer step on a fresh lower batch.
* **Refinement.** The code has none (its first periodic update stands in);
  here ``init`` runs ``num_refine_steps`` lower steps at :math:`x_0`.
* **z.** The code initialises ``z`` at random (Xavier) and never projects
  it; here :math:`z_0 = 0` and ``linear_radius`` projects it when given.
* **Meta-batches.** The hyper-representation script moves ``x`` once per
  meta-batch, along the mean over its tasks of the momentum after each
  task; here every step is one iteration of the algorithm above, on one
  upper and one lower batch.
* **Problems.** The code's problems use an unsquared L2 penalty (neither
  smooth nor strongly convex at 0), re-draw the label noise at every access,
  and compute data cleaning's upper loss on a training (noisy) batch; the
  problems of ``problems.rnn`` square the norm, draw the noise once per seed
  and use a clean validation split.

The refinement of the paper's analysis is an epoch-based SGD (step halved,
epoch length doubled); pass such a schedule as ``refine_optimizer`` (e.g.
``optax.sgd(optax.piecewise_constant_schedule(...))``) to reproduce it. The
ball projection of ``z`` (radius of order :math:`\ell_{f,0}/\mu`) is part of
the analysis; it is off by default because the radius is problem dependent.

**Accuracy.** Every upper step has length eta, so with a constant eta the
iterates cannot settle: with momentum beta they circle x* at a distance of
order eta / (1 - beta). On the quadratics of
``tests/conformance/quadratics.py`` (x in R^50, y in R^40, lower level
1-smooth and mu = 1/kappa strongly convex), the defaults (eta = 0.1, beta =
0.9) end 5000 steps at relative error 0.040 (kappa = 2) and 5.3e-4 (kappa =
100); on the box of the conformance bank (x* of norm 3.6) at 0.20. A step
length that decays once x has arrived removes this:
``upper_step_size=optax.exponential_decay(0.1, 2000, 0.1,
transition_begin=2000)`` reaches 3.8e-9 and 5.2e-9 after 16000 steps (3.0e-4
and 3.3e-4 with minibatches of 32). The distance still to travel decides
when the decay may start, since x moves at most eta per step: starting at
step 1000 with a factor 0.1 every 500 steps stalls at 6.5e-2 for kappa = 100
(``tests/test_defaults.py``).

References:
  Hao, Gong & Liu, "Bilevel optimization under unbounded smoothness: a new
  algorithm and convergence analysis", ICLR 2024; arXiv 2401.09587.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data
from bilevel._problem import Problem
from bilevel._validation import (as_optimizer, check_in_interval,
                                 check_positive, check_positive_int,
                                 check_step_size)
from bilevel.hypergradient import linear_descent, single_loop_estimate

PyTree = Any


class BOREPState(NamedTuple):
  """State of :func:`borep`.

  Attributes:
    x, y: the iterates.
    z: the linear-system variable, :math:`z \\approx H^{-1} \\nabla_y f`.
    upper_opt_state: the normalized-momentum state (holds ``m``).
    lower_opt_state: state of the lower optimizer (persists across periods).
    linear_opt_state: state of the optimizer of ``z``.
    sampler: minibatch sampler.
    num_steps: iterations done, ``t``.
  """
  x: PyTree
  y: PyTree
  z: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  linear_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


class BOREPInfo(NamedTuple):
  """Diagnostics of one BO-REP step.

  Attributes:
    upper_loss: ``f(x_t, y_t)`` on the step's upper batch.
    lower_grad_norm: :math:`\\|\\nabla_y g(x_t, y_t)\\|` on the lower batch.
    hypergradient_norm: :math:`\\|h_t\\|`.
    linear_residual_norm: :math:`\\|H_t z_t - \\nabla_y f\\|`.
    momentum_norm: :math:`\\|m_{t+1}\\|` (the step divides by it).
    lower_updated: whether this step ran the periodic lower update.
  """
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  linear_residual_norm: jax.Array
  momentum_norm: jax.Array
  lower_updated: jax.Array


def normalized_momentum(step_size: Any, momentum: float = 0.9, *,
                        eps: float = 1e-30) -> optax.GradientTransformation:
  r"""The upper update of BO-REP as an optax optimizer.

  :math:`m \leftarrow \beta m + (1 - \beta) h`, update
  :math:`-\eta_t\, m / (\|m\| + \epsilon)`: a step of length
  :math:`\eta_t` along the momentum (the global norm over the pytree).

  Args:
    step_size: :math:`\eta`, a float or an optax schedule.
    momentum: :math:`\beta \in [0, 1)`.
    eps: added to the norm (only matters when ``m`` vanishes).
  """
  check_step_size("step_size", step_size)
  check_in_interval("momentum", momentum, 0.0, 1.0)
  return optax.chain(optax.ema(momentum, debias=False),
                     optax.normalize_by_update_norm(eps=eps),
                     optax.scale_by_learning_rate(step_size))


def borep(problem: Problem, *, upper_step_size: Any = 0.1,
          momentum: float = 0.9, lower_optimizer: Any = 0.5,
          linear_optimizer: Any = 0.5, period: int = 2,
          num_lower_steps: int = 5, num_refine_steps: int = 100,
          refine_optimizer: Any = None,
          linear_radius: float | None = None) -> _base.BilevelSolver:
  """BO-REP (Hao, Gong & Liu, ICLR 2024).

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``;
      the upper level may be (L0, L1)-smooth, e.g. a recurrent network).
    upper_step_size: :math:`\\eta`, the length of every upper step (float or
      optax schedule of the iteration).
    momentum: :math:`\\beta` of the moving average of hypergradients.
    lower_optimizer: optax optimizer, step size or schedule of the periodic
      lower updates (:math:`\\gamma`); its state persists across periods.
    linear_optimizer: same for ``z`` (:math:`\\nu`).
    period: :math:`I`, iterations between lower updates.
    num_lower_steps: :math:`N`, lower steps per update, each on a fresh
      lower batch.
    num_refine_steps: :math:`T_0`, lower steps of the initialization
      refinement, run once by ``init`` (0: none).
    refine_optimizer: optimizer of the refinement (default: the lower
      optimizer, with a fresh state).
    linear_radius: radius of the ball ``z`` is projected onto (``None``:
      no projection).

  Returns:
    A :class:`bilevel.BilevelSolver`. One step costs ``1 Gf + 1 HVP +
    1 JVP`` plus ``N Gg`` every ``I`` steps (declared: ``N``, the most one
    step spends; ``BOREPInfo.lower_updated`` tells which steps did). The
    refinement costs ``T_0 Gg`` once, in ``init``.
  """
  _base.require_unconstrained(problem, "borep")
  check_step_size("upper_step_size", upper_step_size)
  upper_optimizer = normalized_momentum(upper_step_size, momentum)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  linear_optimizer = as_optimizer("linear_optimizer", linear_optimizer)
  refine_optimizer = (lower_optimizer if refine_optimizer is None else
                      as_optimizer("refine_optimizer", refine_optimizer))
  check_positive_int("period", period)
  check_positive_int("num_lower_steps", num_lower_steps)
  check_positive_int("num_refine_steps", num_refine_steps, allow_zero=True)
  if linear_radius is not None:
    check_positive("linear_radius", linear_radius)

  def init(x, y, *, key=None, data=None) -> BOREPState:
    sampler = _base.prepare(problem, x, y, data, key,
                            differentiates_projection=True)
    if num_refine_steps:
      y, _, sampler, _ = _base.lower_loop(
          problem, refine_optimizer, x, y, refine_optimizer.init(y), sampler,
          data, num_refine_steps)
    return BOREPState(
        x=x, y=y, z=optax.tree.zeros_like(y),
        upper_opt_state=upper_optimizer.init(x),
        lower_opt_state=lower_optimizer.init(y),
        linear_opt_state=linear_optimizer.init(y), sampler=sampler,
        num_steps=jnp.zeros((), jnp.int32))

  def step(state: BOREPState, data=None):
    _base.check_step_data(state.sampler, data)
    x, t = state.x, state.num_steps
    lower_updated = (t >= 1) & (t % period == 0)

    def update_lower(operands):
      y, opt_state, sampler = operands
      y, opt_state, sampler, _ = _base.lower_loop(
          problem, lower_optimizer, x, y, opt_state, sampler, data,
          num_lower_steps)
      return y, opt_state, sampler

    y, lower_opt_state, sampler = jax.lax.cond(
        lower_updated, update_lower, lambda operands: operands,
        (state.y, state.lower_opt_state, state.sampler))

    lower_batch, sampler = _data.sample(sampler, data, "lower")
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    estimate = single_loop_estimate(problem, x, y, state.z, upper_batch,
                                    lower_batch)
    z, linear_opt_state = linear_descent(
        linear_optimizer, estimate.linear_grad, state.linear_opt_state,
        state.z, linear_radius)
    x_next, upper_opt_state = _base.update_x(
        problem, upper_optimizer, estimate.hypergradient,
        state.upper_opt_state, x)
    info = BOREPInfo(
        upper_loss=estimate.upper_loss,
        lower_grad_norm=optax.tree.norm(estimate.lower_grad),
        hypergradient_norm=optax.tree.norm(estimate.hypergradient),
        linear_residual_norm=estimate.linear_residual_norm,
        momentum_norm=optax.tree.norm(upper_opt_state[0].ema),
        lower_updated=lower_updated)
    return BOREPState(x_next, y, z, upper_opt_state, lower_opt_state,
                      linear_opt_state, sampler, t + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1, lower_grads=num_lower_steps,
                                   hvps=1, cross_products=1)
  return _base.BilevelSolver(init, step, oracle_calls)
