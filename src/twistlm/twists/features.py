"""Base-model features of every prefix of stored sequences, for training twists with gradients.

Samplers run under ``torch.inference_mode`` and keep nothing for autograd. Twist losses (MATH.md, "Twist losses")
need log ψ_t(s_1:t) for **every** prefix of stored sequences, with gradients for the twist's parameters. The base
model is frozen, so its part is computed once, without grad:

    hidden[n, t−1] = h_t(s_<t)            (N, T, H)  the base LM's last hidden state before token t
    logp0[n, t−1]  = log p0(· | s_<t)      (N, T, V)
    mask[n, t−1]   = t ≤ len(s^n)          (N, T)     step t was taken (the particle had not finished before t)

For a Hugging Face model this is one forward pass over s_1..s_T−1 on top of the prompts' KV cache, each distinct
prompt prefilled once and shared by the sequences that continue it (prompts left-padded, explicit positions, exactly
as :class:`~twistlm.lm.HFLM` does incrementally; :func:`hf_shared_prompt_hidden`), or over [prompt; s_1..s_T−1] when
every sequence has its own prompt; for any other :class:`ParticleLM` (the toy LM)
it steps through the sequences with ``prefill`` / ``step``. Then :func:`prefix_log_psi` applies a twist head to all
prefixes *with* grad: heads over the hidden state do it in one call (``log_psi_prefixes``), any other twist is called
step by step through its ordinary ``log_psi(TwistContext)``, so every :class:`Twist` can be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from twistlm.errors import ConfigError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.base import Twist, TwistContext

LOGITS_CHUNK = 4096
"""Rows of hidden states pushed through the base LM's output layer at once (bounds the (rows, V) logits buffer)."""


@dataclass
class PrefixFeatures:
    """Base-LM features before each generated token of N stored sequences (T = max_new_tokens).

    hidden: (N, T, H) h_t(s_<t). logp0: (N, T, V) log p0(· | s_<t). mask: (N, T) bool, step t taken.
    tokens: (N, T) the generated tokens s_t (pad = EOS after the end). lengths: (N,) len(s^n), the finishing step.
    prompt_index: (N,) which prompt each sequence continues. prompt_ids: the prompts' token ids (indexed by it).
    Unpacks as ``hidden, logp0, mask = prefix_features(...)``.
    """

    hidden: torch.Tensor
    logp0: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_index: torch.Tensor
    prompt_ids: list[list[int]]
    pad_id: int

    def __iter__(self):
        return iter((self.hidden, self.logp0, self.mask))

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.tokens.shape[1]

    def select(self, rows: torch.Tensor | slice) -> PrefixFeatures:
        """The features of a subset of rows."""
        return PrefixFeatures(
            self.hidden[rows],
            self.logp0[rows],
            self.mask[rows],
            self.tokens[rows],
            self.lengths[rows],
            self.prompt_index[rows],
            self.prompt_ids,
            self.pad_id,
        )


