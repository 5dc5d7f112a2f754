r"""StocBiO: stochastic bilevel optimizer with a Neumann-series inverse.

At step :math:`t`, each oracle on its own fresh minibatch:

.. math::

   y_{t+1} &= \text{K lower optimizer steps on } g(x_t, \cdot)
      \text{ from } y_t \\
   v_t &= \eta \sum_{q=0}^{Q} \prod_{j=1}^{q} (I - \eta H_j)\,
      \nabla_y f(x_t, y_{t+1}) \quad (H_j \text{ on fresh batches}) \\
   h_t &= \nabla_x f(x_t, y_{t+1}) - J v_t \\
   x_{t+1} &= \Pi_X(\text{upper optimizer step along } h_t)

The series is evaluated as ``Q`` Richardson steps
:math:`v \leftarrow v - \eta (H_j v - \nabla_y f)` from :math:`v = \eta
\nabla_y f` (:func:`bilevel.linear_solve.neumann_series`): with one batch this
is exactly the partial sum above; with fresh batches the products come in the
reverse order, which has the same expectation.

**Bias.** The series stops after Q + 1 terms: it misses (I - eta H)^(Q+1)
H^-1 grad_y f, so the part of the hypergradient along a lower curvature mu
is shrunk by (1 - eta mu)^(Q+1), and the iterates converge to the zero of
that truncated hypergradient. No fixed Q suits every mu; take Q + 1 >=
log(1/eps) / (eta mu). On the quadratics of
``tests/conformance/quadratics.py`` (x in R^50, y in R^40, lower level
1-smooth and mu = 1/kappa strongly convex), the defaults (Q = 10, eta = 0.5)
stop after 5000 steps at relative error 0.013 (kappa = 2) and 0.68 (kappa =
100), the zeros of the truncated hypergradient, with or without minibatches.
``num_neumann_terms`` = 48 and 2756 (the rule with eps = 1e-6) reach 1.3e-7
and 3.0e-8 in 2000 steps. Each term costs one HVP: for ill-conditioned lower
levels conjugate gradients (:func:`aid`) are cheaper.
``tests/test_defaults.py`` checks the bias against its closed form and the
rule.

References:
  Ji, Yang & Liang, "Bilevel optimization: convergence analysis and enhanced
  design", ICML 2021.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from bilevel import _base, _data, derivatives
from bilevel import linear_solve as linear_solve_lib
from bilevel._problem import Problem
from bilevel.hypergradient import hypergradient_from_solution
from bilevel._validation import (as_optimizer, check_positive,
                                 check_positive_int)

PyTree = Any


class StocBiOState(NamedTuple):
  """State of :func:`stocbio`."""
  x: PyTree
  y: PyTree
  upper_opt_state: PyTree
  lower_opt_state: PyTree
  sampler: _data.SamplerState
  num_steps: jax.Array


def stocbio(problem: Problem, *, upper_optimizer: Any = 1.0,
            lower_optimizer: Any = 0.5, num_lower_steps: int = 10,
            neumann_step_size: float = 0.5, num_neumann_terms: int = 10
            ) -> _base.BilevelSolver:
  """StocBiO.

  Args:
    problem: the bilevel problem (lower level strongly convex in ``y``).
    upper_optimizer: optax optimizer, step size or schedule for ``x``.
    lower_optimizer: optax optimizer, step size or schedule for ``y``.
    num_lower_steps: lower steps per upper step, ``K``.
    neumann_step_size: :math:`\\eta`, below ``2 / L`` of the lower level.
    num_neumann_terms: ``Q``, Hessian-vector products per step.

  Returns:
    A :class:`bilevel.BilevelSolver`; one step costs
    ``1 Gf + K Gg + Q HVP + 1 JVP``.
  """
  _base.require_unconstrained(problem, "stocbio")
  upper_optimizer = as_optimizer("upper_optimizer", upper_optimizer)
  lower_optimizer = as_optimizer("lower_optimizer", lower_optimizer)
  check_positive_int("num_lower_steps", num_lower_steps)
  check_positive("neumann_step_size", neumann_step_size)
  check_positive_int("num_neumann_terms", num_neumann_terms)

  def init(x, y, *, key=None, data=None) -> StocBiOState:
    sampler = _base.prepare(problem, x, y, data, key,
                            differentiates_projection=True)
    return StocBiOState(
        x=x, y=y, upper_opt_state=upper_optimizer.init(x),
        lower_opt_state=lower_optimizer.init(y), sampler=sampler,
        num_steps=jax.numpy.zeros((), jax.numpy.int32))

  def step(state: StocBiOState, data=None):
    _base.check_step_data(state.sampler, data)
    x = state.x
    y, lower_opt_state, sampler, lower_grad_norm = _base.lower_loop(
        problem, lower_optimizer, x, state.y, state.lower_opt_state,
        state.sampler, data, num_lower_steps)
    upper_batch, sampler = _data.sample(sampler, data, "upper")
    upper_loss, grad_x_f, grad_y_f = derivatives.upper_value_and_grads(
        problem, x, y, upper_batch)
    fixed_batch, neumann_batches, sampler = _base.lower_batches(
        sampler, data, num_neumann_terms)
    tangent = derivatives.implicit_tangent(
        problem, x, y, _base.first_batch(fixed_batch, neumann_batches))
    rhs = derivatives.tangent_apply(tangent, grad_y_f)
    if neumann_batches is None:
      v = linear_solve_lib.neumann_series(
          lambda u: derivatives.implicit_hvp(problem, x, y, u, fixed_batch,
                                             tangent),
          rhs, step_size=neumann_step_size, num_terms=num_neumann_terms)
    else:
      v = linear_solve_lib.neumann_series(
          lambda u, batch: derivatives.implicit_hvp(problem, x, y, u, batch,
                                                    tangent),
          rhs, step_size=neumann_step_size, num_terms=num_neumann_terms,
          operands=neumann_batches)
    cross_batch, sampler = _data.sample(sampler, data, "lower")
    hypergradient, residual = hypergradient_from_solution(
        problem, x, y, v, grad_x_f, grad_y_f, cross_batch, tangent)
    x, upper_opt_state, info = _base.upper_step(
        problem, upper_optimizer, hypergradient, state.upper_opt_state, x,
        upper_loss=upper_loss, lower_grad_norm=lower_grad_norm,
        linear_residual_norm=residual)
    return StocBiOState(x, y, upper_opt_state, lower_opt_state, sampler,
                        state.num_steps + 1), info

  oracle_calls = _base.OracleCalls(
      upper_grads=1,
      lower_grads=num_lower_steps + _base.tangent_grads(problem),
      hvps=num_neumann_terms, cross_products=1)
  return _base.BilevelSolver(init, step, oracle_calls)
