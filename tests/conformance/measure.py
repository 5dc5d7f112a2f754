"""Every solver, with its defaults, on every problem of the conformance bank.

Usage (from the repository root)::

  python tests/conformance/measure.py [--solvers aid,soba] [--problems box]
                                      [--seconds]

prints a markdown table, one row per solver and one column per bank problem:
the relative error ``||x - x*|| / ||x*||`` after the problem's step budget,
or ``refused: <first line>`` when the factory or ``init`` raised
``ValueError``/``TypeError``, or ``raised <Error>: <first line>`` for any
other failure (a ``DivergenceError`` included). Every pair is run, whatever
the registry says: this is how the registry's tolerances are chosen.
``tests/test_conformance.py`` runs the pairs through :func:`attempt` too.
"""

from __future__ import annotations

import argparse
import inspect
import math
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

if __name__ == "__main__" and __package__ in (None, ""):
  # Run as a script: make the repository root importable (for `tests`).
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # pylint: disable=wrong-import-position

import bilevel  # pylint: disable=wrong-import-position
from bilevel.solvers import _registry  # pylint: disable=wrong-import-position

# Public functions of bilevel.solvers that are not solver factories.
HELPERS = frozenset({"normalized_momentum", "penalty_schedule",
                     "power_schedule"})

# The refusals the library promises: at the factory call or at init.
REFUSALS = (ValueError, TypeError)


class Outcome(NamedTuple):
  """What one solver did on one bank problem.

  Attributes:
    kind: ``"solved"`` (ran to the end; ``error`` is set), ``"built"``
      (built and initialised, not run: ``num_steps=0``), ``"refused"``
      (the factory or ``init`` raised ``ValueError``/``TypeError``),
      ``"diverged"`` (the run raised :class:`bilevel.DivergenceError`) or
      ``"raised"`` (any other exception).
    error: the relative error to ``x*`` (``"solved"`` only).
    exception: the exception, if one was raised.
    stage: where it was raised: ``"factory"``, ``"init"`` or ``"run"``.
    seconds: wall time of the whole attempt, compilation included.
  """
  kind: str
  error: float | None = None
  exception: BaseException | None = None
  stage: str | None = None
  seconds: float = math.nan


def registry() -> dict[str, _registry.SolverEntry]:
  """``bilevel.solvers.REGISTRY``, or the one of ``_registry`` without it."""
  return getattr(bilevel.solvers, "REGISTRY", _registry.REGISTRY)


def public_factories() -> dict[str, Callable[..., Any]]:
  """The solver factories of ``bilevel.solvers.__all__`` by name.

  Every public function except the helpers of :data:`HELPERS`.
  """
  return {name: getattr(bilevel.solvers, name)
          for name in bilevel.solvers.__all__
          if inspect.isfunction(getattr(bilevel.solvers, name))
          and name not in HELPERS}


def needs_more_than_a_problem(factory: Callable[..., Any]) -> bool:
  """Whether ``factory(problem)`` cannot bind: a required second argument.

  STN's factory needs a hyperparameter ``space`` as well and so can never
  take a plain problem; calling it with one raises ``TypeError``, which
  counts as a refusal.
  """
  try:
    inspect.signature(factory).bind(object())
  except TypeError:
    return True
  return False


def first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""


