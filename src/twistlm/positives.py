"""Positive samples for the twist losses that need them (CTL, SIXO): a registry of sources.

MATH.md's losses take "positives" s ~ σ. Where they come from is a choice with a cost/bias trade-off:

* ``exact``: i.i.d. draws from σ by enumeration (toy problems only).
* ``observed``: each prompt's own exact sample, ``target.extras["exact_sample"]`` (BDMC infilling: for a joint p0
  draw (s*, o), s* is an exact draw of σ(· | o); :mod:`twistlm.bdmc`). One sample per prompt, so it serves a twist
  amortized over many prompts (``prompts_per_step``): the positives of an update are the exact samples of the
  prompts it drew, averaged over o ~ p0 — CTL with a ratio twist is then maximum likelihood of q_θ(s | o) on
  simulated pairs. Free: nothing is sampled.
* ``rejection``: fresh p0 draws accepted with probability φ (exact; 0 ≤ φ ≤ 1 only). Costs ``rejection_particles``
  samples per step, so with Z = E_p0[φ] ≈ 0.005 (toxicity) it yields a positive only every few steps.
* ``smc``: twisted SMC particles with their normalised weights (MATH.md's approximate positives; consistent in K).
* ``buffer``: an importance-weighted replay of the negatives of every step so far. Each stored draw s ~ q_i (the
  proposal of the step that drew it: p0 or an earlier twisted proposal) keeps its importance weight
  w = σ̃(s) / q_i(s) = p0(s) φ(s) / q_i(s); positives are drawn with replacement ∝ w over the buffer. Each step's
  weights estimate Z without bias, so the pooled self-normalised sample is a consistent approximation of σ (as
  ``smc`` positives are, but from every draw seen instead of K fresh ones) — at no extra sampling cost, and a rare
  positive (φ > 0 once in hundreds of draws, as for toxicity) stays available after the step that found it. The
  oldest draws are dropped beyond ``capacity``. (Weighting distinct sequences by σ̃ alone, i.e. σ restricted to the
  buffer, would be wrong on an LM's space: it picks the highest-p0 sequence seen, not a σ sample.)

Every source returns :class:`Samples` (B groups × n rows, a group without positives is one padding row of weight 0,
which the losses skip) and can save/restore its state for exact resumption.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from twistlm.bdmc import EXACT_SAMPLE_KEY
from twistlm.errors import ConfigError
from twistlm.exact import enumerate_target
from twistlm.smc import run_smc

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.target import Target
    from twistlm.twists.base import Twist


@dataclass
class Samples:
    """Sequences of B groups × n samples (row b·n + j), with log φ (B, n) and data log weights (B, n)."""

    sequences: list[list[int]]
    log_phi: torch.Tensor
    log_weight: torch.Tensor


def samples_from_results(results, weighted: bool = False) -> Samples:
    """The particles of sampler results (one per prompt); ``weighted``: keep their log weights as data weights."""
    seqs = [list(ids) for r in results for ids in r.token_ids]
    log_phi = torch.stack([r.log_phi.to(torch.float64) for r in results])
    if weighted:
        log_weight = torch.stack([r.log_weights.to(torch.float64) for r in results])
    else:
        log_weight = torch.zeros_like(log_phi)
    return Samples(seqs, log_phi, log_weight)


def pad_groups(groups: list[list[tuple[list[int], float]]], filler: list[int]) -> Samples:
    """Samples from per-group lists of (sequence, log φ), padded to the largest group with weight-0 rows."""
    n = max(1, max(len(g) for g in groups))
    seqs: list[list[int]] = []
    log_phi = torch.zeros(len(groups), n, dtype=torch.float64)
    log_w = torch.zeros(len(groups), n, dtype=torch.float64)
    for b, group in enumerate(groups):
        for j in range(n):
            if j < len(group):
                seqs.append(list(group[j][0]))
                log_phi[b, j] = group[j][1]
            else:
                seqs.append(list(filler))
                log_w[b, j] = -math.inf
    return Samples(seqs, log_phi, log_w)


@dataclass
class PositiveRequest:
    """What a source needs for one draw: the target, the current twist, P per prompt, the run's generator."""

    target: Target
    twist: Twist
    num_positives: int
    generator: torch.Generator
    ess_threshold: float = 0.5
    rejection_particles: int | None = None


