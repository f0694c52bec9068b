"""Twist losses (MATH.md, "Twist losses"): CTL, RL (soft-Q), SIXO, FUDGE, and Jeffreys (the proposal's KL sum).

Each loss is a small function of shape-checked tensors over B groups (one per prompt) × n samples × T steps; the
registry :data:`LOSSES` maps a name to a :class:`TwistLoss` that knows how to feed its function from
:class:`Rollouts` (what a trainer collects) — no string dispatch anywhere else.

Which value of the twist is learned at step t. A twist head returns log ψ_t(s_<t, v) for every token v. For a
token v that *finishes* the particle (a stop token, or any token at t = T) the sampler's weight uses φ, not the
head (MATH.md, "Weights"), but the head's value still shapes the proposal q_t(v | s_<t) ∝ p0(v | s_<t) ψ_t(s_<t, v).
So the losses learn the head's value on every step t ≤ f (f = the finishing step of the sequence), including t = f
where its optimum is φ(s) itself; ψ_t(s_1:t) = φ(s) is fixed (no gradient) only for prefixes that finished *before*
t. With that, each loss below is minimised by ψ = ψ* (up to one constant factor for SIXO), and the twist-induced
proposal is then exactly σ(s_t | s_<t) — including the choice to stop.

Notation per sample s (of its group): lp0_t = log p0(s_t | s_<t), lq_t = log q_t(s_t | s_<t) (the proposal that drew
it), ℓ_t = log ψ_t(s_1:t) (the head's value at the sampled token), a = the sample's normalised data weight.

* **CTL** (contrastive twist learning) — gradient of Σ_t KL(σ(s_1:t) ‖ π_t^θ), π_t^θ ∝ p0 ψ_t^θ:
  L = Σ_t [ −Σ_i a_i ℓ_t(s^i) + Σ_k sg(ŵ_t^k) ℓ_t(s^k) ], positives s^i ~ σ (exact, a_i = 1/P; or SMC particles,
  a_i their normalised weights), negatives s^k ~ q with ŵ_t^k = softmax_k log[p0(s^k_1:t) ψ̃_t(s^k_1:t) / q(s^k_1:t)],
  ψ̃_t = ψ_t^θ on steps t ≤ f, φ after (those terms carry no gradient but stay in the normalisation).
* **RL** (soft-Q regression): Σ_t (ℓ_t − y_t)², y_t = sg(log Σ_v p0(v | s_1:t) ψ_t+1(s_1:t, v)) for t < f and
  y_f = log φ(s) on the finishing step (exact: the head's value at a finishing token regresses on φ of that very
  sequence). Targets are clipped below at :data:`RL_LOG_FLOOR` (log φ = −∞ would give an infinite loss).
* **SIXO**: logistic regression with logit ℓ_t: Σ_t [ Σ_i a_i softplus(−ℓ_t(s^i)) + Σ_k b_t^k softplus(ℓ_t(s^k)) ],
  positives from σ, negatives from p0 (b_t^k = 1/K; with twisted negatives b_t^k = softmax_k log p0(s^k_1:t)/q(s^k_1:t)).
  Both classes are normalised over *all* samples, finished or not, so the optimum ψ_t = σ(s_1:t)/p0(s_1:t) = ψ*_t / Z
  holds with the same constant at every step.
* **FUDGE**: for 0 ≤ φ ≤ 1 and a twist with ψ ∈ (0, 1] (sigmoid output): binary cross-entropy
  Σ_t −[y log ψ_t + (1 − y) log(1 − ψ_t)] with y ~ Bernoulli(φ(s)), s ~ p0 (with twisted negatives: weighted by
  the self-normalised p0(s)/q(s)). Optimum ψ_t = E_p0[φ | s_1:t] = ψ*_t.
* **Jeffreys** — the KL sum KL(σ‖q_θ) + KL(q_θ‖σ) of the twist-induced proposal itself (Table 2's metric), on the
  proposal's own samples s^k ~ q_θ (on-policy, data weights a_k; 1/K for i.i.d. draws), log w_k = log p0(s^k)
  φ(s^k) − log q_θ(s^k):
  ∇ KL(σ‖q_θ) = −E_σ[∇ log q_θ] ≈ −Σ_k w̄_k ∇ log q_θ(s^k), w̄ = softmax_k(log a_k + log w_k) (self-normalised);
  ∇ KL(q_θ‖σ) = −E_q[(log w − b) ∇ log q_θ] for any constant b (E_q ∇ log q_θ = 0) ≈ −Σ_k a_k (log w_k − b) ∇ log
  q_θ(s^k), b = Σ_k a_k log w_k. Surrogate L = −Σ_k sg(w̄_k + a_k (log w_k − b)) log q_θ(s^k). With every sequence
  as a "sample" weighted a = q_θ its gradient is exactly ∇ of the KL sum; with K i.i.d. draws the batch-mean
  baseline scales the reverse term's expectation by (1 − 1/K), and the forward term has SNIS's O(1/K) bias. It
  learns the final proposal q_θ(s) = Π_t q_t(s_t | s_<t) (log q_t = lp0_t + ℓ_t − log Σ_v p0 ψ_t), not the
  intermediate targets π_t — the natural loss for a normalised twist (the ratio twist, where π_t are q_θ's own
  marginals). KL(q‖σ) is infinite where φ = 0: log φ is clipped below at :data:`RL_LOG_FLOOR` in the reverse term.

Every function returns the mean over groups that have data (a group without positives is skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twistlm.errors import ConfigError
from twistlm.twists.features import PrefixFeatures

RL_LOG_FLOOR = -30.0
"""Lower clip for RL regression targets (log φ = −∞ for hard constraints)."""

BOUND_TOLERANCE = 1e-6
"""Slack on log ψ ≤ 0 (FUDGE) and log φ ≤ 0 (bounded potentials)."""


# ----------------------------------------------------------------------------------------------------------------
# Shape checks and helpers.


def _check_shapes(**tensors: tuple[torch.Tensor, str]) -> dict[str, int]:
    """Check each tensor against a pattern like ``"B,K,T"``; equal letters must have equal sizes."""
    sizes: dict[str, int] = {}
    for name, (x, pattern) in tensors.items():
        dims = pattern.split(",")
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != len(dims):
            raise ConfigError(f"{name} must have shape ({pattern}), got {tuple(x.shape)}")
        for d, size in zip(dims, x.shape):
            if sizes.setdefault(d, size) != size:
                raise ConfigError(
                    f"{name} has {d} = {size}, but another input has {d} = {sizes[d]} "
                    f"(shapes: {', '.join(f'{k}={tuple(v[0].shape)}' for k, v in tensors.items())})"
                )
    return sizes


def safe_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax along ``dim``; all-zero where every entry is −∞ (instead of NaN)."""
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim=dim, keepdim=True)
    return torch.where(s > 0, e / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(e))


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where ``keep``, 0 elsewhere (so garbage or ±∞ in unused entries never reaches the sum or the gradient)."""
    return torch.where(keep, x, torch.zeros_like(x))


def _mean_over(per_group: torch.Tensor, valid: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    if valid.any():
        return per_group[valid].mean()
    return anchor.sum() * 0.0  # no data: a zero loss that still belongs to the graph


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x ≤ 0, computed stably (Mächler 2012)."""
    x = x.clamp(max=-1e-30)
    cut = -0.6931471805599453
    near = x > cut
    # Each branch sees only inputs where it is finite, so torch.where never multiplies an infinite gradient by 0.
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, cut))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, cut), x)))
    return torch.where(near, a, b)


