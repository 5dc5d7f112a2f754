"""One registry of solvers and the problem classes each one handles.

Every factory of :mod:`bilevel.solvers` has one :class:`SolverEntry` here,
stating for each problem class of :data:`PROBLEM_CLASSES` whether the solver
*handles* it (and the relative error to ``x*`` it reaches there with its
defaults, on the conformance bank of ``tests/conformance``), *refuses* it
when it is built (at the factory call or at ``init``, with a message that
says what to use instead), or does not support it without being able to
tell (the entry's ``notes`` say which, and the README's table says so).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from bilevel import _base

# The problem classes of the conformance bank.
PROBLEM_CLASSES = (
    "strongly_convex",  # lower level strongly convex, unconstrained
    "nonunique",        # lower level convex with several minimisers
    "box",              # Y a box, bounds active at both ends (project_y)
    "simplex",          # Y the probability simplex (project_y)
    "ball",             # Y a Euclidean ball, active (project_y)
    "coupled",          # lower constraints coupling x and y, no project_xy
    "minibatch",        # f and g expectations over data, minibatches
    "pytree",           # x and y nested pytrees
    "float32",          # single precision
)


class SolverEntry(NamedTuple):
  """What one solver handles.

  Attributes:
    name: the factory's name in :mod:`bilevel.solvers`.
    factory: the factory, ``factory(problem, **hyperparameters)``.
    handles: problem class -> the relative error to ``x*`` that the
      solver reaches with its defaults on the bank's problem of that class.
    refuses: problem classes refused when the solver is built.
    notes: classes neither handled nor refused (the solver cannot tell
      them apart) and other conditions, in words.
  """
  name: str
  factory: Callable[..., _base.BilevelSolver]
  handles: Mapping[str, float]
  refuses: tuple[str, ...] = ()
  notes: str = ""


REGISTRY: dict[str, SolverEntry] = {}


def register(entry: SolverEntry) -> SolverEntry:
  """Adds ``entry`` to :data:`REGISTRY` (names are unique)."""
  unknown = (set(entry.handles) | set(entry.refuses)) - set(PROBLEM_CLASSES)
  if unknown:
    raise ValueError(f"{entry.name}: unknown problem classes {sorted(unknown)}"
                     f"; the classes are {PROBLEM_CLASSES}.")
  overlap = set(entry.handles) & set(entry.refuses)
  if overlap:
    raise ValueError(f"{entry.name}: classes both handled and refused: "
                     f"{sorted(overlap)}.")
  if entry.name in REGISTRY:
    raise ValueError(f"A solver named {entry.name!r} is already registered.")
  REGISTRY[entry.name] = entry
  return entry


def get(name: str) -> SolverEntry:
  """The entry of solver ``name``."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise KeyError(f"No solver named {name!r}; the solvers are "
                   f"{sorted(REGISTRY)}.") from None
