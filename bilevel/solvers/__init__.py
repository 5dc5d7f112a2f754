"""Bilevel solvers: each a factory returning a :class:`bilevel.BilevelSolver`.

The baselines share one sign convention, ``v ~ H^{-1} grad_y f``, and the
hypergradient estimate ``grad_x f - J v``.
"""

from bilevel.solvers._aid import AIDState, aid
from bilevel.solvers._amigo import AmIGOState, amigo
from bilevel.solvers._itd import ITDState, itd
from bilevel.solvers._soba import SOBAState, soba
from bilevel.solvers._stocbio import StocBiOState, stocbio

__all__ = [
    "AIDState",
    "AmIGOState",
    "ITDState",
    "SOBAState",
    "StocBiOState",
    "aid",
    "amigo",
    "itd",
    "soba",
    "stocbio",
]
