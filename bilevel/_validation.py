"""Eager checks of concrete hyperparameters (traced values pass unchecked).

Every check raises at solver construction, with a message that names the
argument, says what was received and how to fix it. Values that are JAX
tracers (a solver built inside ``jax.jit`` or ``jax.vmap``) are checked for
their shape and dtype only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

_OPTIMIZER_HINT = (
    "Pass an optax optimizer (call the factory: optax.adam(1e-3), not "
    "optax.adam), a positive step size such as 0.1, or a schedule "
    "step -> step size such as optax.schedules.cosine_decay_schedule(0.1, "
    "1000).")


def _is_concrete_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_array(value: Any) -> bool:
  """Whether ``value`` is an array (JAX, NumPy, a tracer or a NumPy scalar)."""
  return hasattr(value, "dtype") and hasattr(value, "shape")


def describe_value(value: Any) -> str:
  """A short description of ``value`` for error messages."""
  if _is_array(value):
    dtype = getattr(value.dtype, "name", str(value.dtype))
    return f"an array of dtype {dtype} and shape {tuple(value.shape)}"
  if callable(value):
    name = getattr(value, "__qualname__", None) or type(value).__name__
    return f"the callable {name}"
  text = repr(value)
  if len(text) > 60:
    text = text[:57] + "..."
  return f"{text} (type {type(value).__name__})"


def _concrete_scalar(name: str, value: Any) -> float | None:
  """The value of a scalar number or array; ``None`` for a tracer.

  Raises:
    TypeError: if ``value`` is neither a real number nor a real array.
    ValueError: if ``value`` is an array that is not a scalar.
  """
  if isinstance(value, bool) or not (_is_concrete_number(value)
                                     or _is_array(value)):
    raise TypeError(f"{name} must be a number; got {describe_value(value)}.")
  if _is_concrete_number(value):
    return float(value)
  dtype = value.dtype
  if jnp.issubdtype(dtype, jnp.bool_) or not (
      jnp.issubdtype(dtype, jnp.floating) or
      jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{name} must be a real number; got "
                    f"{describe_value(value)}.")
  if tuple(value.shape):
    raise ValueError(f"{name} must be a scalar; got {describe_value(value)}. "
                     "Pass one number.")
  if isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """Checks that ``value`` is a positive (or non-negative) finite number.

  Python numbers and concrete scalar arrays are checked for their value;
  tracers only for being real scalars.

  Raises:
    TypeError: if ``value`` is not a real number or scalar array.
    ValueError: if it is NaN, infinite, negative, or zero without
      ``allow_zero``, or an array that is not a scalar.
  """
  number = _concrete_scalar(name, value)
  if number is None:
    return
  if math.isnan(number):
    raise ValueError(f"{name} must be a number; got NaN.")
  if math.isinf(number):
    raise ValueError(f"{name} must be finite; got {number}.")
  if number < 0 or (number == 0 and not allow_zero):
    bound = "non-negative" if allow_zero else "positive"
    shown = value if _is_concrete_number(value) else number
    raise ValueError(f"{name} must be {bound}; got {shown}.")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False
                       ) -> None:
  """Checks that ``value`` is a positive (or non-negative) Python int.

  Raises:
    TypeError: if ``value`` is not an int (a float, a bool, an array).
    ValueError: if it is negative, or zero without ``allow_zero``.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int (it fixes the shape of the "
                    f"computation); got {describe_value(value)}. Pass a "
                    "Python int, e.g. int(...).")
  if value < 0 or (value == 0 and not allow_zero):
    bound = "non-negative" if allow_zero else "positive"
    raise ValueError(f"{name} must be {bound}; got {value}.")


