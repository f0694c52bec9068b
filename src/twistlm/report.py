"""The evaluation pipeline and its outputs: bounds on log Z and KL estimates → results.json, bounds.png, kl.png,
report.md (MATH.md, "Bounds on log Z" and "KL estimates").

:func:`evaluate` gathers exact target samples (rejection for bounded φ, BDMC for infilling, or none), the exact log Z
when the target is small enough to enumerate, lower/upper bounds for every proposal and K, and KL estimates from the
K = 1 runs, and a few exact σ samples next to draws from each proposal (:mod:`twistlm.report_samples`).
:func:`write_report` writes the files — results.json, bounds.png, kl.png, report.md and the self-contained
report.html (:mod:`twistlm.html.report_page`) — each atomically (temporary file + rename).

JSON: non-finite numbers are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (a lower bound of −∞ means some
run had every particle at weight zero; a KL of ``"inf"`` means q reaches sequences with φ = 0).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twistlm.bounds import BoundsResult, Estimate, ProgressCallback, log_z_bounds
from twistlm.errors import ConfigError
from twistlm.exact import MAX_ENUMERATED, enumerate_target
from twistlm.files import apply_umask
from twistlm.kl import KLEstimate, kl_estimates, kl_from_bounds
from twistlm.target import Target

if TYPE_CHECKING:
    from twistlm.corpus import SampleCorpus

EXACT_METHODS = ("auto", "rejection", "corpus", "bdmc", "none")
BDMC_SLACK, BDMC_MIN_EXTRA = 4, 4
"""BDMC draws per batch: the runs needed + 1/BDMC_SLACK of them + BDMC_MIN_EXTRA (redrawn when too many stop early)."""


@dataclass
class EvaluationReport:
    """Everything one evaluation produced (see :func:`evaluate`)."""

    bounds: BoundsResult
    kl: dict[str, KLEstimate]
    log_z_exact: float | None = None
    exact: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    log_z_rejection: float | None = None
    examples: dict[str, Any] | None = None
    """A few exact σ samples and draws from each proposal (:func:`twistlm.report_samples.report_examples`)."""

    @property
    def log_z_best(self) -> float:
        """Exact log Z (enumeration) if known; else the rejection estimate where no lower bound is finite (see
        :func:`reference_log_z`); else the midpoint of the pooled bounds."""
        if self.log_z_exact is not None:
            return self.log_z_exact
        if self.log_z_rejection is not None:
            return self.log_z_rejection
        return self.bounds.best_log_z()

    @property
    def log_z_best_source(self) -> str:
        if self.log_z_exact is not None:
            return "exact"
        return "rejection" if self.log_z_rejection is not None else "bounds"

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "log_z_exact": self.log_z_exact,
            "log_z_best": self.log_z_best,
            "log_z_best_source": self.log_z_best_source,
            "log_z_rejection": self.log_z_rejection,
            "exact_samples": self.exact,
            "bounds": self.bounds.to_dict(),
            "kl": {name: k.to_dict() for name, k in self.kl.items()},
            "examples": self.examples,
        }


def exact_log_z(target: Target) -> float | None:
    """Mean over the target's prompts of the enumerated log Z, or None when enumeration is too large."""
    if target.lm.vocab_size**target.max_new_tokens > MAX_ENUMERATED or target.num_prompts > 4096:
        return None
    values = [enumerate_target(target, prompt=b).log_z for b in range(target.num_prompts)]
    return sum(values) / len(values)