def pad_sequences(sequences: Sequence[Sequence[int]], T: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) tokens padded with ``pad`` and (N,) lengths; every sequence must have 1..T tokens."""
    tokens = torch.full((len(sequences), T), pad, dtype=torch.long)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    for n, seq in enumerate(sequences):
        seq = list(seq)
        if not 1 <= len(seq) <= T:
            raise ConfigError(f"sequence {n} has {len(seq)} tokens; expected 1..{T}")
        tokens[n, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[n] = len(seq)
    return tokens, lengths


def hf_prefix_inputs(prompt_rows: Sequence[Sequence[int]], tokens: torch.Tensor, pad: int, device: Any = None):
    """Inputs [left-padded prompt; s_1..s_T−1] for one causal forward, and the column of h_1 (state before s_1).

    Returns (input_ids, attention_mask, position_ids, start): ``hidden[:, start + t − 1]`` is h_t(s_<t).
    """
    T = tokens.shape[1]
    lengths = [len(p) for p in prompt_rows]
    width = max(lengths)
    prompt = torch.tensor([[pad] * (width - n) + list(p) for p, n in zip(prompt_rows, lengths)], dtype=torch.long)
    ids = torch.cat([prompt, tokens[:, : T - 1]], dim=1)
    mask = torch.cat(
        [
            torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long),
            torch.ones(len(lengths), T - 1, dtype=torch.long),
        ],
        dim=1,
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), width - 1


def hf_prefix_hidden(backbone: Any, prompt_rows, tokens: torch.Tensor, pad: int, device: Any) -> torch.Tensor:
    """(N, T, H) last hidden states h_t(s_<t) of a Hugging Face backbone, from one forward pass (grad as enabled)."""
    ids, mask, positions, start = hf_prefix_inputs(prompt_rows, tokens, pad, device)
    padded = bool((mask == 0).any())
    out = backbone(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, start : start + tokens.shape[1]]


def hf_shared_prompt_hidden(lm: HFLM, prompt_ids, prompt_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, H) h_t(s_<t) as :func:`hf_prefix_hidden` gives them, with each distinct prompt encoded **once**: the
    prompts are prefilled as the sampler does (:meth:`HFLM.prefill`), their KV cache expanded to the N rows, and
    s_1..s_T−1 of all rows run in one forward on top of it. With K sequences per prompt of P tokens this costs
    P + K·T positions per prompt instead of K·(P + T). Frozen model: no grad (the result is a normal tensor)."""
    with torch.inference_mode():
        unique, rows = torch.unique(prompt_index, return_inverse=True)
        state = lm.reorder(lm.prefill([prompt_ids[u] for u in unique.tolist()], 1), rows)
        hidden = state.hidden.unsqueeze(1)
        T = tokens.shape[1]
        if T > 1:
            backend = state.backend
            mask = backend["mask"]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], T - 1)], dim=1)
            positions = backend["next_pos"].unsqueeze(1) + torch.arange(T - 1, device=lm.device)
            rest = lm._hidden_states(tokens[:, : T - 1].to(lm.device), mask, positions, backend["cache"])
            hidden = torch.cat([hidden, rest.to(hidden.dtype)], dim=1)
    return hidden.clone()  # outside inference mode: a normal tensor, usable as the input of a head with grad


def _hf_features(lm: HFLM, prompt_ids, prompt_index: torch.Tensor, tokens):
    if len(torch.unique(prompt_index)) < len(prompt_index):  # prompts shared by several rows: encode each once
        hidden = hf_shared_prompt_hidden(lm, prompt_ids, prompt_index, tokens)
    else:
        prompt_rows = [prompt_ids[b] for b in prompt_index.tolist()]
        hidden = hf_prefix_hidden(lm._backbone, prompt_rows, tokens, lm.eos_token_id, lm.device)
    N, T, H = hidden.shape
    flat = hidden.reshape(N * T, H)
    logp0 = torch.cat(
        [torch.log_softmax(lm._head(flat[i : i + LOGITS_CHUNK]).float(), dim=-1) for i in range(0, N * T, LOGITS_CHUNK)]
    )
    return hidden.float(), logp0.view(N, T, -1)


def _stepwise_features(lm: ParticleLM, prompt_ids, prompt_index, tokens):
    state = lm.prefill(prompt_ids, 1)
    state = lm.reorder(state, prompt_index.to(lm.device) if lm.device.type != "cpu" else prompt_index)
    hidden, logp0 = [], []
    T = tokens.shape[1]
    for t in range(1, T + 1):
        hidden.append(state.hidden.clone())
        logp0.append(state.logprobs.clone())
        if t < T:
            state = lm.step(state, tokens[:, t - 1].to(lm.device))
    return torch.stack(hidden, dim=1), torch.stack(logp0, dim=1)


