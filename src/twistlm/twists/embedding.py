"""Embedding-factorised twist head: log ψ_t(s_<t, v) = level(g_t) + (W g_t)ᵀ e_v + b_v, g_t = MLP(h_t).

h_t is the frozen base LM's last hidden state, e_v the base LM's own (frozen) output embedding of token v — the
vector its softmax layer scores against h. W maps the MLP features to that embedding space, b_v is a per-token
bias, ``level`` a value shared by every token (see :mod:`twistlm.twists.head`).

Why. A per-token head (``linear``, ``mlp``) has one free row per vocabulary entry, and a loss only moves the rows of
tokens that were sampled: on a 49k-token vocabulary, learning that " awful" helps a 1-star review says nothing about
" terrible". Scoring tokens through the LM's embeddings shares what is learned between tokens the LM itself treats
as similar, and the head has width·H parameters instead of width·V (147k instead of 12.6M for SmolLM2 at width
256), which is what a twist trained from a few thousand CPU samples can afford. The per-token bias b_v still lets
single tokens move (it too starts at 0). The embeddings are not saved with the twist: they are read from the base
model when the twist is built or loaded (a twist for another model is refused, as for every kind).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from twistlm.errors import ConfigError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.io import check_compatible, load_twist_state, read_config, read_weights
from twistlm.twists.mlp import apply_output, check_output, mlp_layers, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.twists.features import PrefixFeatures


def output_embeddings(lm: ParticleLM) -> torch.Tensor:
    """(V, E) the base LM's output token embeddings (no grad): a Hugging Face model's unembedding matrix, or the toy
    LM's output weights."""
    if isinstance(lm, HFLM):
        return lm._head.weight.detach()
    out = getattr(lm, "out", None)  # ToyLM: logits = h @ out, out (H, V)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == lm.vocab_size:
        return out.detach().T
    raise ConfigError(f"the embedding twist needs the base model's output embeddings; {type(lm).__name__} has none")


class EmbeddingTwist(Twist):
    """log ψ_t(s_<t, v) = level(g) + (W g)ᵀ e_v + b_v with g = MLP(h_t) (see the module docstring)."""

    kind = "embedding"

    def __init__(
        self,
        embeddings: torch.Tensor,
        hidden_size: int,
        width: int = 256,
        depth: int = 1,
        output: str = "log",
        base_model: str = "",
    ):
        super().__init__()
        if width < 1 or depth < 0:
            raise ConfigError(f"embedding twist needs width ≥ 1 and depth ≥ 0, got width={width}, depth={depth}")
        vocab_size, embed_size = embeddings.shape
        self.hidden_size, self.vocab_size, self.width, self.depth = hidden_size, int(vocab_size), width, depth
        self.output = check_output(output)
        self.base_model = base_model
        self.net, size = mlp_layers(hidden_size, width, depth)
        self.project = nn.Linear(size, int(embed_size), bias=False)
        self.level = nn.Linear(size, 1)
        self.token_bias = nn.Parameter(torch.zeros(int(vocab_size)))
        self.register_buffer("embeddings", embeddings, persistent=False)

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
    ) -> EmbeddingTwist:
        """A head for ``lm``: hidden layers seeded by ``seed``; W and b zero (ψ constant over tokens) or W ~
        N(0, init_scale²)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        emb = output_embeddings(lm).to(dtype)
        twist = seeded_init(lambda: cls(emb, lm.hidden_size, width, depth, output, lm.name), seed)
        with torch.no_grad():
            twist.level.weight.zero_()
            twist.level.bias.zero_()
            if init_scale == 0.0:
                twist.project.weight.zero_()
            else:
                g = torch.Generator().manual_seed(seed + 1)
                twist.project.weight.copy_(init_scale * torch.randn(twist.project.weight.shape, generator=g))
        return twist.to(device=lm.device, dtype=dtype)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.project.weight
        g = self.net(hidden.to(device=w.device, dtype=w.dtype))
        raw = self.project(g) @ self.embeddings.T + self.token_bias + self.level(g)
        return apply_output(raw, self.output)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self._head(ctx.hidden).to(ctx.hidden.device)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        """(N, T, V) log ψ_t(s_<t, ·) for every step of stored sequences (with grad; see :mod:`.features`)."""
        return self._head(feats.hidden)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "depth": self.depth,
            "output": self.output,
            "dtype": str(self.project.weight.dtype).removeprefix("torch."),
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> EmbeddingTwist:
        cfg = read_config(directory, cls.kind)
        if lm is None:
            raise ConfigError("loading an embedding twist needs its base model (it scores tokens by its embeddings)")
        check_compatible(cfg, lm, directory)
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        emb = output_embeddings(lm).to(dtype)
        twist = cls(emb, cfg["hidden_size"], cfg["width"], cfg["depth"], cfg["output"], cfg.get("base_model", ""))
        twist = twist.to(dtype)
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device)
