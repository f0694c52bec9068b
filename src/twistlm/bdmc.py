"""Exact posterior samples for infilling by the BDMC trick (MATH.md, "Exact target samples").

Infilling observes an ending o after the span s: σ(s | o) ∝ p0(s | x) p0(o | x, s), i.e. the potential is the
likelihood φ_o(s) = p0(o | x, s). Drawing T + c tokens from p0 with no potential and splitting them into s (the first T)
and o (the last c) gives a draw from the joint p0(s, o | x); for the o that came out, s is an exact draw from σ(s | o).
Each pair is one posterior problem with its own o, so bounds and KL estimates computed on a batch of pairs concern the
average over o ~ p0(o | x) of the per-o quantities (one run per pair; see :func:`infilling_problem`).

Early stops, and what stays exact. The target's sampler would finish s at a stop token (EOS, or a ``stop_token_ids``
entry) before T, while o must follow a span of T tokens. Here the model generates all T + c tokens (a stop token is
then an ordinary token) and a draw is **discarded and redrawn** when s contains a stop token anywhere (positions
1..T) or, unless ``allow_eos_in_ending``, o contains EOS. The accepted pairs are draws of p0(s, o | s ∈ A, o ∈ B) with
A = spans of exactly T tokens without stop tokens and B = endings without EOS, so for each accepted o

    s ~ σ_A(s | o) ∝ p0(s | x) 1[s ∈ A] p0(o | x, s)        (exact; the condition on o does not involve s).

This is the infilling target **conditioned on the span having length exactly T** (no early stop), not the target
that lets s end early at EOS (for that one the pairs would be biased towards long spans). The matching
:class:`~twistlm.target.Target` has horizon T and the potential φ_o(s) · 1[s ∈ A]: :class:`ExactSpanPotential`
multiplies any likelihood potential by that indicator, and :func:`infilling_problem` builds the whole problem. Under
it, p0(s) of a length-T span is Π_t p0(s_t | x, s_<t), the same product the joint draw used, so the BDMC samples are
exact samples of that target. (A target with ``stop_at_eos=False`` and no stop tokens makes A everything: no redraws.)
The likelihood potential must score o by the same token ids: with a real tokenizer, decoding o to text and
re-tokenizing it can change the ids and then p0(o | x, s) is the likelihood of slightly different tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from twistlm.bounds import select_prompts
from twistlm.errors import ConfigError, TwistLMError
from twistlm.potentials.base import Potential, Sequences
from twistlm.potentials.likelihood import OBSERVATION_KEY
from twistlm.target import Target

EXACT_SAMPLE_KEY = "exact_sample"
"""``target.extras`` key of each prompt's exact posterior sample s* (token ids), where a task provides one."""


@dataclass
class InfillingPair:
    """One BDMC draw: ``span_ids`` (s, T tokens) is an exact sample of σ(s | o) for ``ending_ids`` (o, c tokens)."""

    prompt: str
    span_ids: list[int]
    ending_ids: list[int]
    span_text: str
    ending_text: str


@dataclass
class BDMCResult:
    """Accepted pairs plus the bookkeeping of redraws (``num_drawn`` joint draws of which ``len(pairs)`` kept)."""

    pairs: list[InfillingPair]
    span_tokens: int
    ending_tokens: int
    num_drawn: int
    num_redrawn: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": "bdmc",
            "span_tokens": self.span_tokens,
            "ending_tokens": self.ending_tokens,
            "num_pairs": len(self.pairs),
            "num_drawn": self.num_drawn,
            "num_redrawn": self.num_redrawn,
            "condition": "span of exactly T tokens without stop tokens; ending without EOS",
        }


