"""Bidirectional bounds on log Z (MATH.md, "Bounds on log Z"), vectorised over independent runs.

* **Lower**: E[log Ẑ] ≤ log Z for SIS and SMC with any proposal and any K (Jensen on the unbiased Ẑ).
* **Upper**: conditional SMC. Given an exact sample s* ~ σ, particle 0 is clamped to s* (its tokens and ancestry fixed),
  the other K − 1 particles are proposed as usual and, at each resampling, choose their ancestors among all K by
  multinomial draws; then E[log Ẑ_cSMC] ≥ log Z. With ``sampler="sis"`` (κ = 0) this is clamped SIS: one weight from
  s*, K − 1 from q. For K = 1 both samplers coincide (resampling one particle is the identity) and SIS is run; then
  log Ẑ is the single weight log w = log σ̃(s) − log q(s), which :mod:`twistlm.kl` uses.

Runs are vectorised with the B-groups trick: R independent runs of a one-prompt target are one :func:`run_smc` call
on the target repeated R times (in chunks of at most ``max_batch_particles`` particles). A target with several
prompts is taken as one run per prompt (e.g. BDMC infilling, one observed ending per run); the bounds then concern the
mean of log Z over its prompts.

Confidence intervals are 95% Student-t intervals over runs: mean ± t_{0.975, n−1} · s / √n. A run whose Ẑ is 0 (all
particles at weight zero, possible under hard constraints) has log Ẑ = −∞, and then so is the mean: the lower bound is
−∞ (valid, but uninformative); :attr:`Estimate.num_infinite` counts such runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from twistlm.errors import ConfigError
from twistlm.resampling import log_mean_exp
from twistlm.smc import PROPOSALS, run_smc
from twistlm.target import Target
from twistlm.twists.base import Twist

SAMPLERS = ("smc", "sis")
ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, description)``: units are particle-runs (runs × K) processed so far."""

# 0.975 quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: float) -> float:
    """t_{0.975, df}: a table for df ≤ 30, a Cornish–Fisher expansion around z = 1.96 beyond (error < 1e-4)."""
    if not df >= 1:
        return math.inf
    if df <= 30:
        return _T975[round(df) - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Estimate:
    """Mean of n per-run values with its standard error and a 95% Student-t confidence interval.

    num_infinite: runs whose value is ±∞ (e.g. log Ẑ = −∞ when every particle had weight zero). If any, the mean is
    that infinity and the interval collapses onto it.
    """

    mean: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int
    num_infinite: int = 0
    df: float = 0.0

    @classmethod
    def from_values(cls, values: torch.Tensor | Sequence[float]) -> Estimate:
        x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        n = x.numel()
        if n == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        inf = torch.isinf(x)
        if inf.any():
            mean = float(x[inf].sum())  # −∞, +∞, or NaN if both appear
            return cls(mean, 0.0, mean, mean, n, int(inf.sum()), n - 1)
        mean = float(x.mean())
        if n == 1:
            return cls(mean, math.inf, -math.inf, math.inf, 1, 0, 0)
        se = float(x.std(unbiased=True)) / math.sqrt(n)
        return cls.from_moments(mean, se, n - 1, n)

    @classmethod
    def from_moments(cls, mean: float, stderr: float, df: float, n: int, num_infinite: int = 0) -> Estimate:
        half = t_quantile_975(df) * stderr if stderr > 0 else 0.0
        return cls(mean, stderr, mean - half, mean + half, n, num_infinite, df)

    def affine(self, offset: float, scale: float) -> Estimate:
        """The estimate of offset + scale · X (scale = ±1 in practice)."""
        lo, hi = sorted((offset + scale * self.ci_low, offset + scale * self.ci_high))
        mean = offset + scale * self.mean
        return Estimate(mean, abs(scale) * self.stderr, lo, hi, self.n, self.num_infinite, self.df)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.mean)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "stderr": self.stderr,
            "ci95": [self.ci_low, self.ci_high],
            "n": self.n,
            "num_infinite": self.num_infinite,
        }