def attempt(factory: Callable[..., Any], entry, num_steps: int | None = None,
            seed: int = 0) -> Outcome:
  """Builds the solver with its defaults and runs it on a bank problem.

  The run is one compiled chunk of ``num_steps`` steps (default: the
  problem's budget), with ``key = jax.random.key(seed)``.

  Args:
    factory: a solver factory, called as ``factory(entry.problem)``.
    entry: a :class:`tests.conformance.bank.BankProblem`.
    num_steps: the number of steps (default ``entry.num_steps``); ``0``
      stops after ``init`` (kind ``"built"``), to check a refusal without
      compiling a run.
    seed: the seed of the run's key.

  Returns:
    The :class:`Outcome`.
  """
  # Imported here so that the script can set up sys.path first.
  from tests.conformance import bank  # pylint: disable=import-outside-toplevel
  num_steps = entry.num_steps if num_steps is None else num_steps
  key = jax.random.key(seed)
  start = time.perf_counter()

  def done(kind, **fields):
    return Outcome(kind, seconds=time.perf_counter() - start, **fields)

  stage = "factory"
  try:
    solver = factory(entry.problem)
    stage = "init"
    state = solver.init(entry.x0, entry.y0, key=key, data=entry.data)
  except REFUSALS as error:
    return done("refused", exception=error, stage=stage)
  except Exception as error:  # pylint: disable=broad-except
    return done("raised", exception=error, stage=stage)
  if num_steps == 0:
    return done("built", stage="init")
  try:
    result = bilevel.run(solver, entry.x0, entry.y0, entry.data,
                         num_steps=num_steps, key=key, state=state,
                         steps_per_chunk=num_steps)
  except bilevel.DivergenceError as error:
    return done("diverged", exception=error, stage="run")
  except Exception as error:  # pylint: disable=broad-except
    return done("raised", exception=error, stage="run")
  return done("solved", error=bank.relative_error(result.x, entry.x_star),
              stage="run")


def describe(outcome: Outcome, seconds: bool = False) -> str:
  """One table cell: the error, or what was raised."""
  if outcome.kind == "solved":
    text = f"{outcome.error:.2e}"
  elif outcome.kind == "built":
    text = "built"
  elif outcome.kind == "refused":
    text = (f"refused ({outcome.stage}): "
            f"{first_line(outcome.exception)}")
  else:
    text = (f"raised {type(outcome.exception).__name__} ({outcome.stage}): "
            f"{first_line(outcome.exception)}")
  text = text.replace("|", "\\|")
  if seconds:
    text += f" [{outcome.seconds:.1f} s]"
  return text


def table(rows: dict[str, dict[str, str]], columns: list[str]) -> str:
  """A markdown table: one row per solver, one column per problem."""
  lines = ["| solver | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name, cells in rows.items():
    lines.append(f"| `{name}` | "
                 + " | ".join(cells[column] for column in columns) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--solvers", default="",
                      help="comma-separated solver names (default: all)")
  parser.add_argument("--problems", default="",
                      help="comma-separated bank problem names (default: all)")
  parser.add_argument("--seconds", action="store_true",
                      help="append each attempt's wall time to its cell")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  from tests.conformance import bank  # pylint: disable=import-outside-toplevel

  factories = public_factories()
  factories.update({name: entry.factory
                    for name, entry in registry().items()})
  if args.solvers:
    chosen = args.solvers.split(",")
    unknown = sorted(set(chosen) - set(factories))
    if unknown:
      parser.error(f"unknown solvers {unknown}; the solvers are "
                   f"{sorted(factories)}")
    factories = {name: factories[name] for name in chosen}
  problems = bank.bank()
  if args.problems:
    chosen = args.problems.split(",")
    problems = [bank.get(name) for name in chosen]

  columns = [f"{entry.name} ({entry.problem_class}, {entry.num_steps})"
             for entry in problems]
  rows = {}
  total = time.perf_counter()
  for name, factory in factories.items():
    rows[name] = {}
    for entry, column in zip(problems, columns):
      outcome = attempt(factory, entry)
      rows[name][column] = describe(outcome, args.seconds)
      print(f"{name} on {entry.name}: {rows[name][column]}", file=sys.stderr,
            flush=True)
  print(table(rows, columns))
  print(f"\n{len(factories)} solvers x {len(problems)} problems in "
        f"{time.perf_counter() - total:.0f} s; columns: problem (class, "
        "steps); cells: ||x - x*|| / ||x*|| after those steps with the "
        "solver's defaults.")


if __name__ == "__main__":
  main()
