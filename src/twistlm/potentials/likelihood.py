"""Potentials that are likelihoods under the base model p0 itself: infilling and tempering.

* :class:`InfillingPotential` — φ(s) = p0(o | x, s) for observed tokens o that must follow the generated span s:
  log φ = Σ_j log p0(o_j | x, s, o_<j). σ(s) ∝ p0(s | x) p0(o | x, s) is the posterior over the middle given the
  ending (MATH.md, "Infilling"). p0(o | …) ≤ 1, so it is bounded. o is given once (text or token ids) or per prompt
  as ``extras["observation"]`` on the target. A text o is tokenized on its own (no special tokens) and scored as that
  token sequence; give token ids when the exact tokenization of the seam matters. For the BDMC check (sample T + c
  tokens from p0, call the last c tokens o) use a target with ``stop_at_eos=False`` so every s has exactly T tokens.
* :class:`TemperedPotential` — φ(s) = p0(s | x)^(1/τ − 1), so σ ∝ p0^(1/τ) (MATH.md, "Tempered target"). Bounded
  iff τ ≤ 1. A sampler already knows log p0(s | x) (it sums it while proposing); the current Sequences/Target API
  does not hand it to potentials, so this potential recomputes it by scoring. A future API could pass log p0
  directly and make this free.

Scoring (:class:`ContinuationScorer`, :func:`score_continuations`) computes Σ_{j ≥ a} log p0(c_j | x, c_<j) for many
continuations c of a prompt x:

* Hugging Face models (:class:`~twistlm.lm.HFLM`): the prompt's KV cache, and its next-token distribution
  p0(· | x), are computed **once per distinct prompt** with ``lm.prefill`` and kept on the scorer (a small LRU keyed
  by the prompt's token ids), so later calls never re-encode the prompt. Each call copies that cache, expands it to
  the batch with ``cache.reorder_cache(index)`` (transformers' DynamicCache), and runs **one** backbone forward over
  the right-padded continuations of all sequences of that prompt (attention mask over prompt + continuation, position
  ids continuing after the prompt); the output projection and log-softmax are applied only at the positions that are
  scored (for infilling: the o tokens, not the s tokens), in chunks. What is *not* reused: the particles' own KV
  caches for s — the sampler does not hand its LM state to potentials — so the s tokens are re-encoded once per
  finished sequence (one batched forward per distinct prompt among the sequences), and nothing is shared between the
  sequences beyond the prompt (e.g. common prefixes of s).
* Any other :class:`~twistlm.lm.ParticleLM` (the toy LM): a generic slow path through the public interface,
  ``prefill`` of the prompt for all rows, then one ``step`` per continuation position (exact; used by the tests).

Prompt ids: a target hands the potential the exact prompt ids it sampled from (``Sequences.prompt_ids``, chat
template included); ``extras["prompt_ids"]`` overrides them. Only a hand-built batch without either falls back to
re-encoding the prompt text with ``lm.encode`` (exact for plain-text prompts, not for chat prompts).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from twistlm.errors import ConfigError, PotentialError
from twistlm.lm import HFLM, ParticleLM
from twistlm.potentials.base import Potential, Sequences

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Positions are pushed through the output projection in chunks of at most this many logits (≈ 64 MB in fp32)."""

PROMPT_IDS_KEY = "prompt_ids"
OBSERVATION_KEY = "observation"


