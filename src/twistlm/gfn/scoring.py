"""Batched scoring of every prefix of a batch of trajectories, in a constant number of forward passes.

A GFlowNet objective needs, at every state s_i of every trajectory, log-probabilities of the policy (with grad) and
rewards from the frozen base (MATH.md, "Amortized inference"). The naive way runs one forward per prefix (O(n·L)
forwards). Here, for a Hugging Face model:

1. :func:`prefix_pass` — the distinct prompts are encoded once (left-padded), their KV cache is expanded to the n
   trajectories, and **one** forward over the right-padded trajectories gives the last-layer hidden state after
   every prefix (n, L + 1, H); with grad when the model is the policy.
2. :func:`suffix_at_states` — log p0(y | x, z_1:m) for a suffix y (the observed answer or ending) at **every** state m
   in **one** more forward: the copies of y for all states of a trajectory are packed into one row and attend, through
   a 4-D attention mask, to the cached keys of x z_1:m and to their own copy of y only (positions as if each copy
   directly followed its prefix).

Other :class:`~twistlm.lm.ParticleLM` backends (the toy LM) use the generic ``prefill``/``step``/``score_tokens``
path: same numbers, more calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from twistlm.lm import HEAD_CHUNK_ELEMENTS, HFLM, ParticleLM


@dataclass
class PrefixPass:
    """Result of :func:`prefix_pass`. ``hidden[i, m]``: state after prompt + z_1:m (HF path; None otherwise).
    ``logprobs[i, m]``: log p(· | prompt, z_1:m) over the vocabulary (generic path only; HF computes it on demand)."""

    hidden: torch.Tensor | None
    logprobs: torch.Tensor | None
    backend: dict[str, Any]


def _cache(lm: HFLM):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def prefix_pass(lm: ParticleLM, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                seqs: Sequence[Sequence[int]]) -> PrefixPass:
    """Hidden states (HF) or log-probabilities (generic) after every prefix of ``seqs[i]`` given ``prompts[rows[i]]``.

    Runs with grad if grad is enabled (the caller decides: policy with grad, base without).
    """
    if isinstance(lm, HFLM):
        return _hf_prefix_pass(lm, prompts, rows, seqs)
    return _generic_prefix_pass(lm, prompts, rows, seqs)


SHARED_PREFIX_MIN = 8
"""Prompts sharing a prefix at least this long (few-shot demonstrations) encode it once for the whole batch."""


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1  # every row keeps ≥ 1 own prompt token (its last hidden state)
    c = 0
    while c < n and all(p[c] == first[c] for p in prompts):
        c += 1
    return c if c >= SHARED_PREFIX_MIN and len(prompts) > 1 else 0


def _hf_prefix_pass(lm: HFLM, prompts, rows, seqs) -> PrefixPass:
    """Layout of every row: [shared prefix][padding][rest of the prompt][z_1 … z_L][padding] with explicit positions."""
    dev, pad = lm.device, lm.eos_token_id
    c = _common_prefix(prompts)
    cache = _cache(lm)
    head_mask = torch.ones(len(prompts), c, dtype=torch.long, device=dev)
    if c:
        shared = torch.tensor([list(prompts[0][:c])], device=dev)
        lm._hidden_states(shared, None, torch.arange(c, device=dev)[None], cache)
        cache.reorder_cache(torch.zeros(len(prompts), dtype=torch.long, device=dev))
    tails = [list(p[c:]) for p in prompts]
    W = max(len(t) for t in tails)
    ids = torch.tensor([[pad] * (W - len(t)) + t for t in tails], device=dev)
    tail_mask = torch.tensor([[0] * (W - len(t)) + [1] * len(t) for t in tails], device=dev)
    mask = torch.cat([head_mask, tail_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h_prompt = lm._hidden_states(ids, mask, pos[:, c:], cache)[:, -1]  # (B, H); every tail is ≥ 1 token
    P = c + W
    index = torch.tensor(list(rows), device=dev, dtype=torch.long)
    cache.reorder_cache(index)  # (n, ...) — a differentiable gather when grad is on
    n, L = len(seqs), max((len(s) for s in seqs), default=0)
    key_mask = mask[index]
    start = key_mask.sum(-1)  # position of z_1
    hidden = h_prompt[index][:, None]
    if L > 0:
        z = torch.tensor([list(s) + [pad] * (L - len(s)) for s in seqs], device=dev)
        zmask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs], device=dev)
        key_mask = torch.cat([key_mask, zmask], dim=1)
        zpos = start[:, None] + torch.arange(L, device=dev)
        h_z = lm._hidden_states(z, key_mask, zpos, cache)
        hidden = torch.cat([hidden, h_z], dim=1)
    backend = {"cache": cache, "key_mask": key_mask, "start": start, "prompt_width": P, "n": n}
    return PrefixPass(hidden=hidden, logprobs=None, backend=backend)


def _generic_prefix_pass(lm: ParticleLM, prompts, rows, seqs) -> PrefixPass:
    L = max((len(s) for s in seqs), default=0)
    state = lm.prefill([prompts[r] for r in rows], 1)
    out = [state.logprobs]
    for j in range(L):
        tok = torch.tensor([s[j] if j < len(s) else lm.eos_token_id for s in seqs], dtype=torch.long)
        state = lm.step(state, tok)
        out.append(state.logprobs)
    backend = {"prompts": prompts, "rows": list(rows), "seqs": [list(s) for s in seqs]}
    return PrefixPass(hidden=None, logprobs=torch.stack(out, dim=1), backend=backend)


def head_logprobs(lm: ParticleLM, ppass: PrefixPass, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """log p(· | prefix) (M, V) at the (trajectory, prefix length) pairs ``(rows[k], cols[k])``."""
    if ppass.logprobs is not None:
        return ppass.logprobs[rows, cols]
    h = ppass.hidden[rows.to(ppass.hidden.device), cols.to(ppass.hidden.device)]
    return torch.log_softmax(lm._head(h).float(), dim=-1)


def gather_logprobs(lm: ParticleLM, ppass: PrefixPass, rows: torch.Tensor, cols: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[k] | prefix (rows[k], cols[k])), (M,), computing the output layer in chunks."""
    if rows.numel() == 0:
        return torch.zeros(0)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // max(lm.vocab_size, 1))
    out = []
    for k in range(0, rows.numel(), chunk):
        lp = head_logprobs(lm, ppass, rows[k : k + chunk], cols[k : k + chunk])
        out.append(lp.gather(1, targets[k : k + chunk, None].to(lp.device)).squeeze(1))
    return torch.cat(out).cpu()


