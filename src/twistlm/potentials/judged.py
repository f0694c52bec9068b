"""A likelihood potential that also asks the base model to *judge* correctly: the GFlowNet paper's SUBJ E-step reward.

For a labelled example (x, y) with verbalized observations o_l (one per label l; o_y the true one) and a latent z:

    log φ(z) = log p0(o_y | x, z) − λ · 1[ max_{l ≠ y} p0(o_l | x, z) > p0(o_y | x, z) ],

λ ≥ 0 the ``penalty`` in nats. λ = 0 is :class:`~twistlm.potentials.InfillingPotential` (σ(z) ∝ p0(z | x) p0(o_y | x, z),
the posterior over rationales). λ > 0 also removes (e^−λ) the mass of every rationale after which p0 prefers a wrong
label: σ concentrates on rationales that carry the label, which is what makes them worth sampling when p0's own
rationales barely depend on it (EXPERIMENTS.md: E-step ESS 86% with p0's rationales). REFERENCES (B) uses λ = 50.
Bounded (φ ≤ p0(o_y | …) ≤ 1).

Observations: ``extras["observation"]`` (o_y, text or ids, per prompt) and ``extras["alternatives"]`` (a list of the
other labels' observations per prompt). The same one-pass scoring as the infilling potential, once per observation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from twistlm.errors import ConfigError, PotentialError
from twistlm.lm import ParticleLM
from twistlm.potentials.base import Sequences
from twistlm.potentials.likelihood import OBSERVATION_KEY, InfillingPotential

ALTERNATIVES_KEY = "alternatives"


class JudgedObservationPotential(InfillingPotential):
    """φ(z) = p0(o_y | x, z) · e^{−λ·[p0 prefers another observation]} (module docstring)."""

    def __init__(self, lm: ParticleLM, penalty: float, batch_size: int = 64, cache_size: int = 16):
        super().__init__(lm, None, batch_size, cache_size)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < float("inf"):
            raise ConfigError(f"penalty must be a finite number ≥ 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.name = "judged-infilling"

    def alternatives(self, seqs: Sequences) -> list[list[tuple[int, ...]]]:
        """The other labels' observation ids of each sequence."""
        given = seqs.extras.get(ALTERNATIVES_KEY)
        if given is None or len(given) != len(seqs):
            raise PotentialError(f"potential {self.name!r} needs extras['{ALTERNATIVES_KEY}'], one list per sequence")
        return [[self.observation_ids(o) for o in alts] for alts in given]

    def wrong(self, true_lp: torch.Tensor, alternative_lps: Sequence[torch.Tensor]) -> torch.Tensor:
        """1 where some alternative observation is strictly more likely than the true one, else 0."""
        if not alternative_lps:
            return torch.zeros_like(true_lp)
        best = torch.stack(list(alternative_lps)).amax(dim=0)
        return (best > true_lp).to(true_lp.dtype)

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        true_lp = super().log_phi(seqs)
        if self.penalty == 0.0:
            return true_lp
        alts = self.alternatives(seqs)
        width = {len(a) for a in alts}
        if len(width) > 1:
            raise PotentialError(f"potential {self.name!r}: every sequence needs as many alternatives")
        alt_lps = []
        for j in range(width.pop() if width else 0):
            extras = {**seqs.extras, OBSERVATION_KEY: [a[j] for a in alts]}
            alt_lps.append(super().log_phi(dataclasses.replace(seqs, extras=extras)))
        return true_lp - self.penalty * self.wrong(true_lp, alt_lps)
