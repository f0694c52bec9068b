"""Potentials φ: what the target σ ∝ p0·φ rewards (contract in :mod:`twistlm.potentials.base`)."""

from twistlm.potentials.base import FunctionPotential, Potential, Sequences, ZeroPotential, as_potential
from twistlm.potentials.classifiers import (
    ClassifierPotential,
    HFClassifierPotential,
    SentimentPotential,
    ToxicityPotential,
)
from twistlm.potentials.combinators import Indicator, Scaled, Sum, Threshold
from twistlm.potentials.judged import JudgedObservationPotential
from twistlm.potentials.likelihood import (
    ContinuationScorer,
    InfillingPotential,
    TemperedPotential,
    score_continuations,
)
from twistlm.potentials.rewards import RewardPotential, gsm8k_potential
from twistlm.potentials.simple import (
    POTENTIALS,
    ContainsPotential,
    LengthPotential,
    RegexPotential,
    potential_from_spec,
    register_potential,
)

__all__ = [
    "POTENTIALS",
    "ClassifierPotential",
    "ContainsPotential",
    "ContinuationScorer",
    "FunctionPotential",
    "HFClassifierPotential",
    "Indicator",
    "InfillingPotential",
    "JudgedObservationPotential",
    "LengthPotential",
    "Potential",
    "RegexPotential",
    "RewardPotential",
    "Scaled",
    "SentimentPotential",
    "Sequences",
    "Sum",
    "TemperedPotential",
    "Threshold",
    "ToxicityPotential",
    "ZeroPotential",
    "as_potential",
    "gsm8k_potential",
    "potential_from_spec",
    "register_potential",
    "score_continuations",
]
