"""LoRA twist: a separate copy of the base model with LoRA adapters and its own linear head.

log ψ_t(s_<t, ·) = W g_t + b, where g_t is the last hidden state of the *adapted* copy after s_<t (not the frozen
base model's h_t, which ``TwistContext.hidden`` carries). The copy runs on the sampler's tokens with its own KV cache
(:mod:`twistlm.twists.adapted`: incremental state, the ``start`` / ``reorder`` hooks, binding the prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from twistlm.errors import ConfigError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.adapted import AdaptedCopyTwist
from twistlm.twists.base import TwistContext
from twistlm.twists.head import VocabHead
from twistlm.twists.mlp import apply_output, check_output, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.twists.features import PrefixFeatures


class LoRATwist(AdaptedCopyTwist):
    """ψ from a LoRA-adapted copy of the base model plus a linear head (see the module docstring)."""

    kind = "lora"

    def __init__(
        self,
        model: Any,
        eos_token_id: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        output: str = "log",
        base_model: str = "",
        level: bool = True,
        condition: str = "prompt",
    ):
        super().__init__(model, eos_token_id, r, alpha, dropout, target_modules, base_model, condition)
        self.output = check_output(output)
        self.head = VocabHead(self.hidden_size, self.vocab_size, level=level).to(self.output_head.weight.device)

    @classmethod
    def for_lm(
        cls,
        lm: ParticleLM,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        output: str = "log",
        init_scale: float = 0.0,
        seed: int = 0,
        level: bool = True,
        condition: str = "prompt",
    ) -> LoRATwist:
        """A LoRA twist over ``lm`` (a Hugging Face model); head zero (ψ ≡ 1) or N(0, init_scale²); ``condition``:
        what the copy reads (:mod:`twistlm.conditioning`)."""
        if not isinstance(lm, HFLM):
            raise ConfigError("the LoRA twist needs a Hugging Face base model (it adapts a copy of it)")
        twist = seeded_init(
            lambda: cls(lm.model, lm.eos_token_id, r, alpha, dropout, target_modules, output, lm.name, level, condition),
            seed,
        )
        twist.head.reset(init_scale, torch.Generator().manual_seed(seed + 1))
        return twist

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        return apply_output(self.head(hidden.to(device=w.device, dtype=w.dtype)), self.output)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        hidden, _ = self._sync(ctx)
        return self._head(hidden).to(ctx.hidden.device)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        """(N, T, V) log ψ over all prefixes: one forward of the adapted copy over [prompt; s_1..s_T−1], with grad."""
        return self._head(self.prefix_hidden(self.feature_rows(feats), feats.tokens))

    # -- persistence --------------------------------------------------------------------------------------------------

    def config(self) -> dict:
        return {**self.adapter_config(), "output": self.output, "level": self.head.has_level}

    @classmethod
    def init_options(cls, cfg: dict) -> dict:
        return {"output": cfg["output"], "level": cfg.get("level", False)}
