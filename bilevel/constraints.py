r"""Lower-level constraints that may couple ``x`` and ``y``.

A :class:`bilevel.Problem` describes a constrained lower level

.. math::

   y^*(x) \in \arg\min_{y \in Y} \{\, g(x, y) :
       c(x, y) \le 0,\; e(x, y) = 0 \,\}

with ``lower_constraints`` :math:`c` and ``lower_equality_constraints``
:math:`e` (pytree-valued) and, optionally, ``project_xy``, the projection onto
a joint convex set of :math:`(x, y)`. This module holds what solvers share
about them: their values, their violation, the multiplier box and a quadratic
penalty that turns the problem into one any unconstrained solver accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bilevel._problem import Problem
from bilevel._validation import check_bool, check_positive

PyTree = Any


def values(problem: Problem, x: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
  """The constraint values ``(c(x, y), e(x, y))``; ``()`` for an absent one."""
  inequality = (() if problem.lower_constraints is None
                else problem.lower_constraints(x, y))
  equality = (() if problem.lower_equality_constraints is None
              else problem.lower_equality_constraints(x, y))
  return inequality, equality


def violation(problem: Problem, x: PyTree, y: PyTree) -> jax.Array:
  r"""The largest constraint violation at ``(x, y)``.

  .. math:: \max\bigl(\max_i [c_i(x, y)]_+,\ \max_j |e_j(x, y)|\bigr)

  Returns:
    A scalar, ``0`` when ``y`` is feasible for ``x`` or the problem has no
    constraints.
  """
  inequality, equality = values(problem, x, y)
  parts = [jnp.max(jnp.maximum(leaf, 0.0)) for leaf in
           jax.tree.leaves(inequality) if jnp.size(leaf)]
  parts += [jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(equality)
            if jnp.size(leaf)]
  if not parts:
    return jnp.zeros((), jax.tree.leaves(y)[0].dtype)
  return jnp.max(jnp.stack(parts))


def project_multipliers(multipliers: tuple[PyTree, PyTree],
                        bound: float) -> tuple[PyTree, PyTree]:
  """Clips multipliers of ``(c, e)`` to ``[0, bound]`` and ``[-bound, bound]``.

  Inequality multipliers are nonnegative; equality multipliers have either
  sign. ``bound`` may be ``inf``.
  """
  inequality, equality = multipliers
  return (jax.tree.map(lambda m: jnp.clip(m, 0.0, bound), inequality),
          jax.tree.map(lambda m: jnp.clip(m, -bound, bound), equality))


def penalize(problem: Problem, weight: float, *,
             drop_joint_projection: bool = False) -> Problem:
  r"""The problem with its lower constraints moved into ``g`` as a penalty.

  .. math::

     g_\rho(x, y) = g(x, y) + \frac{\rho}{2} \sum_i [c_i(x, y)]_+^2
         + \frac{\rho}{2} \sum_j e_j(x, y)^2

  The returned problem has no constraint fields, so every solver accepts it;
  its lower solutions violate the constraints by :math:`O(1/\rho)` (the
  multiplier over :math:`\rho`). On a lower level that is not strongly convex
  (e.g. linear in part of ``y``) use a solver that allows non-unique lower
  solutions, such as :func:`bilevel.solvers.penalty`. This is the baseline
  against which :func:`bilevel.solvers.lvhba` is compared.

  Args:
    problem: a problem with lower constraints.
    weight: :math:`\rho > 0`.
    drop_joint_projection: ``project_xy`` cannot be kept (the unconstrained
      solvers project ``x`` and ``y`` separately). When it only re-imposes
      the lower constraints, as in the problems of :mod:`problems.constrained`,
      pass ``True`` to drop it; it is an error to leave it set otherwise.

  Returns:
    A :class:`bilevel.Problem` with ``lower`` replaced by :math:`g_\rho`,
    the same ``upper``, ``project_x`` and ``project_y``, and no constraints.

  Raises:
    ValueError: if ``weight`` is not positive, or if ``problem`` has
      ``project_xy`` and ``drop_joint_projection`` is false.
  """
  if not isinstance(problem, Problem):
    raise TypeError("penalize expects a bilevel.Problem; got "
                    f"{type(problem).__name__}.")
  check_positive("weight", weight)
  check_bool("drop_joint_projection", drop_joint_projection)
  if problem.project_xy is not None and not drop_joint_projection:
    raise ValueError(
        "The problem has Problem.project_xy, which the penalized problem "
        "cannot keep: unconstrained solvers project x and y separately. If "
        "the joint set only re-imposes the lower constraints, pass "
        "drop_joint_projection=True; otherwise express it with project_x "
        "and project_y.")

  def lower(x, y, batch):
    inequality, equality = values(problem, x, y)
    squares = optax.tree.sum(jax.tree.map(
        lambda c: jnp.sum(jnp.maximum(c, 0.0) ** 2), inequality))
    squares = squares + optax.tree.sum(jax.tree.map(
        lambda e: jnp.sum(e ** 2), equality))
    return problem.lower(x, y, batch) + 0.5 * weight * squares

  return dataclasses.replace(problem, lower=lower, lower_constraints=None,
                             lower_equality_constraints=None,
                             project_xy=None)