def stop_logprobs(lm: ParticleLM, ppass: PrefixPass, rows: torch.Tensor, cols: torch.Tensor,
                  stop_ids: Sequence[int]) -> torch.Tensor:
    """log Σ_{v ∈ stop_ids} p(v | prefix) at each (rows[k], cols[k]), (M,)."""
    if rows.numel() == 0:
        return torch.zeros(0)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // max(lm.vocab_size, 1))
    out = []
    for k in range(0, rows.numel(), chunk):
        lp = head_logprobs(lm, ppass, rows[k : k + chunk], cols[k : k + chunk])
        out.append(torch.logsumexp(lp[:, stops.to(lp.device)], dim=-1))
    return torch.cat(out).cpu()


def suffix_at_states(lm: ParticleLM, ppass: PrefixPass, states: Sequence[Sequence[int]],
                     suffixes: Sequence[Sequence[int]]) -> torch.Tensor:
    """log p(suffixes[i] | prompt, z_1:m) for every state length m in ``states[i]``; (n, S) float64, 0-padded."""
    n, S = len(states), max(len(s) for s in states)
    out = torch.zeros(n, S, dtype=torch.float64)
    if isinstance(lm, HFLM):
        return _hf_suffix(lm, ppass, states, suffixes, out)
    b = ppass.backend
    for i, (st, y) in enumerate(zip(states, suffixes)):
        for a, m in enumerate(st):
            prefix = list(b["prompts"][b["rows"][i]]) + b["seqs"][i][:m]
            state = lm.prefill([prefix], 1)
            out[i, a] = lm.score_tokens(state, [list(y)], [0])[0]
    return out