def evaluate(
    target: Target,
    proposals: Mapping[str, Any],
    particle_counts: Sequence[int] = (1, 4, 16, 64),
    num_runs: int = 64,
    *,
    exact: str = "auto",
    ending_tokens: int | None = None,
    sampler: str = "smc",
    resampler: str = "systematic",
    ess_threshold: float = 1.0,
    seed: int = 0,
    max_proposals: int = 1_000_000,
    max_batch_particles: int = 4096,
    progress: ProgressCallback | None = None,
    meta: dict[str, Any] | None = None,
    exact_corpus: SampleCorpus | None = None,
) -> EvaluationReport:
    """Bounds and KL estimates for each proposal on prompt 0 of ``target``, from ``num_runs`` runs per (proposal, K).

    exact: where exact σ samples for the upper bounds and KL(σ‖q) come from — "rejection" (needs a bounded φ),
    "bdmc" (infilling: the potential must read the observed ending o as token ids from ``extras["observation"]``,
    as :class:`~twistlm.potentials.likelihood.InfillingPotential` does without a fixed observation; ``ending_tokens``
    = c; see :mod:`twistlm.bdmc`), "corpus" (rejection over the stored p0 draws of ``exact_corpus``, a
    :class:`~twistlm.corpus.SampleCorpus` of this target that trained none of the proposals: no new p0 sampling,
    which for a rare event is most of the cost), "none", or "auto" (corpus if one is given, else rejection if φ is
    bounded).
    """
    from twistlm.bdmc import infilling_problem
    from twistlm.bounds import select_prompts
    from twistlm.rejection import rejection_from_corpus, rejection_sample
    from twistlm.report_samples import report_examples

    if exact not in EXACT_METHODS:
        raise ConfigError(f"unknown exact-sample method {exact!r}; choose from: {', '.join(EXACT_METHODS)}")
    if target.num_prompts > 1:
        target = select_prompts(target, [0])
    if exact == "auto":
        bounded = getattr(target.potential, "bounded", False)
        exact = "corpus" if exact_corpus is not None else "rejection" if bounded else "none"
    if (exact == "corpus") != (exact_corpus is not None):
        raise ConfigError("exact samples from a corpus need both exact='corpus' and a corpus (exact_corpus)")
    samples, info, runs = None, None, num_runs
    if exact == "corpus":
        rej = rejection_from_corpus(exact_corpus, target, num_runs, seed=seed)
        samples, info = rej.token_ids, {**rej.to_dict(), "source": "corpus", "corpus": exact_corpus.info}
        if not samples:
            raise ConfigError(f"the exact-sample corpus has no accepted row among its {rej.num_proposed} samples")
    elif exact == "rejection":
        if progress is not None:
            progress(0, 1, "rejection sampling")
        rej = rejection_sample(
            target, num_runs, max_proposals=max_proposals, allow_partial=True, seed=seed, batch_size=max_batch_particles
        )
        samples, info = rej.token_ids, rej.to_dict()
    elif exact == "bdmc":
        if not ending_tokens:
            raise ConfigError("BDMC needs the number of ending tokens c (ending_tokens)")
        # Early stops are rare over T + c tokens: a batch a little over the runs needed, not max_batch_particles
        # draws of T + c steps each for a handful of runs.
        draws = min(max_batch_particles, num_runs + num_runs // BDMC_SLACK + BDMC_MIN_EXTRA)
        target, samples, res = infilling_problem(target, num_runs, ending_tokens, seed=seed, batch_size=draws)
        info, runs = res.to_dict(), None
    log_z = exact_log_z(target)
    counts = sorted({int(k) for k in particle_counts})
    common = {"max_batch_particles": max_batch_particles}
    bounds = log_z_bounds(
        target, proposals, counts, runs, samples or None, sampler=sampler, resampler=resampler,
        ess_threshold=ess_threshold, seed=seed, progress=progress, **common,
    )  # fmt: skip
    rejection_z = reference_log_z(bounds, info) if log_z is None else None
    ref, source = (log_z, "exact") if log_z is not None else (rejection_z, "rejection")
    if 1 in counts:
        kl = kl_from_bounds(bounds, ref, source)
    else:
        kl = kl_estimates(
            target, proposals, runs, samples or None, log_z=ref, bounds=bounds, seed=seed, log_z_source=source, **common
        )
    meta = {**(meta or {}), "prompt": target.prompt_texts[0], "max_new_tokens": target.max_new_tokens}
    meta.update(exact_method=exact, particle_counts=counts, num_runs=bounds.num_runs)
    examples = report_examples(target, proposals, samples, exact, seed=seed)
    return EvaluationReport(bounds, kl, log_z, info, meta, log_z_rejection=rejection_z, examples=examples)


def reference_log_z(bounds: BoundsResult, exact_info: dict[str, Any] | None) -> float | None:
    """The rejection sampler's log Ẑ (log of its unbiased acceptance-rate estimate of Z) when no proposal has a finite
    lower bound, else None.

    With a rare goal every SIS/SMC run can miss φ > 0 entirely; then the tightest lower bound is −∞ and the midpoint
    rule degenerates to the upper bound alone, which overstates log Z (by ≈ 1.4 nats on the toxicity task), biasing
    both KL estimates. The acceptance rate A / P over all P p0 draws of the rejection sampler is an unbiased estimate
    of Z that exists exactly then (it found the exact samples).
    """
    if exact_info is None or exact_info.get("method") != "rejection" or not exact_info.get("num_accepted"):
        return None
    lower, _ = bounds.tightest()
    return None if math.isfinite(lower) else float(exact_info["log_z_hat"])


# ----- files -----


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _atomic_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    apply_umask(tmp)  # mkstemp makes 0600 files; results are meant to be shared
    return Path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_savefig(fig, path: Path) -> None:
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(report: EvaluationReport, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(_jsonable(report.to_dict()), indent=2, allow_nan=False) + "\n")


def plot_bounds(bounds: BoundsResult, path: str | os.PathLike, log_z: float | None = None) -> None:
    """Lower (solid) and upper (dashed) bounds vs K with 95% CI bands per proposal; log-x axis. ±∞ points omitted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    omitted = sum(1 for e in bounds.entries if not e.lower.finite)
    for i, name in enumerate(bounds.proposals):
        c = colours[i % len(colours)]
        for side, style in (("lower", "-"), ("upper", "--")):
            pts = [(e.num_particles, getattr(e, side)) for e in bounds.entries if e.proposal == name]
            pts = [(k, est) for k, est in pts if est is not None and est.finite]
            if not pts:
                continue
            ks = [k for k, _ in pts]
            ax.plot(ks, [e.mean for _, e in pts], style, marker="o", color=c, label=f"{name} ({side})")
            lo = [e.ci_low if math.isfinite(e.ci_low) else e.mean for _, e in pts]
            hi = [e.ci_high if math.isfinite(e.ci_high) else e.mean for _, e in pts]
            ax.fill_between(ks, lo, hi, color=c, alpha=0.2, linewidth=0)
    if log_z is not None and math.isfinite(log_z):
        ax.axhline(log_z, color="black", linewidth=1, label="log Z (exact)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bounds.particle_counts, [str(k) for k in bounds.particle_counts])
    ax.minorticks_off()
    ax.set_xlabel("particles K" + (f"   ({omitted} lower bound(s) of −∞ not drawn)" if omitted else ""))
    ax.set_ylabel("log Ẑ")
    ax.set_title(f"Bounds on log Z ({bounds.sampler.upper()}, {bounds.num_runs} runs, 95% CI)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def plot_kl(kl: Mapping[str, KLEstimate], path: str | os.PathLike) -> None:
    """Bars of KL(q‖σ) and KL(σ‖q) per proposal with 95% CI error bars; infinite values marked ∞."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(kl)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4))
    width = 0.38
    top = max([abs(e.mean) for k in kl.values() for e in (k.kl_q_sigma, k.kl_sigma_q) if e and e.finite] or [1.0])
    for j, (label, attr) in enumerate((("KL(q‖σ)", "kl_q_sigma"), ("KL(σ‖q)", "kl_sigma_q"))):
        for i, name in enumerate(names):
            est: Estimate | None = getattr(kl[name], attr)
            x = i + (j - 0.5) * width
            if est is None:
                continue
            if not est.finite:
                ax.bar(x, top * 1.1, width, color=f"C{j}", alpha=0.3, hatch="//")
                ax.text(x, top * 1.1, "∞", ha="center", va="bottom")
                continue
            err = [[est.mean - est.ci_low], [est.ci_high - est.mean]] if math.isfinite(est.ci_low) else None
            ax.bar(x, est.mean, width, color=f"C{j}", yerr=err, capsize=4, label=label if i == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("nats")
    ax.set_title("KL estimates from K = 1 weights (95% CI)")
    ax.axhline(0, color="black", linewidth=0.8)
    handles, _labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8)
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def _fmt(est: Estimate | None) -> str:
    if est is None:
        return "—"
    if not math.isfinite(est.mean):
        return "∞" if est.mean > 0 else ("−∞" if est.mean < 0 else "nan")
    half = (est.ci_high - est.ci_low) / 2
    return f"{est.mean:.4f} ± {half:.4f}" if math.isfinite(half) else f"{est.mean:.4f}"


def markdown_report(report: EvaluationReport) -> str:
    """The report: settings, the table (one row per proposal), and the two figures."""
    b, m = report.bounds, report.meta
    kmax = max(b.particle_counts)
    lines = ["# twistlm evaluation", ""]
    for key in ("task", "model", "prompt", "max_new_tokens", "exact_method"):
        if key in m:
            lines.append(f"- **{key}**: {m[key]!r}" if key == "prompt" else f"- **{key}**: {m[key]}")
    lines.append(f"- **sampler**: {b.sampler} (resampler {b.resampler}, κ = {b.ess_threshold}); runs per point: "
                 f"{b.num_runs} (upper bounds: {b.num_exact} exact samples)")  # fmt: skip
    src = {
        "exact": "exact (enumeration)",
        "rejection": "rejection sampler's acceptance rate: no proposal has a finite lower bound",
        "bounds": "midpoint of the pooled bounds",
    }[report.log_z_best_source]
    lines += [f"- **log Ẑ_best** = {report.log_z_best:.4f} ({src})", ""]
    lines.append(
        f"| proposal | KL(q‖σ) | KL(σ‖q) | KL sum | lower log Ẑ (K={kmax}) | upper log Ẑ (K={kmax}) | log Ẑ_best |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name in b.proposals:
        e, k = b.entry(name, kmax), report.kl.get(name)
        kq, ks, tot = (k.kl_q_sigma, k.kl_sigma_q, k.kl_sum) if k else (None, None, None)
        lines.append(
            f"| {name} | {_fmt(kq)} | {_fmt(ks)} | {_fmt(tot)} | {_fmt(e.lower)} | {_fmt(e.upper)} | "
            f"{report.log_z_best:.4f} |"
        )
    lines += [
        "",
        (
            "Values are means ± half-width of 95% Student-t intervals over independent runs. KL(q‖σ) = log Ẑ_best − "
            "mean_q log w and KL(σ‖q) = mean_σ log w − log Ẑ_best use K = 1 weights; their sum needs no log Z."
        ),
        "",
        "![bounds](bounds.png)",
        "",
        "![kl](kl.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(report: EvaluationReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, bounds.png, kl.png, report.md and report.html into ``out_dir`` (created if needed)."""
    from twistlm.html.report_page import write_report_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "bounds.png", "kl.png", "report.md", "report.html")}
    write_json(report, paths["results.json"])
    plot_bounds(report.bounds, paths["bounds.png"], report.log_z_exact)
    plot_kl(report.kl, paths["kl.png"])
    atomic_write_text(paths["report.md"], markdown_report(report))
    write_report_page(report, paths["report.html"])
    return paths
