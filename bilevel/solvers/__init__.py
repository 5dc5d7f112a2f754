"""Bilevel solvers: each a factory returning a :class:`bilevel.BilevelSolver`.

The baselines share one sign convention, ``v ~ H^{-1} grad_y f``, and the
hypergradient estimate ``grad_x f - J v``.
"""

from bilevel import _base
from bilevel.solvers._aid import AIDState, aid
from bilevel.solvers._amigo import AmIGOState, amigo
from bilevel.solvers._bome import BOMEInfo, BOMEState, bome
from bilevel.solvers._borep import (BOREPInfo, BOREPState, borep,
                                    normalized_momentum)
from bilevel.solvers._f2sa import f2sa
from bilevel.solvers._itd import ITDState, itd
from bilevel.solvers._lvhba import LVHBAInfo, LVHBAState, lvhba
from bilevel.solvers._lvhba import OFFICIAL_SETTINGS as LVHBA_OFFICIAL_SETTINGS
from bilevel.solvers._registry import (PROBLEM_CLASSES, REGISTRY,
                                       SolverEntry, register)
from bilevel.solvers._penalty import (PenaltyInfo, PenaltyMomentumState,
                                      PenaltyOracles,
                                      PenaltyState, penalty, penalty_momentum,
                                      penalty_schedule)
from bilevel.solvers._scalebio import ScaleBiOInfo, ScaleBiOState, scalebio
from bilevel.solvers._soba import SOBAState, ma_soba, soba
from bilevel.solvers._stn import STNInfo, STNState, stn
from bilevel.solvers._stocbio import StocBiOState, stocbio
from bilevel.solvers._ttsa import TTSAState, power_schedule, ttsa

# Each factory records how it built its solver (BilevelSolver.spec: its name,
# problem and hyperparameters), which bilevel.checkpoint fingerprints.
aid = _base.recorded(aid)
amigo = _base.recorded(amigo)
bome = _base.recorded(bome)
borep = _base.recorded(borep)
f2sa = _base.recorded(f2sa)
itd = _base.recorded(itd)
lvhba = _base.recorded(lvhba)
ma_soba = _base.recorded(ma_soba)
penalty = _base.recorded(penalty)
penalty_momentum = _base.recorded(penalty_momentum)
scalebio = _base.recorded(scalebio)
soba = _base.recorded(soba)
stn = _base.recorded(stn)
stocbio = _base.recorded(stocbio)
ttsa = _base.recorded(ttsa)

