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

``rank=r`` scores tokens against the embeddings' r leading principal directions, e_v ↦ V_rᵀ e_v (V_r: the top r
right singular vectors of the (V, E) embedding matrix, recomputed from the base model on load). What a twist costs a
sampler is this (N, V) scoring at every step: at r = 64 it is 9× cheaper than against the full 576-dimensional
SmolLM2 embeddings, which is what keeps twisted SMC within a few percent of base SMC; the directions kept are the
ones along which the LM's own token vectors differ most.
"""

from __future__ import annotations

import os

import torch

from twistlm.errors import ConfigError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.head import EmbeddingHead
from twistlm.twists.io import check_compatible, load_twist_state, read_config, read_weights
from twistlm.twists.mlp import MLPTwist, seeded_init


def output_embeddings(lm: ParticleLM) -> torch.Tensor:
    """(V, E) the base LM's output token embeddings (no grad): a Hugging Face model's unembedding matrix, or the toy
    LM's output weights."""
    if isinstance(lm, HFLM):
        return lm._head.weight.detach()
    out = getattr(lm, "out", None)  # ToyLM: logits = h @ out, out (H, V)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == lm.vocab_size:
        return out.detach().T
    raise ConfigError(f"the embedding twist needs the base model's output embeddings; {type(lm).__name__} has none")


def reduced_embeddings(embeddings: torch.Tensor, rank: int | None) -> torch.Tensor:
    """(V, r) coordinates of the embeddings along their r leading right singular vectors (``None``: unchanged)."""
    if rank is None or rank >= embeddings.shape[1]:
        return embeddings
    if rank < 1:
        raise ConfigError(f"embedding twist rank must be ≥ 1, got {rank}")
    _, _, vh = torch.linalg.svd(embeddings.double(), full_matrices=False)
    # Fix each direction's sign (SVD is unique only up to it) so a reloaded twist scores tokens identically.
    signs = torch.sign(vh[:rank].sum(dim=1, keepdim=True))
    signs[signs == 0] = 1.0
    return (embeddings.double() @ (vh[:rank] * signs).T).to(embeddings.dtype)


class EmbeddingTwist(MLPTwist):
    """log ψ_t(s_<t, v) = level(g) + (W g)ᵀ e_v + b_v with g = MLP(h_t) (see the module docstring): an
    :class:`~twistlm.twists.mlp.MLPTwist` whose output layer is an :class:`~twistlm.twists.head.EmbeddingHead`."""

    kind = "embedding"

    def __init__(
        self,
        embeddings: torch.Tensor,
        hidden_size: int,
        width: int = 256,
        depth: int = 1,
        output: str = "log",
        base_model: str = "",
        rank: int | None = None,
    ):
        self.rank = rank
        self._init_embeddings = reduced_embeddings(embeddings, rank)  # read once by _vocab_head in MLPTwist.__init__
        super().__init__(hidden_size, int(embeddings.shape[0]), width, depth, output, base_model)
        del self._init_embeddings

    def _vocab_head(self, size: int, vocab_size: int, level: bool) -> EmbeddingHead:
        return EmbeddingHead(size, self._init_embeddings)

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
        rank: int | None = None,
    ) -> EmbeddingTwist:
        """A head for ``lm``: hidden layers seeded by ``seed``; W and b zero (ψ constant over tokens) or W ~
        N(0, init_scale²)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        emb = output_embeddings(lm).to(dtype)
        twist = seeded_init(lambda: cls(emb, lm.hidden_size, width, depth, output, lm.name, rank), seed)
        twist.out.reset(init_scale, torch.Generator().manual_seed(seed + 1))
        return twist.to(device=lm.device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> EmbeddingTwist:
        cfg = read_config(directory, cls.kind)
        if lm is None:
            raise ConfigError("loading an embedding twist needs its base model (it scores tokens by its embeddings)")
        check_compatible(cfg, lm, directory)
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        emb = output_embeddings(lm).to(dtype)
        twist = cls(
            emb, cfg["hidden_size"], cfg["width"], cfg["depth"], cfg["output"], cfg.get("base_model", ""), cfg.get("rank")
        )
        twist = twist.to(dtype)
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank}
