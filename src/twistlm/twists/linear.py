"""Linear twist head over the frozen base model: log ψ_t(s_<t, ·) = W h_t + b (+ a shared level uᵀh_t + c, see
:mod:`twistlm.twists.head`); the twisted-SMC paper's default head.

Saved as ``twist.safetensors`` + ``twist_config.json`` (naming the base model and its vocabulary/hidden sizes, so a
twist trained for another model is refused with a clear error).
"""

from __future__ import annotations

import os

import torch

from twistlm.lm import ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.head import VocabHead
from twistlm.twists.io import check_compatible, load_twist_state, read_config, read_weights


class LinearTwist(Twist):
    """log ψ_t(s_<t, v) = (W h_t + b)_v for every token v; h_t is the base LM's last hidden state."""

    kind = "linear"

    def __init__(self, hidden_size: int, vocab_size: int, base_model: str = "", level: bool = True):
        super().__init__()
        self.head = VocabHead(hidden_size, vocab_size, level=level)
        self.base_model = base_model

    @classmethod
    def for_lm(cls, lm: ParticleLM, init_scale: float = 0.0, seed: int = 0, level: bool = True) -> LinearTwist:
        """A head sized for ``lm``: zeros (ψ ≡ 1, so twisted SMC = base SMC) or N(0, init_scale²) weights."""
        twist = cls(lm.hidden_size, lm.vocab_size, base_model=lm.name, level=level)
        twist.head.reset(init_scale, torch.Generator().manual_seed(seed))
        return twist.to(lm.device)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self.head(ctx.hidden.to(self.head.weight.dtype))

    def log_psi_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """log ψ_t(s_<t, s_t) at the stored tokens only: (N, T, H), (N, T) → (N, T), with grad."""
        w = self.head.weight
        return self.head.at(hidden.to(device=w.device, dtype=w.dtype), tokens.to(w.device))

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.head.in_features,
            "vocab_size": self.head.out_features,
            "level": self.head.has_level,
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> LinearTwist:
        cfg = read_config(directory, cls.kind)
        check_compatible(cfg, lm, directory)
        twist = cls(
            cfg["hidden_size"], cfg["vocab_size"], base_model=cfg.get("base_model", ""), level=cfg.get("level", False)
        )
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device) if lm is not None else twist