# ----------------------------------------------------------------------------------------------------------------
# The four loss functions.


def ctl_loss(
    pos_log_psi: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_log_psi: torch.Tensor,
    neg_log_weight: torch.Tensor,
    neg_learned: torch.Tensor,
) -> torch.Tensor:
    """Contrastive twist learning surrogate (gradient of Σ_t KL(σ(s_1:t) ‖ π_t^θ)).

    pos_log_psi (B, P, T): ℓ_t of positives. pos_weight (B, P, T): a_i where step t is learned, else 0.
    neg_log_psi (B, K, T): ℓ_t of negatives. neg_log_weight (B, K, T): log unnormalised weight of π_t for each
    negative (normalised over K here, no gradient). neg_learned (B, K, T) bool: step t is learned for that negative.
    """
    _check_shapes(
        pos_log_psi=(pos_log_psi, "B,P,T"),
        pos_weight=(pos_weight, "B,P,T"),
        neg_log_psi=(neg_log_psi, "B,K,T"),
        neg_log_weight=(neg_log_weight, "B,K,T"),
        neg_learned=(neg_learned, "B,K,T"),
    )
    w = safe_softmax(neg_log_weight.detach(), dim=1)
    pos_term, valid = _positive_term(pos_log_psi, pos_weight)
    neg_term = (_masked(w, neg_learned) * _masked(neg_log_psi, neg_learned)).sum(dim=(1, 2))
    return _mean_over(neg_term - pos_term, valid, neg_log_psi)


