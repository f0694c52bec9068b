"""Solve problems by decoding: N completions per problem at temperature τ, graded by their final answer.

For each of the B prompts of a target (one problem each), draw N completions *without the answer* — the target's
potential φ is dropped, so nothing about the gold answer steers the draws — from the target's LM:

* τ > 0: per-token temperature sampling, q_t(v) ∝ p0(v | s_<t)^{1/τ} (``run_smc(proposal="tempered")`` with κ = 0,
  i.e. N independent draws; no resampling);
* τ = 0: greedy decoding, argmax at every step (``run_smc(proposal="greedy")``); it is deterministic, so it runs once
  per problem and its completion counts as all N samples.

The target's tool stays on (tool tokens are forced exactly as in :func:`~twistlm.smc.run_smc`), and so does its
horizon and stop tokens. Each completion's answer is read by ``answer_fn(target, texts, prompt_index)`` (a task's
:attr:`~twistlm.tasks.registry.Answers.read`; :func:`per_text` adapts a ``text -> answer`` function) and compared, as
a string, with the problem's gold answer. Reported (:class:`SolveResult`):

* single-sample accuracy: the fraction of all B·N samples whose answer is the gold one;
* majority@N: per problem, the most common parsed answer (ties: the one that occurred first; no vote when no sample
  has an answer), correct or not, averaged over problems;
* pass@N: the fraction of problems with at least one correct sample;
* unparsed: the fraction of samples without an answer.

Intervals are 95% Wilson score intervals (:func:`wilson_interval`). Majority@N and pass@N are one Bernoulli per
problem (n = B). The per-sample rates are clustered by problem — samples of one problem are far from independent,
and at τ = 0 they are identical — so they use Kish's effective size n_eff = p̂(1 − p̂) / v̂, with v̂ = Σ_i (m_i − p̂)² /
(B (B − 1)) the between-problem variance of p̂ (m_i the rate of problem i), clamped to [B, B·N]; n_eff = B when p̂ is
0 or 1 (v̂ says nothing then) and n = N for a single problem. These intervals are about the population of problems
the B were drawn from, not only about these B.

This module does not import the tasks or the CLI: answers and golds come in as arguments.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from twistlm.errors import ConfigError
from twistlm.smc import run_smc
from twistlm.target import Target

AnswerFn = Callable[[Target, list[str], list[int]], list[str | None]]
"""``answer_fn(target, texts, prompt_index) -> list[str | None]``: the answer of each completion (None: unparsed)."""
ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(problems_done, problems_total)`` after every sampler call."""

DEFAULT_SAMPLES = 10
DEFAULT_TEMPERATURE = 0.1
"""Low-temperature sampling for majority voting, as in the GFlowNet fine-tuning paper's arithmetic evaluation."""
DEFAULT_BATCH = 8
"""Problems per sampler call: B·N particles side by side (memory grows with it)."""
Z_95 = 1.959963984540054
"""Standard normal quantile for a two-sided 95% interval."""


# ---------------------------------------------------------------------------------------------------- statistics


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common non-None answer; ties go to the one that occurred first; None if every answer is None."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    best, best_count = None, 0
    for a, c in counts.items():  # insertion order = order of first occurrence
        if c > best_count:
            best, best_count = a, c
    return best


