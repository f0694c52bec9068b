"""``tempered``: finish the sentence a prompt starts, sampling from the tempered model σ(s) ∝ p0(s | x)^(1/τ).

Potential: :class:`~twistlm.potentials.TemperedPotential`, φ(s) = p0(s | x)^(1/τ − 1) (MATH.md, "Tempered
target"); bounded for τ ≤ 1. Default τ = 0.5: σ ∝ p0², clearly sharper than p0 (it favours the model's likely
continuations) yet far from greedy decoding; φ = p0(s | x) itself then spans tens of nats over a sentence, so
importance weights are very uneven — a hard, informative problem for SIS/SMC (the GFlowNet paper's "sentence
continuation" task samples p0^(1/τ) too).

Stopping. A particle finishes at the end of its sentence: ``stop_token_ids`` = the vocabulary tokens whose text ends
with ".", "!" or "?" (possibly followed by closing quotes/brackets and whitespace), computed once per tokenizer by
:func:`~twistlm.tasks.common.sentence_end_token_ids`; that token stays in the completion. EOS also stops. The potential
is told the horizon and the stop tokens so that log p0(s | x) includes the finishing EOS exactly as the sampler's
p0 does. Default horizon T = 20 tokens.

Prompts: ``data=PATH`` reads one prompt per line (e.g. ``../shared/data/prompts/openwebtext.txt``), ``index`` picks
the first one; without a file the built-in :data:`DEFAULT_PROMPT` is used (or ``prompt=TEXT``). No binary goal
(``success`` is None): compare samplers by log Ẑ and the bounds.
"""

from __future__ import annotations

from twistlm.data import load_prompts
from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.potentials import TemperedPotential
from twistlm.target import Target
from twistlm.tasks.common import Option, define_task, select_examples, sentence_end_token_ids

DEFAULT_PROMPT = "The city council met on Tuesday night to discuss"
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_TAU = 0.5

OPTIONS = {
    "tau": Option(DEFAULT_TAU, "temperature τ: σ ∝ p0^(1/τ)", float, minimum=0.0, open_minimum=True),
    "data": Option(None, "text file with one prompt per line", str, optional=True),
    "index": Option(0, "first prompt (line among non-empty lines) of the file", int, minimum=0),
    "prompt": Option(
        None, "prompt text when no data file is given", str, optional=True, default_text=repr(DEFAULT_PROMPT)
    ),
}


def build(lm: ParticleLM, T: int, B: int, *, tau: float, data: str | None, index: int, prompt: str | None) -> Target:
    if data is not None:
        if prompt is not None:
            raise ConfigError("task 'tempered': give either data=PATH or prompt=TEXT, not both")
        prompts = select_examples("tempered", load_prompts(data, limit=index + B), index, B, data)
    else:
        if index != 0:
            raise ConfigError("task 'tempered': index needs a data file (data=PATH)")
        prompts = [prompt or DEFAULT_PROMPT] * B
    stops = sentence_end_token_ids(lm)
    potential = TemperedPotential(lm, tau, max_new_tokens=T, stop_token_ids=stops)
    return Target(lm, prompts=prompts, potential=potential, max_new_tokens=T, stop_token_ids=stops)


TASK = define_task(
    "tempered",
    "Finish a sentence at temperature τ: σ ∝ p0^(1/τ), stopping at the sentence end.",
    OPTIONS,
    build,
    DEFAULT_MAX_NEW_TOKENS,
    None,
)
