"""KL divergences between a proposal q and the target σ from K = 1 weights (MATH.md, "KL estimates").

With log w(s) = log σ̃(s) − log q(s) (σ̃ = p0 φ):

    E_q[log w] = log Z − KL(q‖σ)        E_σ[log w] = log Z + KL(σ‖q)

so KL(q‖σ) ≈ log Ẑ_best − mean_q log w, KL(σ‖q) ≈ mean_σ log w − log Ẑ_best, and their sum (the symmetrised KL)
mean_σ log w − mean_q log w needs no log Z.

* q samples: K = 1 SIS runs; log Ẑ of such a run is its single weight, log w(s) (``result.log_weights[0]``).
* σ samples: K = 1 clamped SIS with ``reference=s*`` for each exact sample s*: the clamped particle's weight is
  log w(s*).
* log Ẑ_best: the exact log Z when given; otherwise the midpoint of the *pooled* lower/upper pair (every run of
  every proposal and K averaged before the log: log mean Ẑ and −log mean 1/Ẑ⁺,
  :meth:`twistlm.bounds.BoundsResult.best_log_z`), treated as a constant (its own error is not in the intervals).
  Pooling matters with K = 1 runs only: the midpoint of the mean K = 1 bounds is (mean_q log w + mean_σ log w)/2,
  which would split every KL sum into two equal halves.

Intervals: 95% Student-t over runs for each KL (mean ± t_{0.975, n−1}·s/√n); for the sum, the two means come from
independent samples, so its standard error is √(se_σ² + se_q²) with Welch–Satterthwaite degrees of freedom. If q gives
weight to sequences with φ = 0 (log w = −∞), the estimate of KL(q‖σ) is +∞, as is the true value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from twistlm.bounds import BoundsResult, Estimate, Proposal, as_proposal, run_layout, run_log_z
from twistlm.errors import ConfigError
from twistlm.target import Target
from twistlm.twists.base import Twist


@dataclass
class KLEstimate:
    """KL(q‖σ), KL(σ‖q) and their sum for one proposal (the σ-side ones are None without exact samples)."""

    proposal: str
    kl_q_sigma: Estimate
    kl_sigma_q: Estimate | None
    kl_sum: Estimate | None
    log_z_best: float
    log_z_source: str

    def to_dict(self) -> dict:
        return {
            "proposal": self.proposal,
            "kl_q_sigma": self.kl_q_sigma.to_dict(),
            "kl_sigma_q": None if self.kl_sigma_q is None else self.kl_sigma_q.to_dict(),
            "kl_sum": None if self.kl_sum is None else self.kl_sum.to_dict(),
            "log_z_best": self.log_z_best,
            "log_z_source": self.log_z_source,
        }


def _difference(a: Estimate, b: Estimate) -> Estimate:
    """Estimate of E[A] − E[B] from independent samples (Welch)."""
    mean = a.mean - b.mean
    if not math.isfinite(mean):
        return Estimate(mean, 0.0, mean, mean, min(a.n, b.n), a.num_infinite + b.num_infinite)
    va, vb = a.stderr**2, b.stderr**2
    se = math.sqrt(va + vb)
    denom = (va**2 / max(a.n - 1, 1) if va else 0.0) + (vb**2 / max(b.n - 1, 1) if vb else 0.0)
    df = (va + vb) ** 2 / denom if denom > 0 else float(min(a.n, b.n) - 1)
    return Estimate.from_moments(mean, se, df, min(a.n, b.n))


def kl_from_log_weights(
    proposal: str,
    log_w_q: torch.Tensor | Sequence[float],
    log_w_sigma: torch.Tensor | Sequence[float] | None,
    log_z_best: float,
    log_z_source: str = "bounds",
) -> KLEstimate:
    """KL estimates from K = 1 log weights of q samples and (optionally) of exact σ samples."""
    q = Estimate.from_values(log_w_q)
    kl_q = q.affine(log_z_best, -1.0)
    kl_s = total = None
    if log_w_sigma is not None and len(log_w_sigma) > 0:
        s = Estimate.from_values(log_w_sigma)
        kl_s = s.affine(-log_z_best, 1.0)
        total = _difference(s, q)
    return KLEstimate(proposal, kl_q, kl_s, total, log_z_best, log_z_source)


def kl_from_bounds(
    bounds: BoundsResult, log_z: float | None = None, log_z_source: str = "exact"
) -> dict[str, KLEstimate]:
    """KL estimates reusing the K = 1 runs of :func:`twistlm.bounds.log_z_bounds` (which must include K = 1).

    At K = 1 the lower-bound runs are K = 1 SIS (their log Ẑ are log w of q samples) and the upper-bound runs are
    K = 1 clamped SIS (log w of the exact samples), whatever the sampler.
    """
    if 1 not in bounds.particle_counts:
        raise ConfigError("KL estimates need the K = 1 runs: include 1 in the particle counts")
    best, source = (log_z, log_z_source) if log_z is not None else (bounds.best_log_z(), "bounds")
    out = {}
    for name in bounds.proposals:
        e = bounds.entry(name, 1)
        out[name] = kl_from_log_weights(name, e.lower_values, e.upper_values, best, source)
    return out


def kl_estimates(
    target: Target,
    proposals: Mapping[str, Proposal | str | Twist | tuple],
    num_runs: int | None,
    exact_samples: Sequence[Sequence[int]] | None = None,
    *,
    log_z: float | None = None,
    bounds: BoundsResult | None = None,
    seed: int = 0,
    max_batch_particles: int = 4096,
    log_z_source: str = "exact",
) -> dict[str, KLEstimate]:
    """KL(q‖σ), KL(σ‖q) and their sum for every proposal from ``num_runs`` K = 1 runs (one exact sample per σ run).

    log Ẑ_best is ``log_z`` (named by ``log_z_source``) if given, else ``bounds.best_log_z()``; one is required.
    """
    if log_z is None and bounds is None:
        raise ConfigError("KL estimates need log Z: give the exact log_z or a BoundsResult (bounds=...)")
    best, source = (log_z, log_z_source) if log_z is not None else (bounds.best_log_z(), "bounds")
    runs = run_layout(target, num_runs)
    refs = None if exact_samples is None else [list(s) for s in exact_samples][: len(runs)]
    out = {}
    for name, spec in proposals.items():
        prop = as_proposal(spec)
        common = {"sampler": "sis", "max_batch_particles": max_batch_particles}
        log_w_q = run_log_z(target, runs, 1, prop, seed=(seed, name, "kl-q"), **common)
        log_w_s = None
        if refs:
            log_w_s = run_log_z(
                target, runs[: len(refs)], 1, prop, references=refs, seed=(seed, name, "kl-sigma"), **common
            )
        out[name] = kl_from_log_weights(name, log_w_q, log_w_s, best, source)
    return out