def wilson_interval(p_hat: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion p̂ observed on n trials (n may be an effective, fractional size); its
    ends are exactly 0 at p̂ = 0 and 1 at p̂ = 1 (where rounding would leave them a hair inside)."""
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (p_hat + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(max(p_hat * (1 - p_hat) / n + z2 / (4 * n * n), 0.0))
    low = 0.0 if p_hat <= 0 else max(0.0, centre - half)
    high = 1.0 if p_hat >= 1 else min(1.0, centre + half)
    return low, high


def clustered_size(rates: Sequence[float], per_problem: int) -> float:
    """Kish's effective number of trials for a rate averaged over problems of ``per_problem`` samples each (module
    docstring): p̂(1 − p̂)/v̂ clamped to [B, B·N]; B when p̂ ∈ {0, 1}; N for one problem."""
    B, N = len(rates), per_problem
    if B == 0:
        return 0.0
    if B == 1:
        return float(N)
    p = sum(rates) / B
    if p <= 0.0 or p >= 1.0:
        return float(B)
    v = sum((m - p) ** 2 for m in rates) / (B * (B - 1))
    return float(B * N) if v == 0 else min(max(p * (1 - p) / v, float(B)), float(B * N))


@dataclass(frozen=True)
class Rate:
    """A proportion with its 95% Wilson interval and the (effective) number of trials it rests on."""

    value: float
    low: float
    high: float
    n: float

    @classmethod
    def of(cls, value: float, n: float) -> Rate:
        low, high = wilson_interval(value, n)
        return cls(value, low, high, n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -------------------------------------------------------------------------------------------------------- results


@dataclass
class ProblemResult:
    """One problem: its prompt, gold answer, the N completions and the answer read from each."""

    prompt: str
    gold: str
    completions: list[str]
    answers: list[str | None]

    @property
    def correct(self) -> list[bool]:
        return [a is not None and a == self.gold for a in self.answers]

    @property
    def accuracy(self) -> float:
        """Fraction of this problem's samples that are correct."""
        return sum(self.correct) / len(self.answers)

    @property
    def unparsed(self) -> float:
        """Fraction of this problem's samples without an answer."""
        return sum(a is None for a in self.answers) / len(self.answers)

    @property
    def majority(self) -> str | None:
        return majority_vote(self.answers)

    @property
    def majority_correct(self) -> bool:
        return self.majority is not None and self.majority == self.gold

    @property
    def passed(self) -> bool:
        """pass@N: some sample is correct."""
        return any(self.correct)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "gold": self.gold,
            "majority": self.majority,
            "majority_correct": self.majority_correct,
            "passed": self.passed,
            "accuracy": self.accuracy,
            "samples": [
                {"completion": c, "answer": a, "correct": ok}
                for c, a, ok in zip(self.completions, self.answers, self.correct)
            ],
        }


@dataclass
class SolveResult:
    """Per-problem results and the summary rates (module docstring)."""

    problems: list[ProblemResult]
    samples: int
    temperature: float

    @property
    def num_problems(self) -> int:
        return len(self.problems)

    def _per_sample(self, rates: list[float]) -> Rate:
        value = sum(rates) / len(rates) if rates else 0.0
        return Rate.of(value, clustered_size(rates, self.samples))

    def _per_problem(self, flags: list[bool]) -> Rate:
        return Rate.of(sum(flags) / len(flags) if flags else 0.0, float(len(flags)))

    @property
    def accuracy(self) -> Rate:
        """Single-sample accuracy: correct samples / all samples."""
        return self._per_sample([p.accuracy for p in self.problems])

    @property
    def majority_accuracy(self) -> Rate:
        """majority@N: problems whose majority answer is correct / problems."""
        return self._per_problem([p.majority_correct for p in self.problems])

    @property
    def pass_at_n(self) -> Rate:
        """pass@N: problems with a correct sample / problems."""
        return self._per_problem([p.passed for p in self.problems])

    @property
    def unparsed(self) -> Rate:
        """Samples without an answer / all samples."""
        return self._per_sample([p.unparsed for p in self.problems])

    def summary(self) -> dict:
        return {
            "problems": self.num_problems,
            "samples": self.samples,
            "temperature": self.temperature,
            "accuracy": self.accuracy.to_dict(),
            "majority": self.majority_accuracy.to_dict(),
            "pass_at_n": self.pass_at_n.to_dict(),
            "unparsed": self.unparsed.to_dict(),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "problems": [p.to_dict() for p in self.problems]}

    @classmethod
    def concatenate(cls, parts: Sequence[SolveResult]) -> SolveResult:
        """One result from several runs of the same settings over consecutive problem ranges."""
        if not parts:
            raise ConfigError("nothing to concatenate")
        first = parts[0]
        if any(p.samples != first.samples or p.temperature != first.temperature for p in parts):
            raise ConfigError("can only concatenate results with the same samples and temperature")
        return cls([q for p in parts for q in p.problems], first.samples, first.temperature)


