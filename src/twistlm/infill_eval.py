"""Infill a missing sentence with several methods and score the infills against the true sentence (Story Cloze).

Target: σ(z | x, y) ∝ p0(z | x) p0(y | x, z) — z the missing sentence, x what comes before, y the ending after it
(``twistlm.tasks.infilling``, ``mode=stories``: ``extras["observation"]`` = y, ``extras["middle"]`` = the true z).
Each method draws **one** infill per story (registry :data:`METHODS`):

* ``p0`` — the base model after x alone (the ending unseen): p0(z | x);
* ``prompt`` — the base model prompted with the ending first (``"Ending: " y "\\n\\n" x``, the observation condition
  of :mod:`twistlm.conditioning`; zero-shot prompting, and a LoRA policy's starting point);
* ``smc`` — SMC on σ with the base proposal, ``particles`` particles, one returned by its final weight (an
  approximate σ sample; SIS when ``ess_threshold`` is 0);
* a trained policy (a ``train-gfn`` folder: the GFlowNet or the SFT policy) — one draw from q_θ(z | its prompt)
  within its action space.

Scores (:mod:`twistlm.text_overlap`): BLEU-4, GLEU and embedding similarity against the true sentences, 95% CIs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from twistlm.bounds import derive_seed
from twistlm.errors import ConfigError
from twistlm.policy_proposal import policy_prompt_ids
from twistlm.smc import run_smc
from twistlm.target import Target
from twistlm.text_overlap import Interval, overlap_scores

MIDDLE_KEY = "middle"
DEFAULT_PARTICLES = 16
DEFAULT_BATCH = 8
"""Stories sampled side by side (SMC: × particles rows)."""

Method = Callable[[Target, torch.Generator, dict], list[str]]
"""(target over a batch of stories, generator, settings) → one infill text per story."""
METHODS: dict[str, Method] = {}


def register_method(name: str):
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@register_method("p0")
def infill_p0(target: Target, generator: torch.Generator, settings: dict) -> list[str]:
    return [r.texts[0] for r in run_smc(target, 1, seed=_seed(generator))]


@register_method("smc")
def infill_smc(target: Target, generator: torch.Generator, settings: dict) -> list[str]:
    results = run_smc(target, settings.get("particles", DEFAULT_PARTICLES), seed=_seed(generator),
                      ess_threshold=settings.get("ess_threshold", 0.5))
    out = []
    for r in results:
        w = r.normalized_weights
        pick = int(torch.multinomial(w, 1, generator=generator)) if float(w.sum()) > 0 else 0
        out.append(r.texts[pick])
    return out


def draw_from(lm: Any, prompts: Sequence[Sequence[int]], target: Target, generator: torch.Generator,
              space: Any = None) -> list[str]:
    """One draw per prompt from ``lm`` after ``prompts`` (within ``space``, default: the target's vocabulary, stops
    and horizon); the text includes the stop token, as the target's completions do."""
    from twistlm.gfn.sampling import ActionSpace, sample_trajectories

    if space is None:
        space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), 1,
                            target.max_new_tokens)
    trajs = sample_trajectories(lm, prompts, 1, space, generator)
    return [lm.decode(t + ([s] if s >= 0 else [])) for t, s in zip(trajs.tokens, trajs.stop_token)]


@register_method("prompt")
def infill_prompt(target: Target, generator: torch.Generator, settings: dict) -> list[str]:
    from twistlm.conditioning import get_condition

    return draw_from(target.lm, get_condition("observation")(target), target, generator)


def policy_method(policy_lm: Any, space: Any) -> Method:
    """The method of a loaded policy LM (its ``.condition`` decides what it reads)."""

    def infill(target: Target, generator: torch.Generator, settings: dict) -> list[str]:
        return draw_from(policy_lm, policy_prompt_ids(policy_lm, target), target, generator, space)

    return infill


@dataclass
class MethodResult:
    """One method's infills and their scores (``scores``: name → :class:`~twistlm.text_overlap.Interval`)."""

    name: str
    texts: list[str]
    scores: dict[str, Interval]
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "scores": {k: v.to_dict() for k, v in self.scores.items()},
                "seconds": self.seconds, "texts": self.texts}


@dataclass
class InfillResult:
    """Every method on the same stories: prompts, true sentences, one :class:`MethodResult` per method."""

    prompts: list[str]
    references: list[str]
    methods: list[MethodResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "references": self.references,
                "methods": [m.to_dict() for m in self.methods]}


def infill(target: Target, methods: dict[str, Method], *, seed: int = 0, batch: int = DEFAULT_BATCH,
           settings: dict | None = None, progress: Callable[[int, int, str], None] | None = None,
           encoder: str | None = None) -> InfillResult:
    """Run every method on every story of ``target`` (batches of ``batch`` stories) and score it (module docstring).
    Each method draws from its own generator seeded from ``seed``, so adding a method changes no other's infills."""
    references = target.extras.get(MIDDLE_KEY)
    if references is None:
        raise ConfigError("infill needs the true sentences in extras['middle'] (task infilling with a Story Cloze "
                          "file: -o data=PATH)")
    if batch < 1:
        raise ConfigError(f"batch must be ≥ 1, got {batch}")
    result = InfillResult(list(target.prompt_texts), [str(r) for r in references])
    n, total, done = target.num_prompts, len(methods) * target.num_prompts, 0
    for name, method in methods.items():
        gen = torch.Generator().manual_seed(derive_seed("infill", seed, name))
        start, texts = time.perf_counter(), []
        for lo in range(0, n, batch):
            sub = target.select(list(range(lo, min(n, lo + batch))))
            texts += [t.strip() for t in method(sub, gen, settings or {})]
            done += sub.num_prompts
            if progress is not None:
                progress(done, total, name)
        seconds = time.perf_counter() - start
        scores = overlap_scores(texts, result.references, seed=seed, encoder=encoder)
        result.methods.append(MethodResult(name, texts, scores, seconds))
    return result
