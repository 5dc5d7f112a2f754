"""Eager checks of concrete hyperparameters (traced values pass unchecked)."""

from __future__ import annotations

import numbers
from typing import Any

import optax


def _is_concrete_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """``ValueError`` if ``value`` is a concrete number that is not positive."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number; got {value!r}.")
  if _is_concrete_number(value):
    if value != value:  # NaN
      raise ValueError(f"{name} must be a number; got NaN.")
    if value < 0 or (value == 0 and not allow_zero):
      bound = "non-negative" if allow_zero else "positive"
      raise ValueError(f"{name} must be {bound}; got {value}.")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False
                       ) -> None:
  """``ValueError``/``TypeError`` unless ``value`` is a positive Python int."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int (it fixes the shape of the "
                    f"computation); got {value!r}.")
  if value < 0 or (value == 0 and not allow_zero):
    bound = "non-negative" if allow_zero else "positive"
    raise ValueError(f"{name} must be {bound}; got {value}.")


def check_in_interval(name: str, value: Any, low: float, high: float) -> None:
  """``ValueError`` if a concrete ``value`` is outside ``[low, high)``."""
  if _is_concrete_number(value) and not low <= value < high:
    raise ValueError(f"{name} must lie in [{low}, {high}); got {value}.")


def as_optimizer(name: str, value: Any) -> optax.GradientTransformation:
  """An optax optimizer from an optimizer, a step size or a schedule.

  A float or a schedule (a callable of the step count) becomes plain gradient
  descent, ``optax.sgd(value)``. Concrete step sizes must be positive.
  """
  if isinstance(value, optax.GradientTransformation):
    return value
  if callable(value):
    return optax.sgd(value)
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a step size, a schedule or an optax "
                    f"optimizer; got {value!r}.")
  if not (_is_concrete_number(value) or hasattr(value, "dtype")):
    raise TypeError(f"{name} must be a step size, a schedule or an optax "
                    f"optimizer; got {type(value).__name__}.")
  check_positive(name, value)
  return optax.sgd(value)

