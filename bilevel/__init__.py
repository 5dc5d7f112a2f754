"""bilevel: functional JAX solvers for bilevel optimization.

.. math::

   \\min_x f(x, y^*(x)) \\quad \\text{s.t.} \\quad y^*(x) = \\arg\\min_y g(x, y)
"""

from bilevel import (best_response, checkpoint, constraints, derivatives,
                     lisa, linear_solve, projections, regularizers,
                     reweighting, sharding, solvers)
from bilevel._base import BilevelSolver, HypergradientInfo, OracleCalls
from bilevel._data import Data, SamplerState
from bilevel._problem import Problem, validate
from bilevel._run import DivergenceError, RunResult, run
from bilevel.hypergradient import (implicit_hypergradient,
                                   implicit_hypergradient_and_info,
                                   unrolled_hypergradient,
                                   unrolled_hypergradient_and_info)

__version__ = "0.1.0"

__all__ = [
    "BilevelSolver",
    "Data",
    "DivergenceError",
    "HypergradientInfo",
    "OracleCalls",
    "Problem",
    "RunResult",
    "SamplerState",
    "best_response",
    "checkpoint",
    "constraints",
    "derivatives",
    "implicit_hypergradient",
    "implicit_hypergradient_and_info",
    "linear_solve",
    "lisa",
    "projections",
    "regularizers",
    "reweighting",
    "run",
    "sharding",
    "solvers",
    "unrolled_hypergradient",
    "unrolled_hypergradient_and_info",
    "validate",
]