# -------------------------------------------------------------------------------------------------------- solving


def per_text(fn: Callable[[str], str | None]) -> AnswerFn:
    """An :data:`AnswerFn` from a function of the completion text alone."""

    def read(target: Target, texts: list[str], prompt_index: list[int]) -> list[str | None]:
        return [fn(t) for t in texts]

    return read


def _check(target: Target, golds: Sequence[str], samples: int, temperature: float, batch: int | None) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be a positive integer, got {samples!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ConfigError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {temperature!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    if len(golds) != target.num_prompts:
        raise ConfigError(f"golds has {len(golds)} answers for {target.num_prompts} problems")


def _slice(target: Target, start: int, stop: int) -> Target:
    """Prompts ``start:stop`` of ``target`` with φ ≡ 1 (the draws must not see the answer)."""
    return dataclasses.replace(
        target,
        prompt=None,
        prompts=list(target.prompts[start:stop]),
        potential=None,
        extras={k: list(v[start:stop]) for k, v in target.extras.items()},
    )


def decode(target: Target, samples: int, temperature: float, generator: torch.Generator) -> list[list[str]]:
    """N completions per prompt of ``target`` (module docstring): tempered sampling, or greedy (run once, repeated)."""
    if temperature == 0:
        results = run_smc(target, 1, proposal="greedy", ess_threshold=0.0, generator=generator)
        return [r.texts * samples for r in results]
    results = run_smc(
        target, samples, proposal="tempered", temperature=float(temperature), ess_threshold=0.0, generator=generator
    )
    return [r.texts for r in results]


def solve(
    target: Target,
    answer_fn: AnswerFn,
    golds: Sequence[str],
    *,
    samples: int = DEFAULT_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    batch: int | None = DEFAULT_BATCH,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
    decoder: Callable[[Target, int, float, torch.Generator], list[list[str]]] | None = None,
) -> SolveResult:
    """Decode ``samples`` completions for each of the target's B problems and grade them against ``golds``.

    batch: problems per sampler call (None: all at once). The draws depend on ``seed`` (or ``generator``) and on
    ``batch``; ``seed=None`` draws fresh entropy. Greedy decoding (τ = 0) runs once per problem and repeats its
    completion ``samples`` times. ``decoder``: how completions are drawn (default :func:`decode`; a GFlowNet policy
    uses :func:`twistlm.gfn.sampling.policy_decoder`, which samples within its action space).
    """
    _check(target, golds, samples, temperature, batch)
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    gen = generator
    B = target.num_prompts
    size = B if batch is None else batch
    problems: list[ProblemResult] = []
    for start in range(0, B, size):
        stop = min(B, start + size)
        part = _slice(target, start, stop)
        texts = (decoder or decode)(part, samples, temperature, gen)
        # Greedy: the N copies are equal, so read each problem's answer once.
        distinct = [t[:1] for t in texts] if temperature == 0 else texts
        flat = [t for group in distinct for t in group]
        index = [b for b, group in enumerate(distinct) for _ in group]
        read = list(answer_fn(part, flat, index))
        if len(read) != len(flat):
            raise ConfigError(f"answer_fn returned {len(read)} answers for {len(flat)} completions")
        offset = 0
        for b, group in enumerate(texts):
            answers = read[offset : offset + len(distinct[b])]
            offset += len(distinct[b])
            if temperature == 0:
                answers = answers * samples
            problems.append(ProblemResult(part.prompt_texts[b], str(golds[start + b]), list(group), answers))
        if callback is not None:
            callback(stop, B)
    return SolveResult(problems, samples, float(temperature))
