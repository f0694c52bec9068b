"""A tiny seeded language model whose sequences can be enumerated, for exactness tests.

Tokens are letters ``a``, ``b``, … plus EOS; text is the string of letters. p0 is a small random recurrent network:
h_t = tanh(W h_{t−1} + E[s_t]), log p0(· | s_≤t) = log_softmax(U h_t + c). It depends on the whole prefix (not only
the last token), so optimal twists are non-trivial, and with vocabularies of 4–8 tokens and T ≤ 4 every sequence
can be listed (see :mod:`twistlm.exact`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

from twistlm.errors import TwistLMError
from twistlm.lm import LMState, ParticleLM, Prompt

EOS_NAME = "<eos>"
LOGIT_SCALE = 1.5
"""Spread of the random logits: large enough that p0 is far from uniform, small enough that no sequence is negligible."""


class ToyLM(ParticleLM):
    """Random recurrent toy LM with the :class:`ParticleLM` interface (EOS is the last token id)."""

    name = "toy"

    def __init__(self, vocab_size: int = 6, hidden_size: int = 8, seed: int = 0, eos_bias: float = 0.0):
        if not 2 <= vocab_size <= len(string.ascii_lowercase) + 1:
            raise TwistLMError(f"toy vocab_size must be in [2, 27], got {vocab_size}")
        g = torch.Generator().manual_seed(seed)
        self._vocab = vocab_size
        self._hidden = hidden_size
        self.embed = torch.randn(vocab_size, hidden_size, generator=g, dtype=torch.float64)
        self.recur = torch.randn(hidden_size, hidden_size, generator=g, dtype=torch.float64) / hidden_size**0.5
        self.out = LOGIT_SCALE * torch.randn(hidden_size, vocab_size, generator=g, dtype=torch.float64)
        self.bias = torch.zeros(vocab_size, dtype=torch.float64)
        self.bias[self.eos_token_id] = eos_bias
        self.letters = list(string.ascii_lowercase[: vocab_size - 1])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_id(self) -> int:
        return self._vocab - 1

    @property
    def hidden_size(self) -> int:
        return self._hidden

    def encode(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise TwistLMError("the toy LM takes plain-text prompts of letters")
        try:
            return [self.letters.index(c) for c in prompt]
        except ValueError as exc:
            raise TwistLMError(f"toy prompt {prompt!r} uses letters outside {''.join(self.letters)}") from exc

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.letters[i] for i in token_ids if i != self.eos_token_id)

    def _advance(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.recur + self.embed[tokens])

    def _state(self, h: torch.Tensor) -> LMState:
        logprobs = torch.log_softmax(h @ self.out + self.bias, dim=-1)
        # float64 so that exactness tests (Ẑ = Z with optimal twists) hold to float precision.
        return LMState(logprobs=logprobs, hidden=h, backend={"h": h})

    def prefill(self, prompt_ids: Sequence[Sequence[int]], num_particles: int) -> LMState:
        rows = []
        for ids in prompt_ids:
            h = torch.zeros(self._hidden, dtype=torch.float64)
            for tok in ids:
                h = self._advance(h, torch.tensor(tok))
            rows.append(h)
        h = torch.stack(rows).repeat_interleave(num_particles, dim=0)
        return self._state(h)

    def step(self, state: LMState, tokens: torch.Tensor) -> LMState:
        return self._state(self._advance(state.backend["h"], tokens.long()))

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        return self._state(state.backend["h"][index])