@dataclass(frozen=True)
class Proposal:
    """How particles are proposed: ``kind="base"`` (p0), ``"twisted"`` (q_t ∝ p0 ψ_t, with ``twist``) or
    ``"policy"`` (q_t = a policy's next-token distribution, with ``policy`` and optionally ``policy_space``; see
    :mod:`twistlm.policy_proposal`).

    The twist also defines the intermediate targets π_t of SMC (with the policy proposal too). ``sis``: this proposal
    never resamples (κ = 0, importance sampling) whatever the sampler of the bounds, e.g. to compare a GFlowNet policy
    used alone with the same policy inside SMC. :meth:`sampler_kwargs` translates a proposal into the sampler's
    arguments; bounds, KL estimates and reports only consume the log Ẑ and log w it produces.
    """

    kind: str = "base"
    twist: Twist | None = None
    policy: Any = None
    policy_space: Any = None
    sis: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PROPOSALS:
            raise ConfigError(f"unknown proposal kind {self.kind!r}; choose from: {', '.join(PROPOSALS)}")
        if self.kind == "twisted" and self.twist is None:
            raise ConfigError("a twisted proposal needs a twist")
        if (self.kind == "policy") != (self.policy is not None):
            raise ConfigError("a policy proposal needs a policy, and only a policy proposal takes one")

    def sampler_kwargs(self) -> dict:
        kwargs = {"proposal": self.kind, "twist": self.twist}
        if self.kind == "policy":
            kwargs.update(policy=self.policy, policy_space=self.policy_space)
        return kwargs


