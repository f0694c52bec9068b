"""Linear twist head over the frozen base model: log ψ_t(s_<t, ·) = W h_t + b (the twisted-SMC paper's default).

Saved as ``twist.safetensors`` + ``twist_config.json`` (naming the base model and its vocabulary/hidden sizes, so a
twist trained for another model is refused with a clear error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.twists.base import Twist, TwistContext

CONFIG_NAME = "twist_config.json"
WEIGHTS_NAME = "twist.safetensors"


class LinearTwist(Twist):
    """log ψ_t(s_<t, v) = (W h_t + b)_v for every token v; h_t is the base LM's last hidden state."""

    kind = "linear"

    def __init__(self, hidden_size: int, vocab_size: int, base_model: str = ""):
        super().__init__()
        self.head = nn.Linear(hidden_size, vocab_size)
        self.base_model = base_model

    @classmethod
    def for_lm(cls, lm: ParticleLM, init_scale: float = 0.0, seed: int = 0) -> LinearTwist:
        """A head sized for ``lm``: zeros (ψ ≡ 1, so twisted SMC = base SMC) or N(0, init_scale²) weights."""
        twist = cls(lm.hidden_size, lm.vocab_size, base_model=lm.name)
        with torch.no_grad():
            twist.head.bias.zero_()
            if init_scale == 0.0:
                twist.head.weight.zero_()
            else:
                g = torch.Generator().manual_seed(seed)
                twist.head.weight.copy_(init_scale * torch.randn(twist.head.weight.shape, generator=g))
        return twist.to(lm.device)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self.head(ctx.hidden.to(self.head.weight.dtype))

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.head.in_features,
            "vocab_size": self.head.out_features,
            "base_model": self.base_model,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> LinearTwist:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ConfigError(f"no twist found in {directory} (missing {CONFIG_NAME})")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        if cfg.get("kind") != cls.kind:
            raise ConfigError(f"twist in {directory} is of kind {cfg.get('kind')!r}, not {cls.kind!r}")
        if lm is not None and (cfg["vocab_size"], cfg["hidden_size"]) != (lm.vocab_size, lm.hidden_size):
            raise ConfigError(
                f"twist in {directory} was trained for {cfg.get('base_model')!r} (vocab {cfg['vocab_size']}, hidden "
                f"{cfg['hidden_size']}), not for this model (vocab {lm.vocab_size}, hidden {lm.hidden_size})"
            )
        twist = cls(cfg["hidden_size"], cfg["vocab_size"], base_model=cfg.get("base_model", ""))
        twist.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return twist.to(lm.device) if lm is not None else twist