class PositiveSource:
    """Base: ``draw(request) -> Samples``; ``observe`` sees each step's negatives; state for checkpoints."""

    name = "base"
    fed_by_negatives = False
    """True for a source that draws from the negatives it observes (the buffer): its trainer must sample them."""

    def __init__(self, target: Target, capacity: int = 0):
        self.target = target

    def observe(self, samples: Samples, log_weight: torch.Tensor) -> None:
        """Called with every step's negatives and their importance log weights log σ̃(s) − log q(s) (B, n)."""

    def draw(self, request: PositiveRequest) -> Samples:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def _prompt_key(target: Target, b: int) -> str:
    """What defines prompt b's σ besides the shared LM, potential and horizon: its token ids and its extras."""
    extras = {k: v[b] for k, v in sorted(target.extras.items())}
    return json.dumps([list(target.prompt_ids[b]), extras], sort_keys=True, default=repr)


class ExactPositives(PositiveSource):
    """σ by enumeration, per prompt of the request's target (enumerated once per distinct prompt and extras, so a
    trainer that draws batches of questions from a dataset gets each question's own σ)."""

    name = "exact"

    def __init__(self, target: Target, capacity: int = 0):
        super().__init__(target)
        self._cache: dict[str, object] = {}
        for b in range(target.num_prompts):
            self._enumerated(target, b)

    def _enumerated(self, target: Target, b: int):
        key = _prompt_key(target, b)
        if key not in self._cache:
            self._cache[key] = enumerate_target(target, b)
        return self._cache[key]

    def draw(self, request: PositiveRequest) -> Samples:
        seqs, log_phi = [], []
        target = request.target
        for ex in (self._enumerated(target, b) for b in range(target.num_prompts)):
            draws = torch.multinomial(ex.probs, request.num_positives, replacement=True, generator=request.generator)
            seqs += [list(ex.sequences[i]) for i in draws.tolist()]
            log_phi.append(ex.log_phi[draws])
        log_phi = torch.stack(log_phi)
        return Samples(seqs, log_phi, torch.zeros_like(log_phi))


class ObservedPositives(PositiveSource):
    """Each prompt's exact sample from ``target.extras["exact_sample"]``, repeated ``num_positives`` times (module
    docstring), with its log φ under the target's potential."""

    name = "observed"

    def __init__(self, target: Target, capacity: int = 0):
        super().__init__(target)
        self._samples(target)  # refuses a target without exact samples before training starts

    @staticmethod
    def _samples(target: Target) -> list[list[int]]:
        samples = target.extras.get(EXACT_SAMPLE_KEY)
        if samples is None:
            raise ConfigError(f"observed positives need each prompt's exact sample in target.extras"
                              f"[{EXACT_SAMPLE_KEY!r}] (e.g. --task infilling in bdmc mode); this target has none")
        return [list(map(int, s)) for s in samples]

    def draw(self, request: PositiveRequest) -> Samples:
        target, n = request.target, request.num_positives
        rows = self._samples(target)
        seqs = [row for row in rows for _ in range(n)]
        index = [b for b in range(target.num_prompts) for _ in range(n)]
        log_phi = target.log_phi(seqs, index).to(torch.float64).view(target.num_prompts, n)
        return Samples(seqs, log_phi, torch.zeros_like(log_phi))


class SMCPositives(PositiveSource):
    name = "smc"

    def draw(self, request: PositiveRequest) -> Samples:
        results = run_smc(
            request.target,
            request.num_positives,
            proposal="twisted",
            twist=request.twist,
            ess_threshold=request.ess_threshold,
            generator=request.generator,
        )
        return samples_from_results(results, weighted=True)