def as_proposal(spec: Proposal | str | Twist | tuple) -> Proposal:
    """Accept a :class:`Proposal`, ``"base"``, a :class:`Twist` (→ twisted), or a tuple ``(kind, twist)``."""
    if isinstance(spec, Proposal):
        return spec
    if isinstance(spec, str):
        return Proposal(spec)
    if isinstance(spec, Twist):
        return Proposal("twisted", spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        return Proposal(spec[0], spec[1])
    raise ConfigError(f"cannot read a proposal from {spec!r}; give 'base', a Twist, or ('twisted', twist)")


def select_prompts(
    target: Target, indices: Sequence[int], extras: Mapping[str, list] | None = None, **changes: object
) -> Target:
    """A target over prompts ``indices`` of ``target`` (repeats allowed), with the same potential, horizon and stops.

    ``extras`` replaces or adds per-prompt extras for the new prompt list (one entry per index); ``changes`` replaces
    other fields (e.g. ``potential=``).
    """
    new_extras = {k: [v[i] for i in indices] for k, v in target.extras.items()}
    new_extras.update(extras or {})
    prompts = [target.prompts[i] for i in indices]
    return dataclasses.replace(target, prompt=None, prompts=prompts, extras=new_extras, **changes)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (so every (proposal, K, chunk, bound) stream is independent)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_log_z(
    target: Target,
    run_prompts: Sequence[int],
    num_particles: int,
    proposal: Proposal,
    *,
    sampler: str = "smc",
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    references: Sequence[Sequence[int]] | None = None,
    seed: object = 0,
    max_batch_particles: int = 4096,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """log Ẑ of len(run_prompts) independent runs (run i uses prompt run_prompts[i]); (R,) float64.

    With ``references`` (one exact σ sample per run) the runs are conditional SMC / clamped SIS.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose from: {', '.join(SAMPLERS)}")
    K = num_particles
    kappa = 0.0 if sampler == "sis" or K == 1 or proposal.sis else ess_threshold
    chunk = max(1, max_batch_particles // K)
    out = []
    for c, start in enumerate(range(0, len(run_prompts), chunk)):
        idx = list(run_prompts[start : start + chunk])
        ref = None if references is None else list(references[start : start + chunk])
        results = run_smc(
            select_prompts(target, idx),
            K,
            resampler=resampler,
            ess_threshold=kappa,
            seed=derive_seed(seed, c),
            reference=ref,
            **proposal.sampler_kwargs(),
        )
        out.extend(r.log_z for r in results)
        if on_chunk is not None:
            on_chunk(len(idx) * K)
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class BoundEntry:
    """Bounds for one (proposal, K): lower from plain SMC/SIS runs, upper from conditional runs (None without exact
    samples). The per-run log Ẑ values are kept (``lower_values`` / ``upper_values``) but not written to JSON."""

    proposal: str
    num_particles: int
    lower: Estimate
    upper: Estimate | None
    lower_values: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    upper_values: torch.Tensor | None = field(repr=False, default=None)

    def to_dict(self) -> dict:
        return {
            "proposal": self.proposal,
            "num_particles": self.num_particles,
            "lower": self.lower.to_dict(),
            "upper": None if self.upper is None else self.upper.to_dict(),
        }


@dataclass
class BoundsResult:
    """All (proposal, K) bound entries plus the settings that produced them."""

    entries: list[BoundEntry]
    sampler: str
    resampler: str
    ess_threshold: float
    num_runs: int
    num_exact: int
    seed: int

    @property
    def proposals(self) -> list[str]:
        return list(dict.fromkeys(e.proposal for e in self.entries))

    @property
    def particle_counts(self) -> list[int]:
        return sorted({e.num_particles for e in self.entries})

    def entry(self, proposal: str, num_particles: int) -> BoundEntry:
        for e in self.entries:
            if e.proposal == proposal and e.num_particles == num_particles:
                return e
        raise KeyError((proposal, num_particles))

    def tightest(self) -> tuple[float, float]:
        """(largest mean lower bound, smallest mean upper bound) over every proposal and K (±∞ if none)."""
        lower = max((e.lower.mean for e in self.entries if not math.isnan(e.lower.mean)), default=-math.inf)
        upper = min((e.upper.mean for e in self.entries if e.upper is not None), default=math.inf)
        return lower, upper

    def pooled(self) -> tuple[float, float]:
        """Pooled estimates of log Z from every run: (log mean Ẑ_r, −log mean 1/Ẑ⁺_r), each mean over the runs of
        every proposal and K together, clamped into the mean bounds of :meth:`tightest`.

        Every plain run's Ẑ_r is unbiased for Z and every conditional run's 1/Ẑ⁺_r unbiased for 1/Z, so these grand
        means have all the runs' particles' worth of precision and still bound log Z from below and above in
        expectation (Jensen). Pooling across proposals, not picking the best proposal's pooled value, avoids the
        upward (downward) bias of a maximum (minimum) of noisy estimates. (±∞ if none; the mean pair when the per-run
        values are not kept, e.g. read back from JSON.)"""
        mean_lower, mean_upper = self.tightest()
        lowers = [e.lower_values.double() for e in self.entries if e.lower_values.numel()]
        uppers = [e.upper_values.double() for e in self.entries if e.upper_values is not None and e.upper_values.numel()]
        lower = float(log_mean_exp(torch.cat(lowers))) if lowers else mean_lower
        upper = -float(log_mean_exp(-torch.cat(uppers))) if uppers else mean_upper
        return min(max(lower, mean_lower), mean_upper), max(min(upper, mean_upper), mean_lower)

    def best_log_z(self) -> float:
        """log Ẑ_best: midpoint of the tightest pooled lower/upper pair (:meth:`pooled`); the lower estimate alone
        without upper bounds. With K = 1 only, the midpoint of the *mean* bounds would split a KL sum into two equal
        halves by construction; the pooled pair does not."""
        lower, upper = self.pooled()
        if math.isinf(upper):
            return lower
        if math.isinf(lower):
            return upper
        return 0.5 * (lower + upper)

    def to_dict(self) -> dict:
        lower, upper = self.tightest()
        pooled_lower, pooled_upper = self.pooled()
        return {
            "sampler": self.sampler,
            "resampler": self.resampler,
            "ess_threshold": self.ess_threshold,
            "num_runs": self.num_runs,
            "num_exact_samples": self.num_exact,
            "seed": self.seed,
            "tightest_lower": lower,
            "tightest_upper": upper,
            "pooled_lower": pooled_lower,
            "pooled_upper": pooled_upper,
            "log_z_best": self.best_log_z(),
            "entries": [e.to_dict() for e in self.entries],
        }


def run_layout(target: Target, num_runs: int | None) -> list[int]:
    """Prompt index of every run: a one-prompt target repeated ``num_runs`` times, or one run per prompt."""
    if target.num_prompts == 1:
        if num_runs is None or num_runs < 1:
            raise ConfigError(f"num_runs must be a positive integer for a one-prompt target, got {num_runs!r}")
        return [0] * num_runs
    if num_runs not in (None, target.num_prompts):
        raise ConfigError(
            f"a target with {target.num_prompts} prompts runs once per prompt; num_runs={num_runs} does not match"
        )
    return list(range(target.num_prompts))


def log_z_bounds(
    target: Target,
    proposals: Mapping[str, Proposal | str | Twist | tuple],
    particle_counts: Sequence[int] = (1, 4, 16, 64),
    num_runs: int | None = 64,
    exact_samples: Sequence[Sequence[int]] | None = None,
    *,
    sampler: str = "smc",
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    seed: int = 0,
    max_batch_particles: int = 4096,
    progress: ProgressCallback | None = None,
) -> BoundsResult:
    """Lower and upper bounds on log Z for every proposal and every K, each from ``num_runs`` independent runs.

    proposals: name → :class:`Proposal` (or ``"base"``, a Twist, ``(kind, twist)``).
    exact_samples: exact σ samples (generated token ids incl. a finishing stop token), one per run; run i of the
        upper bound clamps exact_samples[i]. With fewer samples than runs, the upper bound uses the first
        len(exact_samples) runs (each sample is used once per (proposal, K), never twice, so runs stay independent).
        A multi-prompt target needs one sample per prompt.
    sampler: "smc" (resampling when ESS < κ·K, κ = ``ess_threshold``) or "sis" (κ = 0).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose from: {', '.join(SAMPLERS)}")
    counts = sorted({int(k) for k in particle_counts})
    if not counts or counts[0] < 1:
        raise ConfigError(f"particle counts must be positive integers, got {list(particle_counts)}")
    props = {name: as_proposal(spec) for name, spec in proposals.items()}
    if not props:
        raise ConfigError("give at least one proposal")
    runs = run_layout(target, num_runs)
    refs = None if exact_samples is None else [list(s) for s in exact_samples]
    if refs is not None and target.num_prompts > 1 and len(refs) != len(runs):
        raise ConfigError(f"need one exact sample per prompt ({len(runs)}), got {len(refs)}")
    upper_runs = [] if refs is None else runs[: len(refs)]
    refs = None if refs is None else refs[: len(upper_runs)]

    total = len(props) * sum(k * (len(runs) + len(upper_runs)) for k in counts)
    done = 0

    def tick(n: int, what: str) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, what)

    common = {"sampler": sampler, "resampler": resampler, "ess_threshold": ess_threshold}
    entries = []
    for name, prop in props.items():
        for K in counts:
            label = f"{name} K={K}"
            low = run_log_z(
                target, runs, K, prop, seed=(seed, name, K, "lower"), max_batch_particles=max_batch_particles,
                on_chunk=partial(tick, what=f"lower {label}"), **common,
            )  # fmt: skip
            up = None
            if upper_runs:
                up = run_log_z(
                    target, upper_runs, K, prop, references=refs, seed=(seed, name, K, "upper"),
                    max_batch_particles=max_batch_particles, on_chunk=partial(tick, what=f"upper {label}"), **common,
                )  # fmt: skip
            entries.append(
                BoundEntry(
                    name, K, Estimate.from_values(low), None if up is None else Estimate.from_values(up), low, up
                )
            )
    return BoundsResult(entries, sampler, resampler, ess_threshold, len(runs), len(upper_runs), seed)