@torch.inference_mode()
def bdmc_pairs(
    target: Target,
    num_pairs: int,
    ending_tokens: int,
    *,
    span_tokens: int | None = None,
    prompt: int = 0,
    allow_eos_in_ending: bool = False,
    batch_size: int = 1024,
    max_draws: int = 1_000_000,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> BDMCResult:
    """``num_pairs`` (s, o) pairs for prompt ``prompt`` of ``target``: T = ``span_tokens`` (default the target's
    horizon) span tokens, c = ``ending_tokens`` ending tokens, redrawing early stops (module docstring)."""
    T = target.max_new_tokens if span_tokens is None else span_tokens
    if T < 1 or ending_tokens < 1 or num_pairs < 1:
        raise ConfigError(
            f"BDMC needs positive span/ending lengths and pair count, got {T}, {ending_tokens}, {num_pairs}"
        )
    if not 0 <= prompt < target.num_prompts:
        raise ConfigError(f"prompt index {prompt} out of range for {target.num_prompts} prompts")
    lm = target.lm
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    stops = torch.zeros(lm.vocab_size, dtype=torch.bool)
    stops[list(target.stop_ids)] = True
    eos = lm.eos_token_id
    pairs: list[InfillingPair] = []
    drawn = 0
    while len(pairs) < num_pairs:
        if drawn >= max_draws:
            raise TwistLMError(
                f"BDMC: only {len(pairs)} of {num_pairs} draws of {T} + {ending_tokens} tokens avoided an early stop "
                f"in {drawn} draws; the model stops too often for a span of {T} tokens (shorten it or raise max_draws)"
            )
        n = min(batch_size, max_draws - drawn)
        draws = _draw(lm, target.prompt_ids[prompt], n, T + ending_tokens, gen)
        drawn += n
        ok = ~stops[draws[:, :T]].any(dim=1)
        if not allow_eos_in_ending:
            ok &= ~(draws[:, T:] == eos).any(dim=1)
        for row in draws[ok].tolist()[: num_pairs - len(pairs)]:
            s, o = row[:T], row[T:]
            pairs.append(InfillingPair(target.prompt_texts[prompt], s, o, lm.decode(s), lm.decode(o)))
    return BDMCResult(pairs, T, ending_tokens, drawn, drawn - len(pairs))


def _draw(lm, prompt_ids: Sequence[int], n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) ancestral p0 draws in which every token, EOS included, is an ordinary token."""
    state = lm.prefill([list(prompt_ids)], n)
    out = torch.empty(n, length, dtype=torch.long)
    for t in range(length):
        probs = torch.exp(state.logprobs.detach().to("cpu", torch.float64))
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out[:, t] = tok
        if t + 1 < length:
            state = lm.step(state, tok.to(lm.device))
    return out


class ExactSpanPotential(Potential):
    """φ(s) = φ_inner(s) · 1[s has exactly ``span_tokens`` tokens and no stop token] (see the module docstring)."""

    def __init__(self, inner: Potential, span_tokens: int, stop_ids: Sequence[int]):
        self.inner = inner
        self.span_tokens = span_tokens
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.bounded = inner.bounded
        self.name = f"{inner.name}·1[|s|={span_tokens}]"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        values = self.inner(seqs).clone()
        for i, ids in enumerate(seqs.token_ids):
            if len(ids) != self.span_tokens or any(t in self.stop_ids for t in ids):
                values[i] = float("-inf")
        return values


def infilling_problem(
    target: Target,
    num_runs: int,
    ending_tokens: int,
    *,
    ending_key: str = OBSERVATION_KEY,
    prompt: int = 0,
    seed: int = 0,
    **kwargs,
) -> tuple[Target, list[list[int]], BDMCResult]:
    """An infilling evaluation problem with exact samples: (runs target, exact samples, BDMC result).

    The runs target has one prompt per BDMC pair (all equal to prompt ``prompt``), horizon T = target.max_new_tokens,
    per-prompt extras ``ending_key`` (o as token ids — what
    :class:`~twistlm.potentials.likelihood.InfillingPotential` reads when built without a fixed observation, so no
    re-tokenization happens) and ``ending_key + "_text"``, and the target's potential wrapped in
    :class:`ExactSpanPotential`; exact sample i is span i. Pass both to :func:`twistlm.bounds.log_z_bounds` (one run
    per prompt). ``kwargs`` go to :func:`bdmc_pairs`.
    """
    if getattr(target.potential, "observation", None) is not None:
        raise ConfigError(
            f"potential {target.potential.name!r} has a fixed observation; BDMC gives every run its own ending o, so "
            f"build the potential without one (it then reads extras[{ending_key!r}])"
        )
    result = bdmc_pairs(target, num_runs, ending_tokens, prompt=prompt, seed=seed, **kwargs)
    extras = {
        ending_key: [p.ending_ids for p in result.pairs],
        f"{ending_key}_text": [p.ending_text for p in result.pairs],
    }
    T = target.max_new_tokens
    potential = ExactSpanPotential(target.potential, T, target.stop_ids)
    runs = select_prompts(target, [prompt] * len(result.pairs), extras=extras, potential=potential)
    return runs, [p.span_ids for p in result.pairs], result
