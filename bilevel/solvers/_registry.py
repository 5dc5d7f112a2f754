"""One registry of solvers and the problem classes each one handles.

Every factory of :mod:`bilevel.solvers` has one :class:`SolverEntry` here,
stating for each problem class of :data:`PROBLEM_CLASSES` whether the solver

* *handles* it: with its defaults it reaches the relative error to ``x*``
  given there on every problem of that class of the conformance bank
  (``tests/conformance/bank.py``, after each problem's ``num_steps`` steps
  with ``key = jax.random.key(0)``);
* *falls short* on it: with its defaults it stops at about the relative
  error given there (a stated bias, or a step size too large for some
  problems of the class); the entry's ``notes`` say which hyperparameter
  removes it;
* *refuses* it when it is built (at the factory call or at ``init``), with
  a message that says what to use instead;
* or does not support it and cannot tell (the notes say so).

``tests/test_conformance.py`` checks every entry against the bank, and the
README's table is :func:`markdown_table`.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from bilevel import _base

# The problem classes of the conformance bank.
PROBLEM_CLASSES = (
    "strongly_convex",  # lower level strongly convex, unconstrained
    "ill_conditioned",  # the same with a lower condition number of 100
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
      solver reaches with its defaults on every bank problem of that class.
    falls_short: problem class -> the relative error at which the defaults
      stop on the worst bank problem of that class (measured; the test
      keeps it within a factor 3).
    refuses: problem classes refused when the solver is built.
    notes: what removes each shortfall, classes neither handled nor refused
      (the solver cannot tell them apart), in words.
  """
  name: str
  factory: Callable[..., _base.BilevelSolver]
  handles: Mapping[str, float]
  falls_short: Mapping[str, float] = {}
  refuses: tuple[str, ...] = ()
  notes: str = ""


REGISTRY: dict[str, SolverEntry] = {}


def register(entry: SolverEntry) -> SolverEntry:
  """Adds ``entry`` to :data:`REGISTRY` (names are unique)."""
  groups = (set(entry.handles), set(entry.falls_short), set(entry.refuses))
  unknown = set.union(*groups) - set(PROBLEM_CLASSES)
  if unknown:
    raise ValueError(f"{entry.name}: unknown problem classes {sorted(unknown)}"
                     f"; the classes are {PROBLEM_CLASSES}.")
  if sum(len(group) for group in groups) != len(set.union(*groups)):
    raise ValueError(f"{entry.name}: a class is in more than one of handles, "
                     "falls_short and refuses.")
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


# How each class is called in the README's table.
CLASS_TITLES = {
    "strongly_convex": "strongly convex",
    "ill_conditioned": "condition 100",
    "nonunique": "several minimisers",
    "box": "Y box",
    "simplex": "Y simplex",
    "ball": "Y ball",
    "coupled": "coupled constraints",
    "minibatch": "minibatches",
    "pytree": "pytrees",
    "float32": "float32",
}


def markdown_table() -> str:
  """The README's table of what each solver handles, from :data:`REGISTRY`.

  A cell holds "≤ E", the relative error to ``x*`` reached with the
  defaults on the bank's problems of that class (handled); "short: E" (the
  defaults stop at about ``E``; the notes say what removes it); "refused"
  (the solver refuses it when it is built); or "no" (not supported and not
  detected: see the notes). The notes follow the table, one per solver.
  """
  header = ("| solver | " + " | ".join(CLASS_TITLES[c] for c in
                                        PROBLEM_CLASSES) + " |")
  rule = "|---" * (len(PROBLEM_CLASSES) + 1) + "|"
  rows, notes = [], []
  for name in sorted(REGISTRY):
    entry = REGISTRY[name]
    cells = []
    for problem_class in PROBLEM_CLASSES:
      if problem_class in entry.handles:
        cells.append(f"≤ {entry.handles[problem_class]:.0e}")
      elif problem_class in entry.falls_short:
        cells.append(f"short: {entry.falls_short[problem_class]:.2g}")
      elif problem_class in entry.refuses:
        cells.append("refused")
      else:
        cells.append("no")
    rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if entry.notes:
      notes.append(f"- `{name}`: {entry.notes}")
  return "\n".join([header, rule, *rows, "", *notes])
