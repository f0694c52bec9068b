"""The Twist contract (MATH.md, "Twists and proposals").

A twist gives, from the LM state after s_<t, **log ψ_t(s_<t, v) for every vocabulary token v at once**: a (N, V)
tensor. Values must be finite or −∞ (ψ_t(s_<t, v) = 0 forbids v; the twist-induced proposal then never proposes it).
The value it gives for a token that finishes the particle (EOS, or any token at t = T) shapes the proposal only: the
weight uses φ there (MATH.md, "Weights").

ψ_0 ≡ 1 is implicit. Twists are torch modules so learned ones train with the usual tools; the samplers call them
under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TwistContext:
    """What a twist sees at step t (1-based).

    hidden: (N, H) last hidden state of the base LM after s_<t.
    tokens: (N, t−1) tokens generated so far, on the CPU (rows of finished particles hold the pad/EOS id after
        their end); hidden is on the model's device.
    step: t, the position of the token about to be sampled.
    max_new_tokens: T.
    prompt_index: (N,) which prompt each particle belongs to (for conditional twists).
    logp0: (N, V) log p0(· | s_<t) when the caller has it (the sampler does), so a twist that needs p0 (the ratio
        twist) does not recompute it; None: derive it from ``hidden`` if needed.
    """

    hidden: torch.Tensor
    tokens: torch.Tensor
    step: int
    max_new_tokens: int
    prompt_index: torch.Tensor
    logp0: torch.Tensor | None = None


class Twist(nn.Module):
    """Base class: subclasses implement :meth:`log_psi`; stateful twists may also implement the sampler hooks."""

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self, target, num_particles: int) -> None:
        """Sampler hook, right after the LM's prefill: a run on ``target`` (B·K rows, row b·K + k) begins. Twists
        with their own state set it up here (the LoRA twist: its KV cache from ``target.prompt_ids``; a conditional
        twist: its per-prompt conditions from ``target.extras``). Default: nothing."""

    def reorder(self, index: torch.Tensor) -> None:
        """Sampler hook, right after ``lm.reorder``: row i now holds old row ``index[i]``. Default: nothing."""

    def config(self) -> dict:  # pragma: no cover - abstract
        """``kind`` and the constructor arguments, as saved in ``twist_config.json`` (see :mod:`twistlm.twists.io`)."""
        raise NotImplementedError

    def save_pretrained(self, directory) -> None:
        """Save the twist's own tensors and :meth:`config` (each file written atomically)."""
        from twistlm.twists.io import save_weights, twist_state_dict

        save_weights(directory, twist_state_dict(self), self.config())

    def forward(self, ctx: TwistContext) -> torch.Tensor:
        return self.log_psi(ctx)
