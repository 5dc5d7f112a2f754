"""Bilevel solvers: each a factory returning a :class:`bilevel.BilevelSolver`.

The baselines share one sign convention, ``v ~ H^{-1} grad_y f``, and the
hypergradient estimate ``grad_x f - J v``.
"""

from bilevel.solvers._aid import AIDState, aid
from bilevel.solvers._amigo import AmIGOState, amigo
from bilevel.solvers._bome import BOMEInfo, BOMEState, bome
from bilevel.solvers._borep import (BOREPInfo, BOREPState, borep,
                                    normalized_momentum)
from bilevel.solvers._f2sa import f2sa
from bilevel.solvers._itd import ITDState, itd
from bilevel.solvers._lvhba import LVHBAInfo, LVHBAState, lvhba
from bilevel.solvers._lvhba import OFFICIAL_SETTINGS as LVHBA_OFFICIAL_SETTINGS
from bilevel.solvers._penalty import (PenaltyInfo, PenaltyMomentumState,
                                      PenaltyState, penalty, penalty_momentum,
                                      penalty_schedule)
from bilevel.solvers._scalebio import ScaleBiOInfo, ScaleBiOState, scalebio
from bilevel.solvers._soba import SOBAState, ma_soba, soba
from bilevel.solvers._stn import STNInfo, STNState, stn
from bilevel.solvers._stocbio import StocBiOState, stocbio
from bilevel.solvers._ttsa import TTSAState, power_schedule, ttsa

__all__ = [
    "AIDState",
    "AmIGOState",
    "BOMEInfo",
    "BOMEState",
    "BOREPInfo",
    "BOREPState",
    "ITDState",
    "LVHBAInfo",
    "LVHBA_OFFICIAL_SETTINGS",
    "LVHBAState",
    "PenaltyInfo",
    "PenaltyMomentumState",
    "PenaltyState",
    "SOBAState",
    "STNInfo",
    "STNState",
    "ScaleBiOInfo",
    "ScaleBiOState",
    "StocBiOState",
    "TTSAState",
    "aid",
    "amigo",
    "bome",
    "borep",
    "f2sa",
    "itd",
    "lvhba",
    "ma_soba",
    "normalized_momentum",
    "penalty",
    "penalty_momentum",
    "penalty_schedule",
    "power_schedule",
    "scalebio",
    "soba",
    "stn",
    "stocbio",
    "ttsa",
]