class RejectionPositives(PositiveSource):
    name = "rejection"

    def draw(self, request: PositiveRequest) -> Samples:
        P, gen = request.num_positives, request.generator
        M = request.rejection_particles or 4 * P
        results = run_smc(request.target, M, proposal="base", ess_threshold=0.0, generator=gen)
        groups = []
        for r in results:
            u = torch.rand(M, generator=gen, dtype=torch.float64)
            keep = (u < r.log_phi.exp()).nonzero().squeeze(1).tolist()[:P]
            groups.append([(list(r.token_ids[i]), float(r.log_phi[i])) for i in keep])
        return pad_groups(groups, list(results[0].token_ids[0]))


DEFAULT_BUFFER_CAPACITY = 1024
"""Draws with φ > 0 kept per prompt by the replay buffer (the oldest are dropped beyond it). Recent draws come from
proposals closer to the current one, so a moderate pool works best: on the toy CTL test (400 steps, 64 negatives),
KL(σ‖q) after training was 0.017 / 0.018 (two seeds) at capacity 1024 vs 0.051 / 0.022 at 4096 and 0.031 / 0.024 at
256. Draws with φ = 0 are not stored, so for a rare goal all positives found are kept much longer."""


class BufferPositives(PositiveSource):
    """Replay of past negatives with their importance weights log σ̃(s) − log q_i(s) (see the module docstring)."""

    name = "buffer"
    fed_by_negatives = True

    def __init__(self, target: Target, capacity: int = 0):
        super().__init__(target)
        self.capacity = capacity or DEFAULT_BUFFER_CAPACITY
        # per prompt, oldest first: (sequence, log importance weight, log φ); φ = 0 draws are not kept (weight 0)
        self.entries: list[list[tuple[list[int], float, float]]] = [[] for _ in range(target.num_prompts)]

    def observe(self, samples: Samples, log_weight: torch.Tensor) -> None:
        B, n = samples.log_phi.shape
        for b in range(B):
            book = self.entries[b]
            for j in range(n):
                lw, lphi = float(log_weight[b, j]), float(samples.log_phi[b, j])
                if math.isfinite(lw) and math.isfinite(lphi):
                    book.append((list(samples.sequences[b * n + j]), lw, lphi))
            del book[: max(0, len(book) - self.capacity)]

    def size(self, prompt: int = 0) -> int:
        return len(self.entries[prompt])

    def draw(self, request: PositiveRequest) -> Samples:
        groups = []
        for book in self.entries:
            if not book:
                groups.append([])
                continue
            log_w = torch.tensor([e[1] for e in book], dtype=torch.float64)
            probs = torch.softmax(log_w, dim=0)
            idx = torch.multinomial(probs, request.num_positives, replacement=True, generator=request.generator)
            groups.append([(book[i][0], book[i][2]) for i in idx.tolist()])
        return pad_groups(groups, [request.target.lm.eos_token_id])

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "entries": [[[s, w, p] for s, w, p in book] for book in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.capacity = int(state["capacity"])
        self.entries = [[(list(s), float(w), float(p)) for s, w, p in book] for book in state["entries"]]


POSITIVE_SOURCES: dict[str, Callable[..., PositiveSource]] = {
    "exact": ExactPositives,
    "observed": ObservedPositives,
    "smc": SMCPositives,
    "rejection": RejectionPositives,
    "buffer": BufferPositives,
}
"""Registry: positives source name → class."""

BOUNDED_ONLY = ("rejection",)
"""Sources that need 0 ≤ φ ≤ 1."""


def get_positive_source(name: str, target: Target, capacity: int = 0) -> PositiveSource:
    if name not in POSITIVE_SOURCES:
        raise ConfigError(f"unknown positives source {name!r}; choose from: {', '.join(POSITIVE_SOURCES)}")
    return POSITIVE_SOURCES[name](target, capacity)
