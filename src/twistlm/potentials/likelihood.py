"""Potentials that are likelihoods under the base model p0 itself: infilling and tempering.

* :class:`InfillingPotential` — φ(s) = p0(o | x, s) for observed tokens o that must follow the generated span s:
  log φ = Σ_j log p0(o_j | x, s, o_<j). σ(s) ∝ p0(s | x) p0(o | x, s) is the posterior over the middle given the
  ending (MATH.md, "Infilling"). p0(o | …) ≤ 1, so it is bounded. o is given once (text or token ids) or per prompt
  as ``extras["observation"]`` on the target. A text o is tokenized on its own (no special tokens) and scored as that
  token sequence; give token ids when the exact tokenization of the seam matters. For the BDMC check (sample T + c
  tokens from p0, call the last c tokens o) use a target with ``stop_at_eos=False`` so every s has exactly T tokens.
* :class:`TemperedPotential` — φ(s) = p0(s | x)^(1/τ − 1), so σ ∝ p0^(1/τ) (MATH.md, "Tempered target"). Bounded
  iff τ ≤ 1. Inside a sampler it reads log p0(s | x) from ``Sequences.log_p0`` (the sampler sums it while proposing,
  finishing EOS included): no recomputation. A hand-built batch is scored anew.

What is computed where:

* From a sampler (``Sequences.lm_state`` set): the infilling potential copies the finishing particles' own KV cache
  rows (``lm.fork``), which already hold x + s (all but the finishing token), and runs **one** forward over
  [unfed finishing token] + o for all of them (``lm.score_tokens``). Neither the prompt nor s is re-encoded.
* A hand-built batch (:class:`ContinuationScorer`, :func:`score_continuations`): Σ_{j ≥ a} log p0(c_j | x, c_<j) for
  many continuations c of a prompt x. The prompt's state is computed **once per distinct prompt** with
  ``lm.prefill`` and kept in a small LRU keyed by its token ids; each call forks it to the batch and scores all
  continuations of that prompt in one pass (Hugging Face models; the toy LM steps token by token). The output
  projection is applied only at scored positions, in chunks.

Prompt ids: a target hands the potential the exact prompt ids it sampled from (``Sequences.prompt_ids``, chat
template included); ``extras["prompt_ids"]`` overrides them. Only a hand-built batch without either falls back to
re-encoding the prompt text with ``lm.encode`` (exact for plain-text prompts, not for chat prompts).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from twistlm.errors import ConfigError, PotentialError
from twistlm.lm import LMState, ParticleLM
from twistlm.potentials.base import Potential, Sequences

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
        self._prefixes: OrderedDict[tuple[int, ...], LMState] = OrderedDict()
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
                state = self.lm.fork(self._prefix(key), torch.zeros(len(chunk), dtype=torch.long))
                total[chunk] = self.lm.score_tokens(state, c, a)
        return total

    def _prefix(self, key: tuple[int, ...]) -> LMState:
        """The LM state after the prompt (one row), computed once per prompt while the LRU holds it."""
        hit = self._prefixes.get(key)
        if hit is not None:
            self._prefixes.move_to_end(key)
            return hit
        state = self.lm.prefill([list(key)], 1)
        self.prefills += 1
        if self.cache_size:
            self._prefixes[key] = state
            while len(self._prefixes) > self.cache_size:
                self._prefixes.popitem(last=False)
        return state


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
        self.observation = None if observation is None else self.observation_ids(observation)
        self.name = "infilling"

    def observation_ids(self, obs: object) -> tuple[int, ...]:
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
                cache[k] = self.observation_ids(obs)
            out.append(cache[k])
        return out

    def check_context(self, seqs: Sequences, obs: Sequence[Sequence[int]]) -> None:
        """Prompt + s + o must fit the model's context (tasks check this before sampling; this is the safety net)."""
        limit = self.lm.max_length
        if limit is None:
            return
        for p, s, o in zip(self.prompt_ids(seqs), seqs.token_ids, obs):
            if len(p) + len(s) + len(o) > limit:
                raise PotentialError(
                    f"potential 'infilling': prompt of {len(p)} tokens + completion of {len(s)} + observation of "
                    f"{len(o)} exceeds the model's context of {limit} tokens"
                )

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        obs = self.observations(seqs)
        self.check_context(seqs, obs)
        if seqs.lm_state is not None and seqs.state_rows is not None:
            # From a sampler: extend copies of the particles' own KV caches by the unfed token(s) and o.
            state = self.lm.fork(seqs.lm_state, seqs.state_rows)
            feeds = [list(u) + list(o) for u, o in zip(seqs.unfed, obs)]
            return self.lm.score_tokens(state, feeds, [len(u) for u in seqs.unfed])
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
        """log p0(s | x) of each completion: the sampler's own value when it gives one (exact, no recomputation),
        else scored anew (with the finishing EOS when ``max_new_tokens`` is given)."""
        if seqs.log_p0 is not None:
            return seqs.log_p0.to(torch.float64)
        return self.scorer(self.prompt_ids(seqs), [self._with_eos(s) for s in seqs.token_ids])

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        if self.exponent == 0.0:
            return torch.zeros(len(seqs), dtype=torch.float64)
        return self.exponent * self.log_p0(seqs)
