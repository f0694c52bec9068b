"""Exact answers by enumeration, for targets whose sequences can be listed (the toy LM with small T).

:func:`enumerate_target` lists every finished sequence s with log p0(s) and log φ(s), giving Z = Σ_s p0(s) φ(s) and
σ = p0 φ / Z exactly. :class:`OptimalTwist` holds ψ*_t(s_1:t) = E_{p0}[φ(s) | s_1:t] for every prefix (MATH.md,
"Twists and proposals"): with it twisted SMC returns Ẑ = Z on every run and samples exactly σ.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from twistlm.errors import ConfigError
from twistlm.target import Target
from twistlm.twists.base import Twist, TwistContext

MAX_ENUMERATED = 200_000
"""Refuse enumerations larger than this: they would not finish in a test."""


@dataclass
class ExactTarget:
    """Every finished sequence of one prompt: generated ids (incl. a finishing stop token), log p0, log φ."""

    sequences: list[tuple[int, ...]]
    log_p0: torch.Tensor
    log_phi: torch.Tensor

    @property
    def log_z(self) -> float:
        return float(torch.logsumexp(self.log_p0 + self.log_phi, dim=0))

    @property
    def probs(self) -> torch.Tensor:
        """σ(s) for each listed sequence."""
        return torch.softmax(self.log_p0 + self.log_phi, dim=0)

    def distribution(self) -> dict[tuple[int, ...], float]:
        return dict(zip(self.sequences, self.probs.tolist()))

    def total_variation(self, samples: list[list[int]], weights: torch.Tensor) -> float:
        """TV distance between σ and a weighted particle distribution over the same sequences."""
        empirical: dict[tuple[int, ...], float] = defaultdict(float)
        for seq, w in zip(samples, weights.tolist()):
            empirical[tuple(seq)] += w
        exact = self.distribution()
        keys = set(exact) | set(empirical)
        return 0.5 * sum(abs(exact.get(k, 0.0) - empirical.get(k, 0.0)) for k in keys)


def enumerate_target(target: Target, prompt: int = 0) -> ExactTarget:
    """List every finished sequence of ``target`` for prompt number ``prompt`` (breadth-first over the LM)."""
    lm, T = target.lm, target.max_new_tokens
    if lm.vocab_size**T > MAX_ENUMERATED:
        raise ConfigError(f"{lm.vocab_size}^{T} sequences are too many to enumerate")
    stops = set(target.stop_ids)
    state = lm.prefill([target.prompt_ids[prompt]], 1)
    live: list[tuple[int, ...]] = [()]
    live_logp = torch.zeros(1, dtype=torch.float64)
    done_seqs: list[tuple[int, ...]] = []
    done_logp: list[float] = []
    for t in range(1, T + 1):
        logp = state.logprobs.to(torch.float64)
        next_rows, next_tokens, next_live, next_logp = [], [], [], []
        for r, prefix in enumerate(live):
            for v in range(lm.vocab_size):
                lp = float(live_logp[r] + logp[r, v])
                seq = prefix + (v,)
                if v in stops or t == T:
                    done_seqs.append(seq)
                    done_logp.append(lp)
                else:
                    next_rows.append(r)
                    next_tokens.append(v)
                    next_live.append(seq)
                    next_logp.append(lp)
        if not next_live:
            break
        state = lm.reorder(state, torch.tensor(next_rows))
        state = lm.step(state, torch.tensor(next_tokens))
        live, live_logp = next_live, torch.tensor(next_logp, dtype=torch.float64)
    log_phi = target.log_phi([list(s) for s in done_seqs], [prompt] * len(done_seqs))
    return ExactTarget(done_seqs, torch.tensor(done_logp, dtype=torch.float64), log_phi)


class OptimalTwist(Twist):
    """ψ*_t(s_1:t) = Σ_{s ⊒ s_1:t} p0(s | s_1:t) φ(s), tabulated from an enumeration (one prompt).

    For a finished prefix ψ* = φ, so the twist-induced proposal is σ(s_t | s_<t) exactly at every step.
    """

    def __init__(self, exact: ExactTarget, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # Σ over completions of p0(s) φ(s), keyed by prefix; divided by p0(prefix) below.
        mass: dict[tuple[int, ...], list[float]] = defaultdict(list)
        prefix_logp: dict[tuple[int, ...], float] = {}
        for seq, lp0, lphi in zip(exact.sequences, exact.log_p0.tolist(), exact.log_phi.tolist()):
            for t in range(1, len(seq) + 1):
                mass[seq[:t]].append(lp0 + lphi)
        # log p0(prefix) = logsumexp of log p0 over the sequences extending it (they partition its mass).
        ext: dict[tuple[int, ...], list[float]] = defaultdict(list)
        for seq, lp0 in zip(exact.sequences, exact.log_p0.tolist()):
            for t in range(1, len(seq) + 1):
                ext[seq[:t]].append(lp0)
        for prefix, lps in ext.items():
            prefix_logp[prefix] = float(torch.logsumexp(torch.tensor(lps, dtype=torch.float64), 0))
        self.table = {
            p: float(torch.logsumexp(torch.tensor(m, dtype=torch.float64), 0)) - prefix_logp[p]
            for p, m in mass.items()
        }
        self.log_z = exact.log_z

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        out = torch.full((ctx.tokens.shape[0], self.vocab_size), -math.inf, dtype=torch.float64)
        for n, row in enumerate(ctx.tokens.tolist()):
            prefix = tuple(row)
            for v in range(self.vocab_size):
                value = self.table.get(prefix + (v,))
                if value is not None:
                    out[n, v] = value
        return out