__all__ = [
    "PROBLEM_CLASSES",
    "REGISTRY",
    "SolverEntry",
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
    "PenaltyOracles",
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

# What each solver handles, measured on the conformance bank
# (tests/conformance/bank.py; `python tests/conformance/measure.py` prints the
# numbers; tests/test_conformance.py keeps them true). Tolerances are about
# three times the relative error to x* measured with the defaults.

register(SolverEntry(
    "aid", aid,
    handles=dict(strongly_convex=3e-06, ill_conditioned=1e-06, box=3e-08,
                 simplex=2e-08, ball=2e-06, minibatch=0.02, pytree=5e-07,
                 float32=2e-06),
    falls_short={},
    refuses=("coupled",),
    notes=(
        "Lower level assumed strongly convex: with several lower minimisers "
        "H is singular and the run diverges (bank: non-finite at step 1), "
        "undetected at construction.")))

register(SolverEntry(
    "amigo", amigo,
    handles=dict(strongly_convex=1e-10, ill_conditioned=3e-10, box=1e-10,
                 simplex=1e-10, ball=1e-10, minibatch=0.02, pytree=1e-10,
                 float32=9e-07),
    falls_short={},
    refuses=("coupled",),
    notes=(
        "Lower level assumed strongly convex: with several lower minimisers "
        "the run diverges (bank: non-finite at step 396), undetected at "
        "construction.")))

register(SolverEntry(
    "bome", bome,
    handles=dict(nonunique=0.03),
    falls_short=dict(strongly_convex=0.13, ill_conditioned=0.9, box=0.1,
                     simplex=0.052, ball=0.32, minibatch=0.45, pytree=0.22,
                     float32=0.35),
    refuses=("coupled",),
    notes=(
        "Biased by its T-step truncation (1 - gamma mu)^T and by its "
        "constant joint step alpha (acts like a penalty 2/alpha): about 0.9 "
        "alpha at condition 2 and 10 alpha at 100 once T >= "
        "log(1/eps)/(gamma mu); only alpha -> 0 removes it; near 0.2 on "
        "minibatches.")))

register(SolverEntry(
    "borep", borep,
    handles={},
    falls_short=dict(strongly_convex=0.55, ill_conditioned=0.051, box=0.2,
                     simplex=0.11, ball=0.46, minibatch=0.038, pytree=0.072,
                     float32=0.041),
    refuses=("coupled",),
    notes=(
        "Steps of constant length eta: x circles x* at a distance of order "
        "eta/(1 - beta); a decaying eta reaches x* "
        "(optax.exponential_decay(0.1, 2000, 0.1, transition_begin=2000): "
        "4e-9 at conditions 2 and 100). With several lower minimisers it is "
        "not supported (undetected).")))

register(SolverEntry(
    "f2sa", f2sa,
    handles={},
    falls_short=dict(strongly_convex=0.16, ill_conditioned=0.55, box=0.11,
                     simplex=0.1, ball=0.11, minibatch=0.18, pytree=0.1,
                     float32=0.22),
    refuses=("coupled",),
    notes=(
        "Penalty bias O(1/(lambda mu)) with lambda_k = lambda0 (1 + "
        "k/k0)^(1/7), only 24 after 5000 steps; penalty=1e8, "
        "penalty_power=0, lower_power=0 reaches 2e-7 at condition 100 "
        "(float64). Several lower minimisers: not supported (undetected).")))

register(SolverEntry(
    "itd", itd,
    handles=dict(box=4e-08, simplex=2e-08, ball=6e-08),
    falls_short=dict(strongly_convex=0.021, ill_conditioned=0.53,
                     minibatch=0.078, pytree=0.041, float32=0.079),
    refuses=("coupled",),
    notes=(
        "Truncation bias (1 - eta mu)^K: num_lower_steps K >= "
        "log(1/eps)/(eta mu) removes it (K = 2757 reaches 3e-8 at condition "
        "100). Through project_y it differentiates the projected steps. "
        "Several lower minimisers: the unrolled iterates blow up (bank: "
        "non-finite at step 305), undetected.")))

register(SolverEntry(
    "lvhba", lvhba,
    handles=dict(nonunique=0.006, coupled=0.007),
    falls_short=dict(strongly_convex=0.35, ill_conditioned=0.61, box=0.31,
                     simplex=0.27, ball=0.32, minibatch=0.19, pytree=0.12,
                     float32=0.3),
    refuses=(),
    notes=(
        "Converges slowly from its defaults: about 1e-3 after 50k steps on "
        "the box (0.31 after the bank's 1000). Constraints coupling x and "
        "y: project_xy is built from affine constraints, refused at init "
        "otherwise.")))

register(SolverEntry(
    "ma_soba", ma_soba,
    handles=dict(ill_conditioned=9e-05, box=1e-10, simplex=2e-09,
                 ball=1e-10, minibatch=0.007, pytree=0.002, float32=0.03),
    falls_short=dict(strongly_convex=30),
    refuses=("coupled",),
    notes=(
        "Single loop: the upper step must be small against the lower "
        "contraction; the defaults diverge on the bank's 10 x 8 quadratic "
        "of condition 10 (lower upper_step_size). Several lower minimisers: "
        "ends 0.71 from x* on the bank, undetected.")))

register(SolverEntry(
    "penalty", penalty,
    handles=dict(strongly_convex=0.002, ill_conditioned=0.007,
                 nonunique=9e-05, box=0.0002, simplex=0.0001, ball=0.0002,
                 minibatch=0.003, pytree=0.003, float32=0.005),
    falls_short={},
    refuses=("coupled",),
    notes=(
        "Targets the optimistic solution; its penalty schedule grows 10 -> "
        "1e4 over 1000 steps, and the error is the penalty bias c/lambda, "
        "c between 0.1/mu and 0.9/mu (a larger final lambda removes it; "
        "keep lambda <= 1e4 in float32).")))

register(SolverEntry(
    "penalty_momentum", penalty_momentum,
    handles=dict(nonunique=0.002, box=0.0003, simplex=0.0002,
                 minibatch=0.02),
    falls_short=dict(strongly_convex=0.016, ill_conditioned=0.021,
                     ball=0.011, pytree=0.016, float32=0.036),
    refuses=("coupled",),
    notes=(
        "Targets the optimistic solution; the single loop pays more for a "
        "large penalty, so its schedule stops at lambda = 1e3 (10 -> 1e3 "
        "over 2000 steps): bias 2.4e-2 at condition 100; "
        "penalty_schedule(10, 1e4, 5000) and 15 000 steps reach 2.4e-3.")))

register(SolverEntry(
    "scalebio", scalebio,
    handles={},
    falls_short=dict(strongly_convex=0.78, ill_conditioned=0.99, box=0.085,
                     simplex=0.047, ball=0.33, minibatch=0.83, pytree=0.87,
                     float32=0.92),
    refuses=("coupled",),
    notes=(
        "Penalty bias O(1/(alpha mu)) at alpha = 10, AdamW steps: "
        "penalty=1e8 with SGD steps (upper 0.2, lower 5e-9) reaches 2e-7 at "
        "condition 100. Several lower minimisers: not supported "
        "(undetected).")))

register(SolverEntry(
    "soba", soba,
    handles=dict(ill_conditioned=2e-05, box=0.0005, simplex=0.003,
                 ball=1e-10, minibatch=0.02, pytree=0.0009, float32=0.02),
    falls_short=dict(strongly_convex=15),
    refuses=("coupled",),
    notes=(
        "Single loop: the upper step must be small against the lower "
        "contraction; the default 0.5 diverges on the bank's 10 x 8 "
        "quadratic of condition 10 (0.1 reaches 2e-6). Several lower "
        "minimisers: ends 0.71 from x* on the bank, undetected.")))

register(SolverEntry(
    "stn", stn,
    handles={},
    falls_short={},
    refuses=("strongly_convex", "ill_conditioned", "nonunique", "box",
             "simplex", "ball", "coupled", "minibatch", "pytree",
             "float32"),
    notes=(
        "A different contract: f and g read a best_response.Hyperparameters "
        "record and the factory needs a HyperparameterSpace, so it never "
        "takes a plain problem.")))

register(SolverEntry(
    "stocbio", stocbio,
    handles=dict(box=2e-05, simplex=7e-06),
    falls_short=dict(strongly_convex=0.057, ill_conditioned=0.68, ball=0.08,
                     minibatch=0.18, pytree=0.12, float32=0.18),
    refuses=("coupled",),
    notes=(
        "Truncation bias (1 - eta mu)^(Q+1): num_neumann_terms Q + 1 >= "
        "log(1/eps)/(eta mu) removes it (2756 reaches 3e-8 at condition "
        "100). Several lower minimisers: non-finite at step 372 on the "
        "bank, undetected.")))

register(SolverEntry(
    "ttsa", ttsa,
    handles=dict(box=0.02),
    falls_short=dict(strongly_convex=0.079, ill_conditioned=0.72,
                     simplex=0.011, ball=0.19, minibatch=0.2, pytree=0.14,
                     float32=0.2),
    refuses=("coupled",),
    notes=(
        "StocBiO's truncation bias (1 - eta mu)^Q on average plus the noise "
        "of its random truncation; Q >= log(1/eps)/(eta mu) removes the "
        "bias, not the noise (0.02 after 20000 steps at condition 100). "
        "Several lower minimisers: not supported (undetected).")))
