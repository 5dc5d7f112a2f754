r"""BOME: bilevel optimization made easy (Liu, Ye, Wright, Stone & Liu, 2022).

A first-order method on the value-function reformulation
:math:`\min_{x, y} f(x, y)` subject to :math:`q(x, y) = g(x, y) - \min_{y'}
g(x, y') \le 0`, with :math:`\min_{y'} g` estimated by ``T`` gradient
steps. The paper's joint variable (its :math:`\theta`, here :math:`\tilde
y`, ``state.y_penalized``) moves with :math:`x`. At step :math:`k`:

.. math::

   \hat y &= T \text{ lower steps on } g(x_k, \cdot) \text{ from }
       \tilde y_k \quad (\text{no gradient through them}) \\
   \nabla q &= \bigl(\nabla_x g(x_k, \tilde y_k) - \nabla_x g(x_k, \hat y),\;
       \nabla_y g(x_k, \tilde y_k)\bigr) \\
   \lambda_k &= \max\Bigl(\frac{\phi_k - \langle \nabla f, \nabla q \rangle}
       {\|\nabla q\|^2}, 0\Bigr), \qquad
       \phi_k = \eta \|\nabla q\|^2 \ (\text{or } \eta\, q) \\
   (x_{k+1}, \tilde y_{k+1}) &= \Pi_{X \times Y}\bigl((x_k, \tilde y_k)
       - \alpha (\nabla f + \lambda_k \nabla q)\bigr) \\
   y_{k+1} &= \Pi_Y\bigl(y_k - \text{step}(\nabla_y g(x_k, y_k))\bigr)

with :math:`\nabla f = (\nabla_x f, \nabla_y f)` at
:math:`(x_k, \tilde y_k)`. :math:`\lambda_k` is the smallest multiplier for
which the joint step decreases ``q`` at rate :math:`\phi_k` (a dynamic
barrier): the direction is the projection of :math:`-\nabla f` onto
:math:`\{d : \langle \nabla q, d \rangle \ge \phi_k\}`. The lower gradients
of :math:`\nabla q` and of the last line are taken on one lower batch.

**The lower iterate** :math:`y` **(ours).** The paper has no iterate of the
lower problem alone: :math:`\tilde y` descends :math:`\nabla_y f +
\lambda_k \nabla_y g`, so it is fitted to the upper (validation) data, and
:math:`\hat y` restarts from :math:`\tilde y_k` at every step (the official
code sets ``xhat.data = x.data.clone()`` before the inner loop, its ``x``
being the lower variable; benchopt's BOME does the same), so it inherits
that fit. ``state.y`` is one step of
``lower_optimizer`` on :math:`g(x_k, \cdot)` per outer step (its own
optimizer state, ``project_y`` applied), warm-started from its previous
value and started at ``y0``; it never reads :math:`\tilde y` or ``f``, so
it depends on the upper data only through :math:`x`. It costs one lower
gradient per step and does not enter the update of :math:`(x, \tilde y)`.
Like the lower iterate of a single-loop method, it follows
:math:`y^*(x_k)` at the rate of one lower step per change of :math:`x`.

**Which y to use.** ``state.y`` (``bilevel.run(...).y``) is the model to
evaluate or deploy: a minimiser (approximately) of :math:`g(x, \cdot)`
that never saw the upper data. ``state.y_penalized``
(``bilevel.run(...).y_penalized``) is the paper's :math:`\theta`: BOME
behaves like the value-function penalty :math:`f + \lambda (g - \min g)`
(see below), so it lies near the optimistic lower solution (the lower
minimiser best for ``f``); report it when lower solutions are not unique
and that solution is wanted. With a unique lower solution both approach
:math:`y^*(x)`, :math:`\tilde y` with the bias below.

**Bias.** Two sources, on a :math:`\mu`-strongly convex, :math:`L_g`-smooth
lower level with inner step :math:`\gamma`:

* *The T inner steps.* With :math:`\hat y` at :math:`T` steps from
  :math:`\tilde y`, :math:`\nabla_x q` sees :math:`I - (I - \gamma H)^T` of the
  distance to :math:`y^*(x)`; as :math:`\alpha \to 0` BOME follows the
  hypergradient of :func:`bilevel.solvers.itd` with ``K = T``, biased by
  :math:`(1 - \gamma \mu)^T`. :math:`T \ge \log(1/\epsilon) /
  (\gamma \mu)` removes it.
* *The constant joint step* :math:`\alpha`. The multiplier grows until the
  step on :math:`\tilde y` reaches its stability limit, :math:`\alpha
  \lambda_k L_g \approx 2` (:math:`\tilde y` then alternates between two points; measured
  :math:`\lambda_k \approx 1.7/\alpha` to :math:`1.8/\alpha` with
  :math:`L_g = 1`), and BOME behaves like the value-function penalty
  :math:`f + \lambda (g - \min g)` with :math:`\lambda \approx 2 /
  (\alpha L_g)`, whose minimiser is :math:`O(1/(\lambda \mu)) =
  O(\alpha L_g / \mu)` away from :math:`x^*` (see
  :func:`bilevel.solvers.f2sa`). Only :math:`\alpha \to 0` removes it,
  and the number of steps grows like :math:`1/\alpha`.

On the quadratics of ``tests/conformance/quadratics.py`` (``x`` in
:math:`R^{50}`, ``y`` in :math:`R^{40}`, lower level 1-smooth,
:math:`\mu = 1/\kappa`), the defaults (:math:`\alpha = 0.1`, ``T = 10``,
:math:`\eta = 0.5`) stop after 5000 steps at relative error
:math:`\|x - x^*\| / \|x^*\|` = 0.099 (:math:`\kappa = 2`) and 0.90
(:math:`\kappa = 100`); the truncation alone accounts for 0.018 and 0.70.
With ``T`` from the rule (49 and 2757 for :math:`\epsilon = 10^{-6}`), the
error is the step-size part, about :math:`0.9 \alpha` for
:math:`\kappa = 2` (9.2e-3 at :math:`\alpha = 0.01` after 20000 steps,
9.3e-4 at :math:`10^{-3}` after :math:`10^5`) and :math:`10 \alpha` for
:math:`\kappa = 100` (0.10 at :math:`\alpha = 0.01`): between
:math:`0.1\, \alpha / \mu` and :math:`0.5\, \alpha / \mu`. BOME therefore
reaches :math:`x^*` only to an accuracy proportional to :math:`\alpha /
\mu`; prefer :func:`bilevel.solvers.aid` or :func:`bilevel.solvers.soba`
when the lower level is strongly convex and accuracy matters. With
minibatches (32 samples) it is worse: the noise keeps
:math:`\|\nabla q\|` away from 0, the multiplier stays small, and the
error stays near 0.2 at :math:`\kappa = 2` (0.22 with the defaults, 0.20
with ``T = 49``, :math:`\alpha = 0.01`) and above 0.5 at
:math:`\kappa = 100` (0.92 with the defaults, 0.55 with ``T = 2757``,
:math:`\alpha = 0.01`), averaged iterates included.
``tests/test_defaults.py`` checks the truncation, the proportionality to
:math:`\alpha` and the penalty with :math:`\lambda = 2 / (\alpha L_g)`.

References:
  Liu, Ye, Wright, Stone & Liu, "BOME! Bilevel optimization made easy: a
  simple first-order approach", NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import _base, _data, derivatives
from bilevel._problem import Problem
from bilevel._validation import (as_optimizer, check_positive,
                                 check_positive_int, check_step_size)
from bilevel.hypergradient import lower_descent

PyTree = Any

_CONTROLS = ("grad_norm", "value")


class BOMEState(NamedTuple):
  r"""State of :func:`bome`.

  Attributes:
    x: upper variable :math:`x_k`.
    y: the lower iterate :math:`y_k`, one ``lower_optimizer`` step on
      :math:`g(x, \cdot)` per outer step; never sees the upper data (what
      :func:`bilevel.run` reports as ``result.y``).
    y_penalized: the paper's joint variable :math:`\tilde y_k` (its
      :math:`\theta`), moved with ``x`` along :math:`\nabla f + \lambda_k
      \nabla q` (``result.y_penalized``).
    upper_opt_state: state of the joint step on ``x``.
    y_penalized_opt_state: state of the joint step on ``y_penalized``.
    inner_opt_state: state of ``lower_optimizer`` in the ``T`` inner steps
      computing :math:`\hat y`.
    y_opt_state: state of ``lower_optimizer`` for ``y``.
    sampler: minibatch sampler.
    num_steps: outer steps taken.
  """
  x: PyTree
  y: PyTree
  y_penalized: PyTree
  upper_opt_state: PyTree
  y_penalized_opt_state: PyTree
  inner_opt_state: PyTree
  y_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


class BOMEInfo(NamedTuple):
  r"""Diagnostics of one step.

  Attributes:
    upper_loss: :math:`f(x_k, \tilde y_k)` on the upper batch.
    lower_grad_norm: :math:`\|\nabla_y g(x_k, y_k)\|` at the lower iterate
      ``y``, before its step.
    hypergradient_norm: norm of the ``x`` part of :math:`\nabla f +
      \lambda_k \nabla q`.
    multiplier: :math:`\lambda_k`.
    lower_gap: :math:`q(x_k, \tilde y_k) = g(x_k, \tilde y_k) - g(x_k,
      \hat y)`, the lower suboptimality of ``y_penalized`` as BOME
      estimates it.
  """
  upper_loss: jax.Array
  lower_grad_norm: jax.Array
  hypergradient_norm: jax.Array
  multiplier: jax.Array
  lower_gap: jax.Array


def bome(problem: Problem, *, step_size: Any = 0.1,
         lower_optimizer: Any = 0.5, num_lower_steps: int = 10,
         eta: float = 0.5, control: str = "grad_norm"
         ) -> _base.BilevelSolver:
  r"""BOME (see the module docstring for the update rule).

  Args:
    problem: the bilevel problem; ``project_x`` and ``project_y`` apply to
      the joint step, ``project_y`` also to the inner steps and to the
      lower iterate ``y``.
    step_size: :math:`\alpha`, the joint step on ``(x, y_penalized)`` (a
      number or a schedule of the step count). It sets a bias of order
      :math:`\alpha L_g / \mu` (see the module docstring).
    lower_optimizer: optax optimizer, step size or schedule of the ``T``
      inner steps computing :math:`\hat y` (restarted from
      ``y_penalized`` each step; its state persists) and, with a state of
      its own, of the lower iterate ``y`` (warm-started).
    num_lower_steps: ``T``; the value-function estimate is biased by about
      :math:`(1 - \gamma \mu)^T`.
    eta: :math:`\eta > 0` of the control :math:`\phi_k`.
    control: ``"grad_norm"`` (:math:`\phi = \eta \|\nabla q\|^2`, the
      paper's default) or ``"value"`` (:math:`\phi = \eta\, q`).

  Returns:
    A :class:`bilevel.BilevelSolver` with :class:`BOMEState` and
    :class:`BOMEInfo`; ``init(x, y)`` starts both ``y`` and
    ``y_penalized`` at ``y``. One step costs ``1 Gf + (T + 3) Gg``: the
    paper's ``1 Gf + (T + 2) Gg`` and one lower gradient for ``y``.
  """
  _base.require_unconstrained(problem, "bome")
  check_step_size("step_size", step_size)
  joint_optimizer = optax.sgd(step_size)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  check_positive_int("num_lower_steps", num_lower_steps)
  check_positive("eta", eta)
  if control not in _CONTROLS:
    raise ValueError(f"control must be one of {_CONTROLS}; got {control!r}.")

  def init(x, y, *, key=None, data=None) -> BOMEState:
    sampler = _base.prepare(problem, x, y, data, key)
    return BOMEState(x=x, y=y, y_penalized=y,
                     upper_opt_state=joint_optimizer.init(x),
                     y_penalized_opt_state=joint_optimizer.init(y),
                     inner_opt_state=lower_optimizer.init(y),
                     y_opt_state=lower_optimizer.init(y),
                     sampler=sampler, num_steps=jnp.zeros((), jnp.int32))

  def step(state: BOMEState, data=None):
    _base.check_step_data(state.sampler, data)
    x, y_pen = state.x, state.y_penalized
    y_hat, inner_opt_state, sampler, _ = _base.lower_loop(
        problem, lower_optimizer, x, y_pen, state.inner_opt_state,
        state.sampler, data, num_lower_steps)
    y_hat = jax.lax.stop_gradient(y_hat)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    lower_batch, sampler = _data.sample(sampler, data, "lower")
    upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
        problem, x, y_pen, upper_batch)
    g_y, (grad_x_g, grad_y_g) = jax.value_and_grad(problem.lower, (0, 1))(
        x, y_pen, lower_batch)
    g_hat, grad_x_g_hat = jax.value_and_grad(problem.lower)(x, y_hat,
                                                            lower_batch)
    grad_q = (optax.tree.sub(grad_x_g, grad_x_g_hat), grad_y_g)
    grad_f = (grad_x_f, grad_y_f)
    q = g_y - g_hat
    q_norm2 = optax.tree.vdot(grad_q, grad_q)
    phi = eta * (q_norm2 if control == "grad_norm" else q)
    multiplier = jnp.maximum(phi - optax.tree.vdot(grad_f, grad_q), 0.0) / (
        q_norm2 + jnp.finfo(q_norm2.dtype).tiny)
    direction_x, direction_y = jax.tree.map(
        lambda f_, q_: (f_ + multiplier * q_).astype(f_.dtype), grad_f,
        grad_q)
    x, upper_opt_state = _base.update_x(problem, joint_optimizer,
                                        direction_x, state.upper_opt_state, x)
    updates, y_penalized_opt_state = joint_optimizer.update(
        direction_y, state.y_penalized_opt_state, y_pen)
    y_pen = problem.projected_y(optax.apply_updates(y_pen, updates))
    # The lower iterate: one step on g(x_k, .) alone, on the same batch.
    y, y_opt_state, lower_grad_norm = lower_descent(
        problem, lower_optimizer, state.x, state.y, state.y_opt_state,
        lower_batch)
    info = BOMEInfo(
        upper_loss=upper_loss,
        lower_grad_norm=lower_grad_norm.astype(upper_loss.dtype),
        hypergradient_norm=optax.tree.norm(direction_x),
        multiplier=multiplier.astype(upper_loss.dtype), lower_gap=q)
    return BOMEState(x, y, y_pen, upper_opt_state, y_penalized_opt_state,
                     inner_opt_state, y_opt_state, sampler,
                     state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(upper_grads=1,
                                   lower_grads=num_lower_steps + 3, hvps=0,
                                   cross_products=0)
  return _base.BilevelSolver(init, step, oracle_calls)
