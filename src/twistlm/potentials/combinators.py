"""Build potentials from potentials: products, tempering, thresholds, indicators.

All of them work in log space on the validated values of their parts (each inner potential is called through
``potential(seqs)``, so a NaN is reported with the *inner* potential's name):

* :class:`Sum` ``(p1, p2, …)``: log φ = Σ_i log φ_i, i.e. φ = Π_i φ_i (every constraint applies). Bounded iff every
  part is. Sugar: ``p1 + p2``.
* :class:`Scaled` ``(p, β)``: φ = exp(β · r), r the inner value. For a potential r = log φ_inner, so φ = φ_inner^β:
  for a classifier potential (r = log p(c | s)) this is the tempered class probability p(c | s)^β, the target
  σ ∝ p0 · p(c | s)^β of the twisted-SMC paper's ``exp_beta_..._class_logprob`` tasks. A plain callable
  ``texts -> scores`` is read as a reward r(s) (any real number). Bounded iff the inner potential is bounded and
  β ≥ 0. Hard constraints survive: where r = −∞, log φ = −∞ for every β > 0 (and for β = 0, so that β → 0 gives the
  base model restricted to the support of φ, the limit of φ^β); β < 0 with r = −∞ would be φ = +∞ and is an error.
  Sugar: ``p * β`` and ``β * p``.
* :class:`Threshold` ``(p, η, above=True, on="log")``: φ = 1[r > η] (``above=False``: 1[r ≤ η], the complement, so
  the two partition the sequences). ``on="prob"`` compares exp(r) instead, so a classifier potential can be
  thresholded on its probability: ``Threshold(ToxicityPotential(), 0.5, on="prob")`` is 1[p(toxic | s) > 0.5].
  Always bounded (log φ ∈ {0, −∞}).
* :class:`Indicator` ``(predicate)``: φ = 1[predicate(s)] for a predicate on the completion text. Bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch

from twistlm.errors import ConfigError, PotentialError
from twistlm.potentials.base import FunctionPotential, Potential, Sequences, as_potential

NEG_INF = float("-inf")
SCALES = ("log", "prob")


def _check_potential(obj: object, role: str) -> Potential:
    if isinstance(obj, Potential):
        return obj
    if callable(obj):
        return as_potential(obj)
    raise ConfigError(f"{role} must be a Potential or a callable texts -> values, got {type(obj).__name__}")


class Sum(Potential):
    """log φ = Σ_i log φ_i (the product of the φ_i). Nested sums are flattened."""

    def __init__(self, *potentials: Potential | Callable[[list[str]], Sequence[float]]):
        if not potentials:
            raise ConfigError("Sum needs at least one potential")
        parts: list[Potential] = []
        for p in potentials:
            p = _check_potential(p, "each part of a Sum")
            parts.extend(p.parts if isinstance(p, Sum) else [p])
        self.parts = parts
        self.bounded = all(p.bounded for p in parts)
        self.name = " + ".join(p.name for p in parts)

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        total = torch.zeros(len(seqs), dtype=torch.float64)
        for p in self.parts:
            total = total + p(seqs)  # −∞ + finite = −∞; +∞ and NaN are rejected by p(seqs)
        return total


class Scaled(Potential):
    """φ = exp(β · r): r is the inner potential's log φ, or the score of a plain callable ``texts -> scores``."""

    def __init__(self, potential_or_reward: Potential | Callable[[list[str]], Sequence[float]], beta: float):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(float(beta)):
            raise ConfigError(f"Scaled needs a finite number β, got {beta!r}")
        if isinstance(potential_or_reward, Potential):
            self.inner = potential_or_reward
        elif callable(potential_or_reward):
            self.inner = FunctionPotential(potential_or_reward)  # a reward: any real values, not bounded
        else:
            raise ConfigError(f"Scaled needs a Potential or a callable texts -> scores, got {potential_or_reward!r}")
        self.beta = float(beta)
        self.bounded = self.inner.bounded and self.beta >= 0
        self.name = f"{self.beta:g}*({self.inner.name})"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        r = self.inner(seqs)
        hard = torch.isneginf(r)
        if hard.any() and self.beta < 0:
            raise PotentialError(
                f"potential {self.name!r}: β = {self.beta:g} < 0 turns the hard constraint φ = 0 of "
                f"{self.inner.name!r} into φ = +∞"
            )
        out = self.beta * torch.where(hard, torch.zeros_like(r), r)
        return torch.where(hard, torch.full_like(r, NEG_INF), out)


class Threshold(Potential):
    """φ = 1[r > η] (or 1[r ≤ η] with ``above=False``); r on the log scale, or exp(r) with ``on="prob"``."""

    bounded = True

    def __init__(
        self,
        score_potential: Potential | Callable[[list[str]], Sequence[float]],
        eta: float,
        above: bool = True,
        on: str = "log",
    ):
        if on not in SCALES:
            raise ConfigError(f"Threshold: on must be one of {SCALES}, got {on!r}")
        if isinstance(eta, bool) or not isinstance(eta, Real) or math.isnan(float(eta)):
            raise ConfigError(f"Threshold needs a number η, got {eta!r}")
        self.inner = _check_potential(score_potential, "Threshold's score")
        self.eta = float(eta)
        self.above = bool(above)
        self.on = on
        r = "exp(r)" if on == "prob" else "r"
        self.name = f"1[{r} {'>' if above else '<='} {self.eta:g}]({self.inner.name})"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        r = self.inner(seqs)
        if self.on == "prob":
            r = torch.exp(r)
        hit = r > self.eta if self.above else r <= self.eta
        return torch.where(hit, torch.zeros_like(r), torch.full_like(r, NEG_INF))


class Indicator(Potential):
    """φ(s) = 1[predicate(text of s)]: a hard constraint from any ``str -> bool`` function."""

    bounded = True

    def __init__(self, predicate: Callable[[str], bool], name: str | None = None):
        if not callable(predicate):
            raise ConfigError(f"Indicator needs a callable text -> bool, got {predicate!r}")
        self.predicate = predicate
        self.name = name or f"indicator:{getattr(predicate, '__name__', 'predicate')}"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        return torch.tensor([0.0 if self.predicate(t) else NEG_INF for t in seqs.texts], dtype=torch.float64)
