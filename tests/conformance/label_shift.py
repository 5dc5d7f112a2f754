"""Hyper-cleaning data whose validation (upper) labels are all wrong.

The tests of "one meaning for y" (tests/test_result_y.py,
tests/test_bome_y.py, tests/test_lvhba.py) run a solver twice with ``x``
held fixed, once on these labels: the lower iterate ``y`` must come out bit
for bit the same, the penalised ``y_penalized`` must not.
"""

import dataclasses

import jax.numpy as jnp


def shifted_validation_labels(data, num_classes: int = 10):
  """``data`` with every upper label moved to the next class."""
  labels = data.upper["labels"]
  shifted = dataclasses.replace(
      data, upper={**data.upper, "labels": (labels + 1) % num_classes})
  assert bool(jnp.all(shifted.upper["labels"] != labels))
  return shifted