@torch.no_grad()
def _hf_suffix(lm: HFLM, ppass: PrefixPass, states, suffixes, out: torch.Tensor) -> torch.Tensor:
    dev = lm.device
    b = ppass.backend
    n = b["n"]
    # First suffix token: predicted by the hidden state after each prefix (already computed).
    first_rows = [i for i, st in enumerate(states) for _ in st if len(suffixes[i]) > 0]
    first_cols = [m for i, st in enumerate(states) for m in st if len(suffixes[i]) > 0]
    first_tok = [suffixes[i][0] for i, st in enumerate(states) for _ in st if len(suffixes[i]) > 0]
    if first_rows:
        lp = gather_logprobs(lm, ppass, torch.tensor(first_rows), torch.tensor(first_cols), torch.tensor(first_tok))
        flat = [(i, a) for i, st in enumerate(states) for a in range(len(st)) if len(suffixes[i]) > 0]
        for (i, a), v in zip(flat, lp.tolist()):
            out[i, a] += v
    # The rest: one packed forward. Row i holds, for each state a, the tokens y_0 … y_{|y|-2} (they predict y_1 …).
    feed = [len(y) - 1 for y in suffixes]
    Q = max((len(st) * max(f, 0) for st, f in zip(states, feed)), default=0)
    if Q == 0:
        return out
    key_mask = b["key_mask"].bool()  # (n, K0): prompt (left-padded) + z (right-padded)
    K0 = key_mask.shape[1]
    P = b["prompt_width"]
    pad = lm.eos_token_id
    ids = torch.full((n, Q), pad, dtype=torch.long)
    pos = torch.zeros(n, Q, dtype=torch.long)
    mask = torch.zeros(n, 1, Q, K0 + Q, dtype=torch.bool)
    picks = []  # (row, query column, target token, state a)
    start = b["start"].cpu()
    for i, (st, y) in enumerate(zip(states, suffixes)):
        f = feed[i]
        if f <= 0:
            continue
        for a, m in enumerate(st):
            c0 = a * f
            visible = key_mask[i].clone()
            visible[P + m :] = False  # prefix z_1:m only
            for j in range(f):
                c = c0 + j
                ids[i, c] = y[j]
                pos[i, c] = int(start[i]) + m + j
                mask[i, 0, c, :K0] = visible.cpu()
                mask[i, 0, c, K0 + c0 : K0 + c + 1] = True
                picks.append((i, c, y[j + 1], a))
    for i in range(n):  # padded query columns attend to themselves (keeps softmax defined; never read)
        used = len(states[i]) * max(feed[i], 0)
        for c in range(used, Q):
            mask[i, 0, c, K0 + c] = True
    cache = b["cache"]
    h = lm._hidden_states(ids.to(dev), mask.to(dev), pos.to(dev), cache)  # appends Q keys to the cache (discarded)
    _crop(cache, K0)
    rows_t = torch.tensor([p[0] for p in picks], device=dev)
    cols_t = torch.tensor([p[1] for p in picks], device=dev)
    targets = torch.tensor([p[2] for p in picks], device=dev)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // lm.vocab_size)
    vals = []
    for k in range(0, len(picks), chunk):
        hs = h[rows_t[k : k + chunk], cols_t[k : k + chunk]]
        lp = torch.log_softmax(lm._head(hs).float(), dim=-1)
        vals.append(lp.gather(1, targets[k : k + chunk, None]).squeeze(1))
    vals = torch.cat(vals).to("cpu", torch.float64)
    index = torch.tensor([p[0] * out.shape[1] + p[3] for p in picks])
    out.view(-1).index_add_(0, index, vals)
    return out


def _crop(cache: Any, length: int) -> None:
    """Drop cached positions ≥ ``length`` (the packed suffix keys), so the cache can be reused."""
    extra = int(cache.get_seq_length()) - length
    if extra > 0:
        cache.crop(-extra)  # transformers ≥ 5 takes the number of positions to drop, as a negative count