def prefix_features(
    lm: ParticleLM,
    prompt_ids: Sequence[Sequence[int]],
    sequences: Sequence[Sequence[int]],
    *,
    prompt_index: Sequence[int] | torch.Tensor | None = None,
    max_new_tokens: int | None = None,
) -> PrefixFeatures:
    """Features of the base LM before each token of ``sequences`` (see the module docstring); no grad.

    prompt_ids: the prompts' token ids; ``prompt_index[n]`` says which one sequence n continues (default: one prompt
    per sequence, in order). sequences: generated token ids, as the samplers return them (a finishing stop token
    included). max_new_tokens: T (default: the longest sequence).
    """
    prompt_ids = [list(p) for p in prompt_ids]
    if prompt_index is None:
        if len(prompt_ids) != len(sequences):
            raise ConfigError(f"{len(sequences)} sequences but {len(prompt_ids)} prompts: pass prompt_index=")
        prompt_index = list(range(len(sequences)))
    prompt_index = torch.as_tensor(prompt_index, dtype=torch.long).cpu()
    if prompt_index.numel() != len(sequences):
        raise ConfigError(f"prompt_index has {prompt_index.numel()} entries for {len(sequences)} sequences")
    if len(sequences) == 0:
        raise ConfigError("prefix_features needs at least one sequence")
    if int(prompt_index.max()) >= len(prompt_ids) or int(prompt_index.min()) < 0:
        raise ConfigError(f"prompt_index out of range for {len(prompt_ids)} prompts")
    T = max_new_tokens if max_new_tokens is not None else max(len(s) for s in sequences)
    pad = lm.eos_token_id
    tokens, lengths = pad_sequences(sequences, T, pad)
    mask = torch.arange(1, T + 1).unsqueeze(0) <= lengths.unsqueeze(1)
    with torch.no_grad():
        if isinstance(lm, HFLM):
            hidden, logp0 = _hf_features(lm, prompt_ids, prompt_index, tokens)
        else:
            hidden, logp0 = _stepwise_features(lm, prompt_ids, prompt_index, tokens)
    return PrefixFeatures(hidden, logp0, mask, tokens, lengths, prompt_index, prompt_ids, pad)


def prefix_log_psi(twist: Twist, feats: PrefixFeatures) -> torch.Tensor:
    """(N, T, V) log ψ_t(s_<t, ·) at every step of the stored sequences, with grad for the twist's parameters.

    Uses the twist's ``log_psi_prefixes(feats)`` when it has one (one batched call); otherwise calls ``log_psi``
    with the :class:`TwistContext` a sampler would build at each step t = 1..T.
    """
    fn = getattr(twist, "log_psi_prefixes", None)
    if callable(fn):
        return fn(feats)
    T = feats.max_new_tokens
    out = [
        twist.log_psi(TwistContext(feats.hidden[:, t - 1], feats.tokens[:, : t - 1], t, T, feats.prompt_index))
        for t in range(1, T + 1)
    ]
    return torch.stack(out, dim=1)


def log_psi_at_tokens(
    twist: Twist, hidden: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """(N, T) log ψ_t(s_<t, s_t) at the stored tokens only, with grad — what off-policy losses need.

    hidden (N, T, H) = h_t(s_<t), tokens (N, T), prompt_index (N,), lengths (N,). Heads that can score one token per
    row (``log_psi_tokens``) never build the (N, T, V) output; any other twist is evaluated over the vocabulary by
    :func:`prefix_log_psi` and gathered.
    """
    fn = getattr(twist, "log_psi_tokens", None)
    if callable(fn):
        return fn(hidden, tokens, prompt_index)
    N, T = tokens.shape
    mask = torch.arange(1, T + 1).unsqueeze(0) <= lengths.cpu().unsqueeze(1)
    feats = PrefixFeatures(hidden, hidden.new_empty(N, T, 0), mask, tokens, lengths, prompt_index, [], -1)
    full = prefix_log_psi(twist, feats)
    return full.gather(-1, tokens.to(full.device).unsqueeze(-1)).squeeze(-1)
