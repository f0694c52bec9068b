"""MLP twist head over the frozen base model: log ψ_t(s_<t, ·) = MLP(h_t) ∈ R^V (MATH.md, "Twists and proposals").

h_t is the base LM's last hidden state after s_<t (``TwistContext.hidden``). The head has ``depth`` hidden layers of
``width`` units (GELU) and a :class:`~twistlm.twists.head.VocabHead` to the V outputs (per-token values plus one
shared level, ``level=True``; see that module for why the level matters).

Outputs. ``output="log"`` (default): the head's output is log ψ directly (ψ ∈ (0, ∞)). ``output="sigmoid"``:
log ψ = log sigmoid(raw), so ψ ∈ (0, 1) — what FUDGE needs (its ψ is a probability E_p0[φ | s_1:t]).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.head import VocabHead
from twistlm.twists.io import check_compatible, load_twist_state, read_config, read_weights

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.twists.features import PrefixFeatures

OUTPUTS = ("log", "sigmoid")


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ConfigError(f"unknown twist output {output!r}; choose from: {', '.join(OUTPUTS)}")
    return output


def apply_output(raw: torch.Tensor, output: str) -> torch.Tensor:
    """log ψ from the head's raw values: identity for ``"log"``, log-sigmoid for ``"sigmoid"``."""
    return F.logsigmoid(raw) if output == "sigmoid" else raw


def mlp_layers(in_features: int, width: int, depth: int) -> tuple[nn.Sequential, int]:
    """``depth`` hidden layers (Linear + GELU) of ``width`` units, and the size of their output."""
    layers: list[nn.Module] = []
    size = in_features
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.GELU()]
        size = width
    return nn.Sequential(*layers), size


def seeded_init(module_factory, seed: int):
    """Build a module with its default initialisation drawn from a fixed seed (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_factory()


class MLPTwist(Twist):
    """log ψ_t(s_<t, v) = MLP(h_t)_v for every token v (``output="sigmoid"``: log sigmoid of it)."""

    kind = "mlp"

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        width: int = 256,
        depth: int = 1,
        output: str = "log",
        base_model: str = "",
        level: bool = True,
    ):
        super().__init__()
        if width < 1 or depth < 0:
            raise ConfigError(f"MLP twist needs width ≥ 1 and depth ≥ 0, got width={width}, depth={depth}")
        self.hidden_size, self.vocab_size, self.width, self.depth = hidden_size, vocab_size, width, depth
        self.output = check_output(output)
        self.base_model = base_model
        self.net, size = mlp_layers(hidden_size, width, depth)
        self.out = self._vocab_head(size, vocab_size, level)

    def _vocab_head(self, size: int, vocab_size: int, level: bool) -> nn.Module:
        """The output layer from the MLP features to the V tokens (subclasses score tokens differently)."""
        return VocabHead(size, vocab_size, level=level)

    @classmethod
    def for_lm(
        cls,
        lm: ParticleLM,
        width: int = 256,
        depth: int = 1,
        output: str = "log",
        init_scale: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
        level: bool = True,
    ) -> MLPTwist:
        """A head for ``lm``; hidden layers seeded by ``seed``, final layer zero (ψ ≡ 1) or N(0, init_scale²)."""
        twist = seeded_init(lambda: cls(lm.hidden_size, lm.vocab_size, width, depth, output, lm.name, level), seed)
        twist.out.reset(init_scale, torch.Generator().manual_seed(seed + 1))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return twist.to(device=lm.device, dtype=dtype)

    @property
    def _param(self) -> torch.Tensor:
        return self.out.weight

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        p = self._param
        return apply_output(self.out(self.net(hidden.to(device=p.device, dtype=p.dtype))), self.output)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self._head(ctx.hidden).to(ctx.hidden.device)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        """(N, T, V) log ψ_t(s_<t, ·) for every step of stored sequences (with grad; see :mod:`.features`)."""
        return self._head(feats.hidden)

    def log_psi_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """log ψ_t(s_<t, s_t) at the stored tokens only: ``hidden`` (N, T, H), ``tokens`` (N, T) → (N, T), with grad."""
        p = self._param
        raw = self.out.at(self.net(hidden.to(device=p.device, dtype=p.dtype)), tokens.to(p.device))
        return apply_output(raw, self.output)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "depth": self.depth,
            "output": self.output,
            "level": self.out.has_level,
            "dtype": str(self._param.dtype).removeprefix("torch."),
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> MLPTwist:
        cfg = read_config(directory, cls.kind)
        check_compatible(cfg, lm, directory)
        twist = cls(
            cfg["hidden_size"],
            cfg["vocab_size"],
            cfg["width"],
            cfg["depth"],
            cfg["output"],
            cfg.get("base_model", ""),
            level=cfg.get("level", False),
        )
        twist = twist.to(getattr(torch, cfg.get("dtype", "float32")))
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device) if lm is not None else twist
