"""The vocabulary head shared by the parametric twists: raw_v(x) = level(x) + token(x)_v.

A twist head maps features x of the state s_<t to one value per token v (log ψ_t(s_<t, v), or its logit for the
sigmoid output). It has two parts:

* ``token``: a linear map to the V tokens (zero-initialised, so ψ starts constant over tokens);
* ``level``: a linear map to **one** number shared by every token (also zero-initialised).

Why the shared level. A loss only ever sees the tokens that were sampled, so with a per-token head alone the rows of
tokens never drawn during training keep their initial value log ψ = 0 while the drawn ones move towards their targets
— and those are mostly negative (φ ≤ 1 gives log ψ* ≤ 0; for a goal with probability 1% under p0, about −4.6). The
twist-induced proposal q ∝ p0 ψ then favours, by a factor e^4.6 ≈ 100, exactly the tokens the twist knows nothing
about. With the level, every gradient step also moves the shared value, so an unseen token sits at the twist's
average value at that state and q follows p0 on it; the per-token part learns only *differences* between tokens
(weight decay pulls it towards the level, not towards ψ = 1). The level does not change q_t at a step (a constant
over v cancels in q_t ∝ p0 ψ_t); it carries the value estimate that the incremental weights ψ_t / ψ_t−1 need.
"""

from __future__ import annotations

import torch
from torch import nn


class VocabHead(nn.Module):
    """raw(x) = token(x) + level(x) (broadcast over the V outputs); ``level=False`` drops the shared part."""

    def __init__(self, in_features: int, vocab_size: int, level: bool = True):
        super().__init__()
        self.token = nn.Linear(in_features, vocab_size)
        self.level = nn.Linear(in_features, 1) if level else None

    @property
    def weight(self) -> torch.Tensor:
        return self.token.weight

    @property
    def in_features(self) -> int:
        return self.token.in_features

    @property
    def out_features(self) -> int:
        return self.token.out_features

    @property
    def has_level(self) -> bool:
        return self.level is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.token(x)
        # In place: Linear's backward does not need its output, and this saves one (rows, V) buffer per call.
        return raw.add_(self.level(x)) if self.level is not None else raw

    def at(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """raw(x)_v at one token per row: ``x`` (..., F), ``tokens`` (...) → (...). Equals ``forward(x)`` gathered at
        ``tokens`` without the (..., V) output — what off-policy losses on stored samples need."""
        raw = (self.token.weight[tokens] * x).sum(-1) + self.token.bias[tokens]
        return raw + self.level(x).squeeze(-1) if self.level is not None else raw

    def reset(self, init_scale: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Biases and the level zero; token weights zero (ψ constant over tokens) or N(0, init_scale²)."""
        with torch.no_grad():
            self.token.bias.zero_()
            if self.level is not None:
                self.level.weight.zero_()
                self.level.bias.zero_()
            if init_scale == 0.0:
                self.token.weight.zero_()
            else:
                w = torch.randn(self.token.weight.shape, generator=generator)
                self.token.weight.copy_(init_scale * w)


class EmbeddingHead(nn.Module):
    """raw(x)_v = (W x)ᵀ e_v + b_v + level(x): tokens scored against fixed embeddings e (V, E) — the base LM's own
    output embeddings for :class:`~twistlm.twists.embedding.EmbeddingTwist`. e is a non-persistent buffer (not
    saved: it is read from the base model); W, b and the level are the parameters, all zero after :meth:`reset`."""

    has_level = True

    def __init__(self, in_features: int, embeddings: torch.Tensor):
        super().__init__()
        vocab_size, embed_size = (int(n) for n in embeddings.shape)
        self.project = nn.Linear(in_features, embed_size, bias=False)
        self.level = nn.Linear(in_features, 1)
        self.token_bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("embeddings", embeddings, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.project.weight

    @property
    def out_features(self) -> int:
        return self.token_bias.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # matmul's backward needs its inputs, not its output, so the additions can be in place.
        return (self.project(x) @ self.embeddings.T).add_(self.token_bias).add_(self.level(x))

    def at(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """raw(x)_v at one token per row (see :meth:`VocabHead.at`)."""
        return (self.project(x) * self.embeddings[tokens]).sum(-1) + self.token_bias[tokens] + self.level(x).squeeze(-1)

    def reset(self, init_scale: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Level and token bias zero; W zero (ψ constant over tokens) or N(0, init_scale²)."""
        with torch.no_grad():
            self.level.weight.zero_()
            self.level.bias.zero_()
            self.token_bias.zero_()
            if init_scale == 0.0:
                self.project.weight.zero_()
            else:
                self.project.weight.copy_(init_scale * torch.randn(self.project.weight.shape, generator=generator))
