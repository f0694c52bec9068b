"""Search for reward-yielding solutions at an equal budget of generated tokens: best-of-N, SMC, twisted SMC.

For each question (prompt b of a :class:`~twistlm.target.Target` whose potential φ scores a completion against that
question's answer, e.g. the ``gsm8k`` task's φ = exp(β (Σ rewards − 4))) and a budget of B generated tokens, with T
the target's horizon and N = K = ⌊B / T⌋ (so no method can exceed B tokens, since a particle generates at most T):

* ``best-of-n``: N independent completions from p0 (importance sampling with the base proposal, κ = 0); returned:
  the one with the highest reward (ties: the first);
* ``smc``: SMC with the base proposal p0 and K particles, resampling (``resampler``) when the ESS falls below κ·K
  (κ = ``ess_threshold``); its target is σ ∝ p0 φ, so φ — which includes the correctness reward — steers it;
* ``twisted-smc``: SMC with the twist-induced proposal q_t ∝ p0 ψ_t of a trained twist and intermediate targets
  p0 ψ_t, same K and resampling.

What the SMC methods return (``select``, :data:`SELECTORS`): ``sample`` (default) one draw from the final particle
approximation σ̂ = Σ_k ŵ_k δ_{s_k} — an approximate sample of σ, what SMC is for; ``weight`` the particle of highest
final weight; ``reward`` the particle of highest reward (as best-of-N does; best-of-N always uses ``reward``, its
weights being uniform).

Note that φ sees the gold answer: best-of-N picks by the reward, SMC resamples by φ. These are rates of *finding* a
correct solution with a verifier in the loop, not answer-blind accuracy (that is :mod:`twistlm.solve`).

Reported per method (:class:`MethodResult`), over the Q questions:

* ``solved``: share of questions whose returned solution is correct (``success(target, texts, prompt_index)``, e.g.
  the task's goal: the gsm8k correctness reward fires; default: φ > 0), with a 95% Wilson interval (n = Q);
* ``found``: share of questions with a correct solution anywhere among the final N (K) particles (Wilson);
* ``mean_reward``: mean reward of the returned solution — the potential's reward total Σ_i w_i r_i when it is a
  :class:`~twistlm.potentials.rewards.RewardPotential` (GSM8K: 0 … 4), else φ itself (as the trainers' "mean φ");
* ``format``: share of returned solutions in the task's layout (``formatted``; None when not given), Wilson;
* ``tokens``: tokens actually generated, counted step by step (a particle generates nothing after its EOS or stop
  token; tool-forced tokens count), in total and per question (mean, max ≤ B);
* ``wall_s``: wall-clock seconds spent in the method's sampler runs (and its selection), summed over batches.

Questions run ``batch`` at a time (B_q groups × K particles side by side, one prefill per question shared by its
particles); for each batch the methods run one after the other, each with its own generator seeded from ``seed`` and
the method's fixed offset, so adding or dropping a method never changes another's draws.

This module does not import the tasks or the CLI: success, format and reward functions come in as arguments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from twistlm.errors import ConfigError
from twistlm.potentials.rewards import RewardPotential
from twistlm.resampling import get_resampler
from twistlm.result import SMCResult
from twistlm.smc import run_smc
from twistlm.solve import Rate
from twistlm.target import Target
from twistlm.twists.base import Twist

CompletionCheck = Callable[[Target, list[str], list[int]], list[bool]]
"""``check(target, texts, prompt_index) -> list[bool]`` (a task's ``success`` or ``formatted``)."""
ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(done, total)`` after every (method, batch) run; total = methods × questions."""

DEFAULT_BATCH = 8
"""Questions per sampler call."""
DEFAULT_ESS_THRESHOLD = 0.5
"""κ of the SMC methods: resample when ESS < κ·K (adaptive resampling)."""
SEED_STRIDE = 1_000_003
"""Method m's generator is seeded with ``seed + SEED_STRIDE · m.seed_offset``."""


# --------------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class SearchMethod:
    """One search method: its proposal, whether it resamples, how it picks the returned solution by default."""

    name: str
    label: str
    proposal: str
    resamples: bool
    needs_twist: bool
    fixed_select: str | None
    seed_offset: int


METHODS: dict[str, SearchMethod] = {
    "best-of-n": SearchMethod("best-of-n", "best-of-N (p0)", "base", False, False, "reward", 0),
    "smc": SearchMethod("smc", "SMC (base proposal)", "base", True, False, None, 1),
    "twisted-smc": SearchMethod("twisted-smc", "twisted SMC", "twisted", True, True, None, 2),
}
"""Registry: method name → :class:`SearchMethod` (module docstring)."""


def _by_reward(result: SMCResult, rewards: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.argmax(rewards.nan_to_num(nan=-math.inf)))


def _by_weight(result: SMCResult, rewards: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.argmax(result.log_weights))


def _by_sample(result: SMCResult, rewards: torch.Tensor, generator: torch.Generator) -> int:
    weights = result.normalized_weights.double()
    if float(weights.sum()) <= 0:  # every particle has weight zero: nothing to draw from, return the first
        return 0
    return int(torch.multinomial(weights, 1, generator=generator))


SELECTORS: dict[str, Callable[[SMCResult, torch.Tensor, torch.Generator], int]] = {
    "sample": _by_sample,
    "weight": _by_weight,
    "reward": _by_reward,
}
"""Registry: how an SMC method picks its returned particle (module docstring)."""


def default_methods(twist: Twist | None) -> tuple[str, ...]:
    """Every method that can run: twisted SMC only with a twist."""
    return tuple(name for name, m in METHODS.items() if twist is not None or not m.needs_twist)


def particles_for(budget: int, max_new_tokens: int) -> int:
    """N = K = ⌊B / T⌋, at least 1; ConfigError if B < T (one sequence could exceed the budget)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"the token budget must be a positive integer, got {budget!r}")
    if budget < max_new_tokens:
        raise ConfigError(
            f"a budget of {budget} tokens is below the horizon T = {max_new_tokens}: one sequence could exceed it "
            f"(give at least {max_new_tokens} tokens, or a smaller T)"
        )
    return budget // max_new_tokens


# --------------------------------------------------------------------------------------------------------- results


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class QuestionOutcome:
    """One question under one method: the returned solution and what the run cost."""

    prompt: str
    text: str
    reward: float
    correct: bool
    found: bool
    formatted: bool | None
    tokens: int

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "returned": self.text,
            "reward": _finite(self.reward),
            "correct": self.correct,
            "found": self.found,
            "formatted": self.formatted,
            "tokens": self.tokens,
        }


@dataclass
class MethodResult:
    """One method over every question (module docstring for the metrics)."""

    method: str
    label: str
    particles: int
    select: str
    questions: list[QuestionOutcome] = field(default_factory=list)
    wall_s: float = 0.0

    def _share(self, flags: list[bool]) -> Rate:
        return Rate.of(sum(flags) / len(flags) if flags else 0.0, float(len(flags)))

    @property
    def solved(self) -> Rate:
        return self._share([q.correct for q in self.questions])

    @property
    def found(self) -> Rate:
        return self._share([q.found for q in self.questions])

    @property
    def format_rate(self) -> Rate | None:
        flags = [q.formatted for q in self.questions]
        return None if any(f is None for f in flags) else self._share([bool(f) for f in flags])

    @property
    def mean_reward(self) -> float:
        return sum(q.reward for q in self.questions) / len(self.questions) if self.questions else math.nan

    @property
    def tokens(self) -> int:
        return sum(q.tokens for q in self.questions)

    @property
    def max_tokens(self) -> int:
        return max((q.tokens for q in self.questions), default=0)

    def summary(self) -> dict:
        fmt = self.format_rate
        n = len(self.questions)
        return {
            "method": self.method,
            "label": self.label,
            "particles": self.particles,
            "select": self.select,
            "questions": n,
            "solved": self.solved.to_dict(),
            "found": self.found.to_dict(),
            "mean_reward": _finite(self.mean_reward),
            "format": fmt.to_dict() if fmt is not None else None,
            "tokens": self.tokens,
            "tokens_per_question": self.tokens / n if n else 0.0,
            "max_tokens_per_question": self.max_tokens,
            "wall_s": self.wall_s,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "questions": [q.to_dict() for q in self.questions]}


@dataclass
class SearchResult:
    """Every method's results at budget B per question (T the horizon; N = K = ⌊B / T⌋ particles)."""

    budget: int
    max_new_tokens: int
    particles: int
    methods: dict[str, MethodResult]
    settings: dict = field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return len(next(iter(self.methods.values())).questions) if self.methods else 0

    def summary(self) -> dict:
        return {name: m.summary() for name, m in self.methods.items()}

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "max_new_tokens": self.max_new_tokens,
            "particles": self.particles,
            "questions": self.num_questions,
            "settings": dict(self.settings),
            "summary": self.summary(),
            "methods": {name: m.to_dict() for name, m in self.methods.items()},
        }


