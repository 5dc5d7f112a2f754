r"""ITD: iterative (unrolled) differentiation, warm-started.

At step :math:`t`:

.. math::

   y_t^{(0)} &= y_t, \qquad
   y_t^{(k+1)} = \text{lower optimizer step on } g(x_t, \cdot)
      \text{ from } y_t^{(k)}, \quad k < K \\
   h_t &= \frac{d}{dx} f\big(x, y_t^{(K)}(x)\big)\Big|_{x = x_t}
      \text{ (reverse mode through the K steps)} \\
   x_{t+1} &= \Pi_X(\text{upper optimizer step along } h_t), \qquad
   y_{t+1} = y_t^{(K)}.

The starting point :math:`y_t` is treated as a constant (truncated
back-propagation across upper steps), and the lower optimizer's state is
fresh at every unroll so that the unrolled map is the same function of ``x``
at every step.

References:
  Maclaurin, Duvenaud & Adams, "Gradient-based hyperparameter optimization
  through reversible learning", ICML 2015. Franceschi et al., "Forward and
  reverse gradient-based hyperparameter optimization", ICML 2017.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from bilevel import _base, _data
from bilevel._problem import Problem
from bilevel._validation import as_optimizer, check_positive_int
from bilevel.hypergradient import unrolled_hypergradient_and_info

PyTree = Any


class ITDState(NamedTuple):
  """State of :func:`itd`."""
  x: PyTree
  y: PyTree
  upper_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


def itd(problem: Problem, *, upper_optimizer: Any = 1.0,
        lower_optimizer: Any = 0.5, num_lower_steps: int = 20
        ) -> _base.BilevelSolver:
  """Unrolled differentiation (ITD) with warm-started lower iterates.

  Args:
    problem: the bilevel problem.
    upper_optimizer: optax optimizer, step size or schedule for ``x``.
    lower_optimizer: optax optimizer, step size or schedule for the unrolled
      lower steps (differentiated through).
    num_lower_steps: unrolled steps per upper step, ``K``; memory grows
      linearly with it.

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs ``1 Gf + K Gg`` forward
    and a reverse pass through them (about ``K`` HVP + ``K`` JVP).
  """
  _base.require_unconstrained(problem, "itd")
  upper_optimizer = as_optimizer("upper_optimizer", upper_optimizer)
  as_optimizer("lower_optimizer", lower_optimizer)  # validates eagerly
  check_positive_int("num_lower_steps", num_lower_steps)

  def init(x, y, *, key=None, data=None) -> ITDState:
    sampler = _base.prepare(problem, x, y, data, key)
    return ITDState(x=x, y=y, upper_opt_state=upper_optimizer.init(x),
                    sampler=sampler,
                    num_steps=jax.numpy.zeros((), jax.numpy.int32))

  def step(state: ITDState, data=None):
    _base.check_step_data(state.sampler, data)
    lower_batch, lower_batches, sampler = _base.lower_batches(
        state.sampler, data, num_lower_steps)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    hypergradient, unrolled = unrolled_hypergradient_and_info(
        problem, state.x, state.y, upper_batch, lower_batch,
        lower_optimizer=lower_optimizer, num_steps=num_lower_steps,
        lower_batches=lower_batches)
    x, upper_opt_state, info = _base.upper_step(
        problem, upper_optimizer, hypergradient, state.upper_opt_state,
        state.x, upper_loss=unrolled.upper_loss,
        lower_grad_norm=unrolled.lower_grad_norm,
        linear_residual_norm=jax.numpy.zeros_like(unrolled.upper_loss))
    return ITDState(x, unrolled.y, upper_opt_state, sampler,
                    state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(
      upper_grads=1, lower_grads=num_lower_steps, hvps=num_lower_steps,
      cross_products=num_lower_steps)
  return _base.BilevelSolver(init, step, oracle_calls)