def _positive_term(pos_log_psi: torch.Tensor, pos_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) Σ_{i,t} a_i ℓ_t over each group's positives, and (B,) whether the group has any."""
    pos_term = (pos_weight.detach() * _masked(pos_log_psi, pos_weight > 0)).sum(dim=(1, 2))
    return pos_term, pos_weight.sum(dim=(1, 2)) > 0


def rl_loss(log_psi: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Soft-Q regression Σ_{n,t} weight · (ℓ_t − sg(y_t))², all inputs (B, N, T)."""
    _check_shapes(log_psi=(log_psi, "B,N,T"), target=(target, "B,N,T"), weight=(weight, "B,N,T"))
    keep = weight > 0
    err = _masked(log_psi - target.detach(), keep)
    per_group = (weight.detach() * err.square()).sum(dim=(1, 2))
    return _mean_over(per_group, keep.any(dim=2).any(dim=1), log_psi)


def sixo_loss(
    pos_log_psi: torch.Tensor, pos_weight: torch.Tensor, neg_log_psi: torch.Tensor, neg_weight: torch.Tensor
) -> torch.Tensor:
    """Logistic regression with logit ℓ_t: σ-prefixes (weights pos_weight) labelled 1, p0-prefixes labelled 0.

    pos_* (B, P, T), neg_* (B, K, T); weights are 0 where a step is not learned.
    """
    _check_shapes(
        pos_log_psi=(pos_log_psi, "B,P,T"),
        pos_weight=(pos_weight, "B,P,T"),
        neg_log_psi=(neg_log_psi, "B,K,T"),
        neg_weight=(neg_weight, "B,K,T"),
    )
    pos = (pos_weight.detach() * F.softplus(-_masked(pos_log_psi, pos_weight > 0))).sum(dim=(1, 2))
    neg = (neg_weight.detach() * F.softplus(_masked(neg_log_psi, neg_weight > 0))).sum(dim=(1, 2))
    valid = (pos_weight.sum(dim=(1, 2)) > 0) & (neg_weight.sum(dim=(1, 2)) > 0)
    return _mean_over(pos + neg, valid, neg_log_psi)


def fudge_loss(log_psi: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ψ_t = exp(ℓ_t) ∈ (0, 1] against labels y ∈ [0, 1] of the completions.

    log_psi (B, N, T), labels (B, N), weight (B, N, T) (0 where a step is not learned).
    """
    _check_shapes(log_psi=(log_psi, "B,N,T"), labels=(labels, "B,N"), weight=(weight, "B,N,T"))
    keep = weight > 0
    if (_masked(log_psi.detach(), keep) > BOUND_TOLERANCE).any():
        raise ConfigError("FUDGE needs a twist with ψ ∈ (0, 1] (log ψ ≤ 0): build it with output='sigmoid'")
    if ((labels < 0) | (labels > 1) | torch.isnan(labels)).any():
        raise ConfigError("FUDGE labels must lie in [0, 1]")
    lp = _masked(log_psi, keep)
    y = labels.detach().unsqueeze(-1).to(lp.dtype)
    bce = -(y * lp + (1 - y) * _masked(log1mexp(lp), keep))
    per_group = (weight.detach() * _masked(bce, keep)).sum(dim=(1, 2))
    return _mean_over(per_group, keep.any(dim=2).any(dim=1), log_psi)


def jeffreys_loss(log_q_seq: torch.Tensor, log_w: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """Surrogate of KL(σ‖q_θ) + KL(q_θ‖σ) on samples of q_θ (module docstring): −Σ_k sg(w̄_k + a_k (log w_k − b))
    log q_θ(s^k), per group.

    log_q_seq (B, K): log q_θ(s^k) with grad. log_w (B, K): log p0 φ / q_θ of each sample (no grad; finite).
    log_weight (B, K): log data weights a (−∞: padding rows, which get no weight).
    """
    _check_shapes(log_q_seq=(log_q_seq, "B,K"), log_w=(log_w, "B,K"), log_weight=(log_weight, "B,K"))
    keep = torch.isfinite(log_weight)
    lw = _masked(log_w.detach(), keep)
    a = safe_softmax(log_weight.detach(), dim=1)
    forward = safe_softmax(torch.where(keep, log_weight.detach() + lw, torch.full_like(lw, -math.inf)), dim=1)
    baseline = (a * lw).sum(dim=1, keepdim=True)
    coef = forward + a * (lw - baseline)
    per_group = -(coef * _masked(log_q_seq, keep)).sum(dim=1)
    return _mean_over(per_group, keep.any(dim=1), log_q_seq)


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: what a trainer collects, and the registry adapters that feed the functions above.


@dataclass
class Rollouts:
    """Per-token quantities of n stored samples in each of B groups (T steps), for the losses.

    log_psi (B, n, T): ℓ_t = log ψ_t(s_<t, s_t), the head's value at the sampled token (with grad).
    learned (B, n, T) bool: t ≤ f (the step was taken; its head value is learned). finishing: t = f.
    log_p0 / log_q (B, n, T): log p0(s_t | s_<t) and log q_t(s_t | s_<t) of the proposal that drew the sample (0
    where not learned; no grad). log_z_next (B, n, T): log Σ_v p0(v | s_1:t) ψ_t+1(s_1:t, v) (no grad; 0 where t ≥ f).
    log_phi (B, n): log φ(s). log_weight (B, n): log data weight (normalised within each group by the losses;
    −∞ marks a padding row). log_q_seq (B, n): log q_θ(s) of the twisted proposal *with grad* (only when built
    with ``differentiable_q``; None otherwise).
    """

    log_psi: torch.Tensor
    learned: torch.Tensor
    finishing: torch.Tensor
    log_p0: torch.Tensor
    log_q: torch.Tensor
    log_z_next: torch.Tensor
    log_phi: torch.Tensor
    log_weight: torch.Tensor
    log_q_seq: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.log_psi.shape)  # type: ignore[return-value]

    def cumulative_log_ratio(self) -> torch.Tensor:
        """(B, n, T) log p0(s_1:min(t,f)) / q(s_1:min(t,f)): importance weight of the prefix towards p0."""
        return torch.cumsum(_masked(self.log_p0 - self.log_q, self.learned), dim=2)

    def pi_log_weights(self) -> torch.Tensor:
        """(B, n, T) log p0(s_1:t) ψ̃_t(s_1:t) / q(s_1:t) + log a: unnormalised weight of π_t^θ (no grad)."""
        psi = torch.where(self.learned, self.log_psi.detach(), self.log_phi.unsqueeze(-1).expand_as(self.log_psi))
        return self.cumulative_log_ratio() + psi + self.log_weight.unsqueeze(-1)

    def p0_log_weights(self) -> torch.Tensor:
        """(B, n, T) log p0(s_1:t) / q(s_1:t) + log a: unnormalised weight of the p0 marginal on s_1:t."""
        return self.cumulative_log_ratio() + self.log_weight.unsqueeze(-1)

    def sample_weights(self) -> torch.Tensor:
        """(B, n) the normalised data weights a."""
        return safe_softmax(self.log_weight, dim=1)


def make_rollouts(
    feats: PrefixFeatures,
    log_psi_all: torch.Tensor,
    log_phi: torch.Tensor,
    num_groups: int,
    *,
    log_weight: torch.Tensor | None = None,
    proposal: str = "base",
    differentiable_q: bool = False,
) -> Rollouts:
    """Rollouts of N = B·n stored sequences (row b·n + j is sample j of group b).

    feats: from :func:`~twistlm.twists.features.prefix_features`. log_psi_all (N, T, V): the twist over all prefixes
    (:func:`~twistlm.twists.features.prefix_log_psi`, with grad). log_phi (N,) or (B, n). log_weight: (B, n) data
    log weights (default uniform). proposal: ``"base"`` (q = p0) or ``"twisted"`` (q ∝ p0 ψ with *this* twist).
    differentiable_q: also return log q_θ(s) with grad (``Rollouts.log_q_seq``; the twisted proposal only).
    """
    N, T, _ = log_psi_all.shape
    if feats.tokens.shape != (N, T) or feats.logp0.shape[:2] != (N, T):
        raise ConfigError(
            f"log_psi_all {tuple(log_psi_all.shape)} does not match the features {tuple(feats.tokens.shape)}"
        )
    if N % num_groups:
        raise ConfigError(f"{N} rows do not split into {num_groups} groups")
    if proposal not in ("base", "twisted"):
        raise ConfigError(f"unknown proposal {proposal!r}; choose from: base, twisted")
    if differentiable_q and proposal != "twisted":
        raise ConfigError("log q_θ with grad exists for the twisted proposal only (q = p0 has no parameters)")
    B, n = num_groups, N // num_groups
    device = log_psi_all.device
    f64 = torch.float64
    tokens = feats.tokens.to(device).unsqueeze(-1)
    logp0 = feats.logp0.to(device)
    learned = feats.mask.to(device)
    steps = torch.arange(1, T + 1, device=device).unsqueeze(0)
    finishing = steps == feats.lengths.to(device).unsqueeze(1)
    lpsi = log_psi_all.gather(-1, tokens).squeeze(-1).to(f64)
    # log Σ_v p0 ψ_t over the vocabulary, computed once: with grad only where log q_θ(s) is wanted
    psi_for_z = log_psi_all if differentiable_q else log_psi_all.detach()
    lz = torch.logsumexp(logp0.to(log_psi_all.dtype) + psi_for_z, dim=-1).to(f64)
    with torch.no_grad():
        lp0 = logp0.gather(-1, tokens).squeeze(-1).to(f64)
        lzt = lz.detach()
        lq = lp0 if proposal == "base" else lp0 + lpsi.detach() - lzt
        z_next = torch.cat([lzt[:, 1:], torch.zeros_like(lzt[:, :1])], dim=1)
        z_next = _masked(z_next, learned & ~finishing)
        lp0, lq = _masked(lp0, learned), _masked(lq, learned)
    log_phi = torch.as_tensor(log_phi, dtype=f64, device=device).reshape(B, n)
    if log_weight is None:
        log_weight = torch.zeros(B, n, dtype=f64, device=device)
    log_weight = torch.as_tensor(log_weight, dtype=f64, device=device).reshape(B, n)
    shape = (B, n, T)
    log_q_seq = None
    if differentiable_q:  # log q_t = lp0_t + ℓ_t − log Σ_v p0 ψ_t, the normaliser with grad
        log_q_seq = _masked(lp0 + lpsi - lz, learned).sum(dim=1).view(B, n)
    return Rollouts(
        lpsi.view(shape),
        learned.view(shape),
        finishing.view(shape),
        lp0.view(shape),
        lq.view(shape),
        z_next.view(shape),
        log_phi,
        log_weight,
        log_q_seq,
    )


def _learned_weights(r: Rollouts, per_sample: torch.Tensor) -> torch.Tensor:
    """(B, n, T) weights: ``per_sample`` (B, n) or (B, n, T), zeroed where a step is not learned."""
    w = per_sample.unsqueeze(-1) if per_sample.dim() == 2 else per_sample
    return _masked(w.expand_as(r.log_psi), r.learned)


def _need_positives(pos: Rollouts | None, loss: str) -> Rollouts:
    if pos is None:
        raise ConfigError(f"the {loss} loss needs positive (target) samples")
    return pos


def ctl_loss_normalised(pos_log_psi: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """CTL for a normalised twist (Z_t = Σ p0 ψ_t ≡ 1 for every θ, e.g. :class:`~twistlm.twists.ratio.RatioTwist`):
    ∇ log Z_t = 0, so the surrogate is −Σ_t E_σ[ℓ_t] alone — maximum likelihood of the twist-induced proposal on
    the positives. Inputs as in :func:`ctl_loss`."""
    _check_shapes(pos_log_psi=(pos_log_psi, "B,P,T"), pos_weight=(pos_weight, "B,P,T"))
    pos_term, valid = _positive_term(pos_log_psi, pos_weight)
    return _mean_over(-pos_term, valid, pos_log_psi)


def _ctl(neg: Rollouts | None, pos: Rollouts | None, generator: torch.Generator | None) -> torch.Tensor:
    pos = _need_positives(pos, "ctl")
    pos_w = _learned_weights(pos, pos.sample_weights())
    if neg is None:  # a normalised twist: no negatives needed (TwistLoss.normaliser_from_negatives)
        return ctl_loss_normalised(pos.log_psi, pos_w)
    # Negatives drawn anyway (e.g. to feed a buffer): with a normalised twist their term is a zero-mean estimate.
    return ctl_loss(pos.log_psi, pos_w, neg.log_psi, neg.pi_log_weights(), neg.learned)


def _rl(neg: Rollouts, pos: Rollouts | None, generator: torch.Generator | None) -> torch.Tensor:
    phi = neg.log_phi.unsqueeze(-1).expand_as(neg.log_z_next)
    target = torch.where(neg.finishing, phi, neg.log_z_next).clamp(min=RL_LOG_FLOOR)
    return rl_loss(neg.log_psi, target, _learned_weights(neg, neg.sample_weights()))


def _sixo(neg: Rollouts, pos: Rollouts | None, generator: torch.Generator | None) -> torch.Tensor:
    pos = _need_positives(pos, "sixo")
    neg_w = _learned_weights(neg, safe_softmax(neg.p0_log_weights(), dim=1))
    return sixo_loss(pos.log_psi, _learned_weights(pos, pos.sample_weights()), neg.log_psi, neg_w)


def fudge_labels(log_phi: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """y ~ Bernoulli(φ(s)); refuses φ outside [0, 1]."""
    if (log_phi > BOUND_TOLERANCE).any():
        raise ConfigError(f"FUDGE needs a potential with 0 ≤ φ ≤ 1, got log φ = {float(log_phi.max()):.4g} > 0")
    probs = torch.exp(log_phi.clamp(max=0.0)).cpu()
    return torch.bernoulli(probs, generator=generator).to(log_phi.device)


def _fudge(neg: Rollouts, pos: Rollouts | None, generator: torch.Generator | None) -> torch.Tensor:
    labels = fudge_labels(neg.log_phi, generator)
    seq_w = safe_softmax(neg.p0_log_weights()[..., -1], dim=1)  # p0(s)/q(s) of the whole sequence
    return fudge_loss(neg.log_psi, labels, _learned_weights(neg, seq_w))


def _jeffreys(neg: Rollouts, pos: Rollouts | None, generator: torch.Generator | None) -> torch.Tensor:
    if neg.log_q_seq is None:
        raise ConfigError("the jeffreys loss needs negatives from the twisted proposal with log q_θ (differentiable_q)")
    log_w = neg.cumulative_log_ratio()[..., -1] + neg.log_phi.clamp(min=RL_LOG_FLOOR)
    return jeffreys_loss(neg.log_q_seq, log_w, neg.log_weight)


@dataclass(frozen=True)
class TwistLoss:
    """A registered loss: ``compute(negatives, positives, generator) -> scalar`` and what it needs.

    needs_positives: samples from σ (or SMC approximations) are required. bounded_only: only for 0 ≤ φ ≤ 1.
    default_proposal: where negatives come from unless configured. twist_output: the head output it expects
    (``"sigmoid"`` for FUDGE: ψ ∈ (0, 1)).
    """

    name: str
    compute: Callable[[Rollouts, Rollouts | None, torch.Generator | None], torch.Tensor]
    function: Callable[..., torch.Tensor]
    needs_positives: bool
    bounded_only: bool
    default_proposal: str
    twist_output: str
    description: str
    normaliser_from_negatives: bool = False
    """The negatives only estimate ∇ log Z_t: a normalised twist (``twist.normalised``) needs none — the trainers
    then pass ``negatives=None``."""
    needs_log_q: bool = False
    """The loss differentiates the proposal's own log q_θ(s) on its samples: negatives must come from the twisted
    proposal, on-policy (no corpus), built with ``make_rollouts(differentiable_q=True)``."""


LOSSES: dict[str, TwistLoss] = {
    "ctl": TwistLoss(
        "ctl",
        _ctl,
        ctl_loss,
        True,
        False,
        "twisted",
        "log",
        "contrastive twist learning: Σ_t KL(σ(s_1:t) ‖ π_t)",
        normaliser_from_negatives=True,
    ),
    "rl": TwistLoss(
        "rl",
        _rl,
        rl_loss,
        False,
        False,
        "twisted",
        "log",
        "soft-Q regression on log Σ_v p0 ψ_t+1 (log φ on the finishing step)",
    ),
    "sixo": TwistLoss(
        "sixo", _sixo, sixo_loss, True, False, "base", "log", "logistic regression: σ-prefixes vs p0-prefixes"
    ),
    "fudge": TwistLoss(
        "fudge",
        _fudge,
        fudge_loss,
        False,
        True,
        "base",
        "sigmoid",
        "BCE of ψ against y ~ Bernoulli(φ) on p0 samples (0 ≤ φ ≤ 1 only)",
    ),
    "jeffreys": TwistLoss(
        "jeffreys",
        _jeffreys,
        jeffreys_loss,
        False,
        False,
        "twisted",
        "log",
        "KL(σ‖q) + KL(q‖σ) of the twisted proposal on its own samples (on-policy)",
        needs_log_q=True,
    ),
}
"""Registry: loss name → :class:`TwistLoss`."""


def get_loss(name: str) -> TwistLoss:
    if name not in LOSSES:
        raise ConfigError(f"unknown twist loss {name!r}; choose from: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