class ContinuationScorer:
    """Σ_{j ≥ start} log p0(c_j | x, c_<j) for batches of continuations c, grouped by prompt x (module docstring).

    batch_size: sequences per forward pass. cache_size: how many distinct prompts keep their KV cache.
    """

    def __init__(self, lm: ParticleLM, batch_size: int = 64, cache_size: int = 16):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.lm = lm
        self.batch_size = batch_size
        self.cache_size = max(0, int(cache_size))
        self._prefixes: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor, int]] = OrderedDict()
        self.prefills = 0
        """How many prompts have been encoded (for tests: one per distinct prompt while the LRU holds them)."""

    def __call__(
        self,
        prompt_ids: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(N,) float64 log-probabilities; sequence i pairs ``prompt_ids[i]`` with ``continuations[i]``."""
        n = len(continuations)
        if len(prompt_ids) != n:
            raise ConfigError(f"{len(prompt_ids)} prompts for {n} continuations")
        starts = [0] * n if starts is None else [int(a) for a in starts]
        conts = [[int(t) for t in c] for c in continuations]
        total = torch.zeros(n, dtype=torch.float64)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompt_ids):
            groups.setdefault(tuple(int(t) for t in p), []).append(i)
        for key, rows in groups.items():
            for k in range(0, len(rows), self.batch_size):
                chunk = rows[k : k + self.batch_size]
                c, a = [conts[i] for i in chunk], [starts[i] for i in chunk]
                if all(len(ci) <= ai for ci, ai in zip(c, a)):
                    continue  # nothing to score
                if isinstance(self.lm, HFLM):
                    values = self._hf_score(key, c, a)
                else:
                    values = self._stepwise_score(key, c, a)
                total[chunk] = values
        return total

    # ----- Hugging Face fast path -----

    def _prefix(self, key: tuple[int, ...]) -> tuple[Any, torch.Tensor, int]:
        """(KV cache of the prompt, log p0(· | x), prompt length), computed once per prompt."""
        hit = self._prefixes.get(key)
        if hit is not None:
            self._prefixes.move_to_end(key)
            return hit
        state = self.lm.prefill([list(key)], 1)
        self.prefills += 1
        entry = (state.backend["cache"], state.logprobs[0], int(state.backend["next_pos"][0]))
        if self.cache_size:
            self._prefixes[key] = entry
            while len(self._prefixes) > self.cache_size:
                self._prefixes.popitem(last=False)
        return entry

    @torch.inference_mode()
    def _hf_score(self, key: tuple[int, ...], conts: list[list[int]], starts: list[int]) -> torch.Tensor:
        lm: HFLM = self.lm  # type: ignore[assignment]
        cache0, first_logprobs, plen = self._prefix(key)
        n, dev = len(conts), lm.device
        total = torch.zeros(n, dtype=torch.float64)
        for i, (c, a) in enumerate(zip(conts, starts)):
            if a <= 0 < len(c):  # c_0 is predicted by the prompt's last position
                total[i] += float(first_logprobs[c[0]])
        inputs = [c[:-1] for c in conts]  # the last token is only predicted, never fed
        width = max(len(x) for x in inputs)
        if width == 0:
            return total
        pad = lm.eos_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=dev)
        cont_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], device=dev)
        mask = torch.cat([cont_mask.new_ones(n, plen), cont_mask], dim=1)
        positions = (plen + torch.arange(width, device=dev)).expand(n, width)
        cache = copy.deepcopy(cache0)  # reorder_cache and the forward update the cache in place
        cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=dev))
        out = lm._backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{lm._cache_kwarg: cache},
        )
        hidden = out.last_hidden_state  # (n, width, H); position j predicts c_{j+1}
        rows, cols, targets = [], [], []
        for i, (c, a) in enumerate(zip(conts, starts)):
            for j in range(max(a, 1), len(c)):
                rows.append(i)
                cols.append(j - 1)
                targets.append(c[j])
        if not rows:
            return total
        rows_t = torch.tensor(rows, device=dev)
        picked = hidden[rows_t, torch.tensor(cols, device=dev)]  # (M, H)
        target_t = torch.tensor(targets, device=dev)
        step = max(1, HEAD_CHUNK_ELEMENTS // lm.vocab_size)
        logps = []
        for k in range(0, picked.shape[0], step):
            logits = lm._head(picked[k : k + step]).float()
            logps.append(torch.log_softmax(logits, dim=-1).gather(1, target_t[k : k + step, None]).squeeze(1))
        total.index_add_(0, rows_t.cpu(), torch.cat(logps).double().cpu())
        return total

    # ----- generic path (any ParticleLM) -----

    @torch.inference_mode()
    def _stepwise_score(self, key: tuple[int, ...], conts: list[list[int]], starts: list[int]) -> torch.Tensor:
        lm = self.lm
        n = len(conts)
        length = max(len(c) for c in conts)
        lengths = torch.tensor([len(c) for c in conts])
        begin = torch.tensor(starts)
        total = torch.zeros(n, dtype=torch.float64)
        state = lm.prefill([list(key)], n)
        self.prefills += 1
        for j in range(length):
            tok = torch.tensor([c[j] if j < len(c) else lm.eos_token_id for c in conts], dtype=torch.long)
            lp = state.logprobs.to(torch.float64).gather(1, tok.to(state.logprobs.device)[:, None]).squeeze(1).cpu()
            take = (j < lengths) & (j >= begin)
            total += torch.where(take, lp, torch.zeros_like(lp))
            if j + 1 < length:
                state = lm.step(state, tok)
        return total


def score_continuations(
    lm: ParticleLM,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    start: int | Sequence[int] = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Σ_{j ≥ start} log p0(c_j | x, c_<j) for each continuation c of one prompt x, as a (N,) float64 tensor."""
    starts = [start] * len(continuations) if isinstance(start, int) else list(start)
    scorer = ContinuationScorer(lm, batch_size=batch_size, cache_size=0)
    return scorer([prompt_ids] * len(continuations), continuations, starts)


class _LMPotential(Potential):
    """Shared plumbing: prompt ids of each sequence, and a scorer that keeps prompt caches."""

    bounded = True

    def __init__(self, lm: ParticleLM, batch_size: int, cache_size: int):
        if not isinstance(lm, ParticleLM):
            raise ConfigError(f"{type(self).__name__} needs a twistlm ParticleLM (e.g. twistlm.load_lm()), got {lm!r}")
        self.lm = lm
        self.scorer = ContinuationScorer(lm, batch_size=batch_size, cache_size=cache_size)
        self._encoded: dict[str, tuple[int, ...]] = {}

    def prompt_ids(self, seqs: Sequences) -> list[tuple[int, ...]]:
        given = seqs.extras.get(PROMPT_IDS_KEY) or seqs.prompt_ids
        if given:
            return [tuple(int(t) for t in ids) for ids in given]
        out = []
        for text in seqs.prompts:
            if text not in self._encoded:
                self._encoded[text] = tuple(self.lm.encode(text))
            out.append(self._encoded[text])
        return out


class InfillingPotential(_LMPotential):
    """φ(s) = p0(o | x, s): the base model's probability of the observed ending o after the generated span s.

    observation: text or token ids, the same for every prompt; None reads ``extras["observation"]`` (one per
    prompt, text or ids). Bounded (φ ≤ 1). See the module docstring for what is computed once and what per call.
    """

    def __init__(
        self,
        lm: ParticleLM,
        observation: str | Sequence[int] | None = None,
        batch_size: int = 64,
        cache_size: int = 16,
    ):
        super().__init__(lm, batch_size, cache_size)
        self.observation = None if observation is None else self._observation_ids(observation)
        self.name = "infilling"

    def _observation_ids(self, obs: object) -> tuple[int, ...]:
        if isinstance(obs, str):
            tokenizer = getattr(self.lm, "tokenizer", None)
            if tokenizer is not None:
                return tuple(tokenizer(obs, add_special_tokens=False)["input_ids"])
            return tuple(self.lm.encode(obs))
        try:
            ids = tuple(int(t) for t in obs)  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise PotentialError(
                f"potential {self.name!r}: an observation must be text or token ids, got {obs!r}"
            ) from exc
        bad = [t for t in ids if not 0 <= t < self.lm.vocab_size]
        if bad:
            raise PotentialError(f"potential 'infilling': observation token ids {bad} outside the vocabulary")
        return ids

    def observations(self, seqs: Sequences) -> list[tuple[int, ...]]:
        if self.observation is not None:
            return [self.observation] * len(seqs)
        given = seqs.extras.get(OBSERVATION_KEY)
        if given is None:
            raise PotentialError(
                "potential 'infilling' has no observation: pass observation= or extras={'observation': [...]}"
            )
        cache: dict[Any, tuple[int, ...]] = {}
        out = []
        for obs in given:
            k = obs if isinstance(obs, str) else tuple(obs)
            if k not in cache:
                cache[k] = self._observation_ids(obs)
            out.append(cache[k])
        return out

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        obs = self.observations(seqs)
        conts = [list(s) + list(o) for s, o in zip(seqs.token_ids, obs)]
        starts = [len(s) for s in seqs.token_ids]
        return self.scorer(self.prompt_ids(seqs), conts, starts)


class TemperedPotential(_LMPotential):
    """φ(s) = p0(s | x)^(1/τ − 1), so that σ ∝ p0^(1/τ). Bounded iff τ ≤ 1.

    log p0(s | x) must match the sampler's, which includes the EOS that finished s — but potentials see s with that
    EOS dropped. Give the target's ``max_new_tokens`` (T) and any extra ``stop_token_ids`` to restore it: a completion
    shorter than T that does not end in one of those stop tokens was finished by EOS, and EOS is scored after it.
    Without ``max_new_tokens`` EOS is never scored, i.e. the final p0(EOS | x, s) factor is left untempered.
    """

    def __init__(
        self,
        lm: ParticleLM,
        tau: float,
        max_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
        batch_size: int = 64,
        cache_size: int = 16,
    ):
        super().__init__(lm, batch_size, cache_size)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ConfigError(f"temperature τ must be a positive number, got {tau!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.tau = float(tau)
        self.exponent = 1.0 / self.tau - 1.0
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.bounded = self.tau <= 1.0
        self.name = f"tempered:{self.tau:g}"

    def _with_eos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        T = self.max_new_tokens
        if T is not None and len(ids) < T and not (ids and ids[-1] in self.stop_token_ids):
            ids.append(self.lm.eos_token_id)
        return ids

    def log_p0(self, seqs: Sequences) -> torch.Tensor:
        """log p0(s | x) of each completion (with its finishing EOS when ``max_new_tokens`` is given)."""
        return self.scorer(self.prompt_ids(seqs), [self._with_eos(s) for s in seqs.token_ids])

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        if self.exponent == 0.0:
            return torch.zeros(len(seqs), dtype=torch.float64)
        return self.exponent * self.log_p0(seqs)