# ---------------------------------------------------------------------------------------------------------- search


class _TokenCounter:
    """Sampler callback: tokens generated per group (rows still unfinished before each step)."""

    def __init__(self, groups: int, particles: int):
        self.per_group = torch.zeros(groups, dtype=torch.long)
        self.particles = particles

    def __call__(self, t: int, T: int, info: dict) -> None:
        self.per_group += info["active"].view(-1, self.particles).sum(dim=1).cpu()


def _rewards(target: Target, result: SMCResult, b: int, reward) -> torch.Tensor:
    """(K,) reward of each final particle of group b: ``reward(seqs)``, the RewardPotential's total, or φ."""
    fn = reward
    if fn is None and isinstance(target.potential, RewardPotential):
        fn = target.potential.total
    if fn is None:
        return result.log_phi.double().exp()
    seqs = target.sequences(result.token_ids, [b] * result.num_particles)
    values = torch.as_tensor(fn(seqs), dtype=torch.float64).reshape(-1)
    if values.numel() != result.num_particles:
        raise ConfigError(f"the reward function returned {values.numel()} values for {result.num_particles} "
                          "completions")
    return values


def _successes(target: Target, result: SMCResult, b: int, success: CompletionCheck | None) -> list[bool]:
    if success is None:
        return [bool(x) for x in (result.log_phi > -math.inf).tolist()]
    flags = list(success(target, list(result.texts), [b] * result.num_particles))
    if len(flags) != result.num_particles:
        raise ConfigError(f"the success function returned {len(flags)} values for {result.num_particles} completions")
    return [bool(f) for f in flags]