def check_bool(name: str, value: Any) -> None:
  """``TypeError`` unless ``value`` is a Python (or NumPy) bool.

  A flag fixes the structure of the computation, so it cannot be traced;
  anything else (``"no"``, ``0``, ``None``) is refused rather than read by
  its truthiness.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool (True or False); got "
                    f"{describe_value(value)}.")


def check_in_interval(name: str, value: Any, low: float, high: float) -> None:
  """``ValueError`` if a concrete ``value`` is outside ``[low, high)``."""
  if _is_concrete_number(value) and not low <= value < high:
    raise ValueError(f"{name} must lie in [{low}, {high}); got {value}.")


def _is_step_size_like(value: Any) -> bool:
  return _is_concrete_number(value) or isinstance(value, jax.Array)


def check_schedule(name: str, schedule: Any) -> None:
  """Checks that a callable maps a step count to a scalar step size.

  Evaluates ``schedule`` abstractly (``jax.eval_shape``, no FLOPs) on an
  int32 step count, as optax does.

  Raises:
    TypeError: if the call fails or does not return a real scalar, e.g. for
      an optimizer factory such as ``optax.adam`` given uncalled.
  """
  returned = []

  def probe(count):
    out = schedule(count)
    returned.append(out)
    return out if _is_step_size_like(out) else None

  try:
    out = jax.eval_shape(probe, jnp.zeros((), jnp.int32))
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(
        f"{name} is a callable, so it is taken as a step-size schedule "
        "step -> step size, but calling it on a step count failed with "
        f"{type(error).__name__}: {str(error).splitlines()[0]} "
        f"(got {describe_value(schedule)}). {_OPTIMIZER_HINT}") from error
  if out is None:
    kind = type(returned[0]).__name__ if returned else "nothing"
    raise TypeError(
        f"{name} is a callable, so it is taken as a step-size schedule "
        f"step -> step size, but {describe_value(schedule)} returned a "
        f"{kind}, not a scalar step size. {_OPTIMIZER_HINT}")
  numeric = (jnp.issubdtype(out.dtype, jnp.floating) or
             jnp.issubdtype(out.dtype, jnp.integer))
  if out.shape != () or not numeric or jnp.issubdtype(out.dtype, jnp.bool_):
    raise TypeError(
        f"{name} is a callable, so it is taken as a step-size schedule "
        f"step -> step size, but {describe_value(schedule)} returned "
        f"{out.dtype.name}{list(out.shape)}, not a real scalar. "
        f"{_OPTIMIZER_HINT}")


def as_optimizer(name: str, value: Any) -> optax.GradientTransformation:
  """An optax optimizer from an optimizer, a step size or a schedule.

  A number or a schedule (a callable of the step count) becomes plain
  gradient descent, ``optax.sgd(value)``. Concrete step sizes must be
  positive and finite; schedules are checked abstractly (see
  :func:`check_schedule`). Optax optimizers, including
  ``optax.GradientTransformationExtraArgs``, pass as they are.

  Raises:
    TypeError: if ``value`` is none of the three.
    ValueError: if a concrete step size is not positive and finite, or an
      array step size is not a scalar.
  """
  if isinstance(value, optax.GradientTransformation):
    return value
  if callable(value):
    check_schedule(name, value)
    return optax.sgd(value)
  if isinstance(value, bool) or not (_is_concrete_number(value)
                                     or _is_array(value)):
    raise TypeError(f"{name} must be an optax optimizer, a step size or a "
                    f"schedule; got {describe_value(value)}. "
                    f"{_OPTIMIZER_HINT}")
  check_positive(f"{name} (a step size)", value)
  return optax.sgd(value)


def check_step_size(name: str, value: Any) -> None:
  """A step size: a positive number (or array) or a schedule of the count.

  For solvers whose update rule fixes the optimizer (e.g. BO-REP's
  normalized momentum) and takes only its step size.

  Raises:
    TypeError: for an optax optimizer, a non-number, or a callable that is
      not a schedule.
    ValueError: for a concrete step size that is not positive.
  """
  if isinstance(value, optax.GradientTransformation):
    raise TypeError(f"{name} is a step size (a number or a schedule step -> "
                    "step size), not an optax optimizer: this solver's "
                    "update rule fixes the optimizer.")
  if callable(value):
    check_schedule(name, value)
    return
  check_positive(name, value)


def as_schedule(name: str, value: Any) -> Callable[[jax.Array], jax.Array]:
  """A positive number or a schedule, as a schedule of the step count."""
  check_step_size(name, value)
  if callable(value):
    return value
  # A Python number stays weakly typed: it takes the dtype of the iterates.
  return lambda count: value
