"""Unbiased resampling schemes and the effective sample size (MATH.md, "SMC and the evidence estimate").

Every scheme takes log weights of B independent groups, shape (B, K), and returns ancestor indices (B, n) local to
each group, with E[number of copies of k] = n · ŵ_k where ŵ = softmax(log w) — the property that keeps E[Ẑ] = Z.
A particle of zero weight (log w = −∞) is never chosen. A group whose weights are all zero cannot be resampled and
raises :class:`ResamplingError`.

Schemes are registered in :data:`RESAMPLERS` by name; all randomness comes from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from twistlm.errors import ConfigError, ResamplingError

Resampler = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """ŵ = softmax(log w) along the last axis, float64; error for a group with no finite weight or a NaN."""
    log_w = log_w.to(torch.float64)
    if torch.isnan(log_w).any():
        raise ResamplingError("log weights contain NaN")
    dead = torch.isneginf(log_w).all(dim=-1)
    if dead.any():
        group = int(dead.nonzero()[0])
        raise ResamplingError(
            f"every particle of group {group} has weight zero (log w = −inf): the potential rules out all "
            "sampled continuations; use more particles or a proposal that reaches the constraint"
        )
    return torch.softmax(log_w, dim=-1)


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size (Σ e^W)² / Σ e^{2W} per group; 0 for a group whose weights are all zero.

    Computed from W − max W (so 2W cannot overflow, e.g. for W = ±1e308); NaN in a group gives NaN."""
    log_w = log_w.to(torch.float64)
    top = log_w.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(top)
    shifted = log_w - torch.where(dead, torch.zeros_like(top), top)
    num = 2 * torch.logsumexp(shifted, dim=-1)
    den = torch.logsumexp(2 * shifted, dim=-1)
    out = torch.exp(num - den)
    return torch.where(dead.squeeze(-1), torch.zeros_like(out), out)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index k with cdf[k−1] ≤ u < cdf[k] for u in [0, 1) (cdf in float64, rescaled so it ends at exactly 1; a
    zero-weight index is never returned)."""
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf, u.to(cdf.device, torch.float64).contiguous(), right=True)
    return idx.clamp(max=weights.shape[-1] - 1)


def categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One exact draw per row of an (N, V) matrix of (possibly unnormalised) probabilities, by inverse CDF.

    The sampler's per-token draw: ~15× cheaper than ``torch.multinomial`` over a 49k-token vocabulary on CPU.
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return _inverse_cdf(probs, u).squeeze(1)


def multinomial(log_w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n i.i.d. draws from ŵ per group."""
    return torch.multinomial(normalized_weights(log_w), n, replacement=True, generator=generator)


def stratified(log_w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """One uniform per stratum: u_i = (i + U_i) / n."""
    w = normalized_weights(log_w)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(w.shape[0], n, generator=generator, dtype=torch.float64))
    return _inverse_cdf(w, u / n)


def systematic(log_w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """One shared uniform per group: u_i = (i + U) / n (lowest variance of the four, the default)."""
    w = normalized_weights(log_w)
    u = torch.arange(n, dtype=torch.float64) + torch.rand(w.shape[0], 1, generator=generator, dtype=torch.float64)
    return _inverse_cdf(w, u / n)


def residual(log_w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """⌊n ŵ_k⌋ deterministic copies of each k, then the remaining R = n − Σ⌊n ŵ⌋ drawn from the residuals."""
    w = normalized_weights(log_w)
    groups, k = w.shape
    counts = torch.floor(n * w)
    rest = n * w - counts
    remaining = (n - counts.sum(dim=-1)).round().long()  # R per group, 0 ≤ R < K
    has_rest = remaining > 0
    # Groups with R = 0 get a dummy uniform row so torch.multinomial accepts the batch; their draws are masked out.
    rest = torch.where(has_rest[:, None] & (rest.sum(-1, keepdim=True) > 0), rest, torch.ones_like(rest))
    draws = torch.multinomial(rest, n, replacement=True, generator=generator)
    keep = torch.arange(n)[None, :] < remaining[:, None]
    counts = counts.long()
    counts.scatter_add_(1, draws, keep.long())
    flat = torch.repeat_interleave(torch.arange(groups * k), counts.reshape(-1))
    return (flat.view(groups, n) - (torch.arange(groups) * k)[:, None]).long()


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name: str) -> Resampler:
    if name not in RESAMPLERS:
        raise ConfigError(f"unknown resampler {name!r}; choose from: {', '.join(RESAMPLERS)}")
    return RESAMPLERS[name]


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K Σ_k e^{W_k}) per group: the factor each resampling event (and the end) adds to log Ẑ."""
    return torch.logsumexp(log_w.to(torch.float64), dim=-1) - math.log(log_w.shape[-1])
