"""Problems for the tests of "one meaning for y".

tests/test_result_y.py, tests/test_bome_y.py and tests/test_lvhba.py run a
solver twice with ``x`` held fixed, once on hyper-cleaning data whose
validation labels are all wrong: the lower iterate ``y`` must come out bit
for bit the same, the penalised ``y_penalized`` must not. And they run it
on a lower level that is flat in one direction, where the two differ.
"""

import dataclasses

import jax.numpy as jnp

import bilevel


def shifted_validation_labels(data, num_classes: int = 10):
  """``data`` with every upper label moved to the next class."""
  labels = data.upper["labels"]
  shifted = dataclasses.replace(
      data, upper={**data.upper, "labels": (labels + 1) % num_classes})
  assert bool(jnp.all(shifted.upper["labels"] != labels))
  return shifted


def flat_lower_problem() -> bilevel.Problem:
  """Lower solutions that are not unique, from the math.

  x in R, y in R^2: g = (y1 - x)^2 / 2 does not depend on y2, so the lower
  solutions are {y1 = x}; f = (y2 - 1)^2 / 2 + x^2 / 2. The optimistic
  solution is x* = 0, y = (0, 1); gradient descent on g alone never moves
  y2.
  """
  def upper(x, y, batch):
    del batch
    return 0.5 * (y[1] - 1.0) ** 2 + 0.5 * x ** 2

  def lower(x, y, batch):
    del batch
    return 0.5 * (y[0] - x) ** 2

  return bilevel.Problem(upper, lower)
