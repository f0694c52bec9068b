"""Potentials φ: what the target σ ∝ p0·φ rewards (contract in :mod:`twistlm.potentials.base`)."""

from twistlm.potentials.base import FunctionPotential, Potential, Sequences, ZeroPotential, as_potential
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
    "ContainsPotential",
    "FunctionPotential",
    "LengthPotential",
    "Potential",
    "RegexPotential",
    "Sequences",
    "ZeroPotential",
    "as_potential",
    "potential_from_spec",
    "register_potential",
]