def _run_method(
    method: SearchMethod,
    target: Target,
    K: int,
    select: str,
    twist: Twist | None,
    resampler: str,
    ess_threshold: float,
    generator: torch.Generator,
    success: CompletionCheck | None,
    formatted: CompletionCheck | None,
    reward,
) -> tuple[list[QuestionOutcome], float]:
    """One method on every question of ``target`` (one sampler call); (outcomes, wall seconds)."""
    start = time.perf_counter()
    counter = _TokenCounter(target.num_prompts, K)
    results = run_smc(
        target,
        K,
        proposal=method.proposal,
        twist=twist if method.proposal == "twisted" else None,
        resampler=resampler,
        ess_threshold=ess_threshold if method.resamples else 0.0,
        generator=generator,
        callback=counter,
    )
    outcomes = []
    chooser = SELECTORS[select]
    for b, res in enumerate(results):
        rewards = _rewards(target, res, b, reward)
        ok = _successes(target, res, b, success)
        k = chooser(res, rewards, generator)
        fmt = None
        if formatted is not None:
            fmt = bool(next(iter(formatted(target, [res.texts[k]], [b]))))
        outcomes.append(
            QuestionOutcome(
                prompt=target.prompt_texts[b],
                text=res.texts[k],
                reward=float(rewards[k]),
                correct=ok[k],
                found=any(ok),
                formatted=fmt,
                tokens=int(counter.per_group[b]),
            )
        )
    return outcomes, time.perf_counter() - start


def _check(methods: Sequence[str], twist: Twist | None, select: str, ess_threshold: float, batch: int | None,
           resampler: str) -> None:
    if not methods:
        raise ConfigError("give at least one search method")
    for name in methods:
        if name not in METHODS:
            raise ConfigError(f"unknown search method {name!r}; choose from: {', '.join(METHODS)}")
        if METHODS[name].needs_twist and twist is None:
            raise ConfigError(f"method {name!r} needs a trained twist (twist=..., or --twist DIR)")
    if len(set(methods)) != len(methods):
        raise ConfigError("a search method is listed twice")
    if select not in SELECTORS:
        raise ConfigError(f"unknown selection {select!r}; choose from: {', '.join(SELECTORS)}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ConfigError(f"ess_threshold κ must lie in [0, 1], got {ess_threshold}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    get_resampler(resampler)


def search(
    target: Target,
    budget: int,
    *,
    methods: Sequence[str] | None = None,
    twist: Twist | None = None,
    success: CompletionCheck | None = None,
    formatted: CompletionCheck | None = None,
    reward: Callable | None = None,
    select: str = "sample",
    resampler: str = "systematic",
    ess_threshold: float = DEFAULT_ESS_THRESHOLD,
    batch: int | None = DEFAULT_BATCH,
    seed: int = 0,
    callback: ProgressCallback | None = None,
) -> SearchResult:
    """Search every question (prompt) of ``target`` with each of ``methods`` at ``budget`` generated tokens per
    question (module docstring).

    methods: names from :data:`METHODS` (default: :func:`default_methods`). twist: the trained twist of
    ``twisted-smc``. success / formatted: per-completion checks ``f(target, texts, prompt_index) -> list[bool]``
    (default success: φ > 0; no format rate without ``formatted``). reward: ``reward(seqs) -> values`` for the reported
    reward and best-of-N's choice (default: the RewardPotential's total, else φ). select: how the SMC methods
    pick their returned particle (:data:`SELECTORS`). batch: questions per sampler call (None: all at once).
    """
    methods = tuple(methods) if methods is not None else default_methods(twist)
    _check(methods, twist, select, ess_threshold, batch, resampler)
    T = target.max_new_tokens
    K = particles_for(budget, T)
    Q = target.num_prompts
    size = Q if batch is None else batch
    specs = [METHODS[name] for name in methods]
    gens = {m.name: torch.Generator().manual_seed(seed + SEED_STRIDE * m.seed_offset) for m in specs}
    out = {
        m.name: MethodResult(m.name, m.label, K, m.fixed_select or select) for m in specs
    }
    total, done = len(specs) * Q, 0
    for start in range(0, Q, size):
        part = target.select(range(start, min(Q, start + size)))
        for m in specs:
            outcomes, seconds = _run_method(
                m, part, K, out[m.name].select, twist, resampler, ess_threshold, gens[m.name], success, formatted, reward
            )
            out[m.name].questions.extend(outcomes)
            out[m.name].wall_s += seconds
            done += part.num_prompts
            if callback is not None:
                callback(done, total)
    settings = {
        "methods": list(methods),
        "select": select,
        "resampler": resampler,
        "ess_threshold": ess_threshold,
        "batch": batch,
        "seed": seed,
    }
    return SearchResult(budget, T, K, out, settings)
