"""``twistlm evaluate``: bounds on log Z and KL estimates for the base proposal, trained twists and GFlowNet policies
on a task.

Flow: cheap checks (particle list, registry names, twist and policy folders, output folder) → load the model (and each
``--policy`` on its own copy of it) → build the task's target → exact samples (rejection / BDMC / none) → lower and
upper bounds for every (proposal, K) with a progress bar → KL estimates from the K = 1 runs → results.json,
bounds.png, kl.png, report.md, report.html in ``--out`` (see :mod:`twistlm.report`). ``--model toy`` loads
``twistlm.ToyLM(vocab_size=5, seed=1)``: a testing aid, so the whole pipeline runs in seconds (with small T its targets
are enumerated and the exact log Z is reported).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from twistlm.bounds import Proposal
from twistlm.cli.app import app, console, err_console, loading_status
from twistlm.cli.common import (
    TOY_MODEL,
    check_model,
    check_policies,
    check_task_options,
    check_twist,
    load_model,
    load_policy_lm,
    load_twist,
    parse_options,
)
from twistlm.corpus import load_corpus
from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import ParticleLM
from twistlm.report import EXACT_METHODS, write_report
from twistlm.report import evaluate as run_evaluation
from twistlm.resampling import RESAMPLERS
from twistlm.tasks.registry import get_task
from twistlm.twists.base import Twist

DEFAULT_PARTICLES = "1,4,16,64,256"
SMC_ROW = "+ SMC"
"""Suffix of the rows that run a policy inside SMC (the plain policy row is importance sampling)."""


def _parse_particles(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--particles must be comma-separated integers, got {text!r}") from exc
    if not counts or counts[0] < 1:
        raise ConfigError(f"--particles must be positive integers, got {text!r}")
    return counts


def _parse_chunks(text: str | None, corpus: Path | None) -> range | None:
    if text is None:
        return None
    if corpus is None:
        raise ConfigError("--exact-chunks selects chunks of --exact-corpus; give --exact-corpus DIR too")
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError as exc:
        raise ConfigError(f"--exact-chunks must be A:B (two chunk numbers), got {text!r}") from exc
    if not 0 <= start < stop:
        raise ConfigError(f"--exact-chunks A:B needs 0 ≤ A < B, got {text!r}")
    return range(start, stop)


def _twist_names(paths: list[Path], prefix: str = "twist") -> list[str]:
    names: list[str] = []
    for p in paths:
        base = f"{prefix}:{p.name or p.resolve().name}"
        name, i = base, 2
        while name in names or name == "base":
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def _policy_proposals(policies: dict[str, ParticleLM], twists: dict[str, Twist], sampler: str) -> dict[str, Proposal]:
    """The rows of each --policy q_θ: ``NAME`` is importance sampling with q_θ alone (κ = 0 whatever --sampler);
    with --sampler smc also ``NAME + SMC`` (SMC with q_θ as the proposal, resampling like the other rows) and
    ``NAME + TWIST + SMC`` per --twist (the twist's intermediate targets p0 ψ_t, q_θ still proposing)."""
    rows: dict[str, Proposal] = {}
    for name, q in policies.items():
        rows[name] = Proposal("policy", policy=q, sis=True)
        if sampler == "smc":
            rows[f"{name} {SMC_ROW}"] = Proposal("policy", policy=q)
            for twist_name, twist in twists.items():
                rows[f"{name} + {twist_name} {SMC_ROW}"] = Proposal("policy", twist=twist, policy=q)
    return rows


def _summary(report) -> Table:
    kmax = max(report.bounds.particle_counts)
    table = Table(title=f"log Ẑ_best = {report.log_z_best:.4f}", title_style="bold")
    for col in ("proposal", "KL(q‖σ)", "KL(σ‖q)", f"lower K={kmax}", f"upper K={kmax}"):
        table.add_column(col, justify="left" if col == "proposal" else "right")

    def cell(e) -> str:
        if e is None:
            return "—"
        return f"{e.mean:.4f}" if math.isfinite(e.mean) else ("∞" if e.mean > 0 else "−∞")

    for name in report.bounds.proposals:
        e, k = report.bounds.entry(name, kmax), report.kl.get(name)
        table.add_row(name, cell(k and k.kl_q_sigma), cell(k and k.kl_sigma_q), cell(e.lower), cell(e.upper))
    return table


@app.command()
def evaluate(
    task: Annotated[str, typer.Option("--task", help="A registered task (see `twistlm tasks`).")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.json, bounds.png, kl.png, report.md, report.html.")
    ],
    task_option: Annotated[
        list[str] | None, typer.Option("--task-option", "-o", help="Task option key=value (repeatable).")
    ] = None,
    twist: Annotated[
        list[Path] | None,
        typer.Option("--twist", help="Directory of a trained twist; each adds a twisted proposal (repeatable)."),
    ] = None,
    policy: Annotated[
        list[Path] | None,
        typer.Option(
            "--policy",
            help="A GFlowNet policy folder (train-gfn output; repeatable): rows 'policy:NAME' (importance sampling "
            "with it), and with --sampler smc 'policy:NAME + SMC' and 'policy:NAME + twist:T + SMC' per --twist.",
        ),
    ] = None,
    particles: Annotated[
        str, typer.Option("--particles", "-K", help="Particle counts K, comma-separated.")
    ] = DEFAULT_PARTICLES,
    seeds: Annotated[int, typer.Option("--seeds", help="Independent runs per (proposal, K).")] = 32,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Hub id, model directory, .gguf file, or 'toy' (testing aid)."),
    ] = None,
    exact: Annotated[
        str, typer.Option("--exact", help="Exact σ samples for upper bounds: auto | rejection | corpus | bdmc | none.")
    ] = "auto",
    exact_corpus: Annotated[
        Path | None,
        typer.Option(
            "--exact-corpus",
            help="A p0 corpus of this target (a train-twist corpus folder) whose rows serve as rejection proposals "
            "(--exact corpus; implied): no new p0 draws. It must not be the corpus a --twist trained on.",
        ),
    ] = None,
    exact_chunks: Annotated[
        str | None,
        typer.Option("--exact-chunks", help="Only these chunks of --exact-corpus, A:B (chunk A to B − 1)."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-T", help="Horizon T (default: the task's).")
    ] = None,
    ending_tokens: Annotated[int, typer.Option("--ending-tokens", help="BDMC: length c of the sampled ending o.")] = 8,
    sampler: Annotated[str, typer.Option("--sampler", help="smc or sis.")] = "smc",
    resampler: Annotated[str, typer.Option("--resampler", help=" | ".join(RESAMPLERS))] = "systematic",
    ess_threshold: Annotated[
        float, typer.Option("--ess-threshold", help="κ: resample when ESS < κ·K (1 = every step).")
    ] = 1.0,
    max_proposals: Annotated[
        int, typer.Option("--max-proposals", help="Rejection sampling budget (p0 samples).")
    ] = 200_000,
    batch_particles: Annotated[
        int, typer.Option("--batch-particles", help="Most particles per sampler call (memory: KV cache per particle).")
    ] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary table.")] = False,
) -> None:
    """Lower/upper bounds on log Z and KL(q‖σ), KL(σ‖q) for the base proposal, each --twist and each --policy."""
    # Cheap checks first: nothing here loads a model.
    counts = _parse_particles(particles)
    options = parse_options(task_option)
    if seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 (confidence intervals), got {seeds}")
    if exact not in EXACT_METHODS:
        raise ConfigError(f"unknown --exact {exact!r}; choose from: {', '.join(EXACT_METHODS)}")
    chunks = _parse_chunks(exact_chunks, exact_corpus)
    if exact == "corpus" and exact_corpus is None:
        raise ConfigError("--exact corpus needs --exact-corpus DIR")
    if exact_corpus is not None and exact not in ("auto", "corpus"):
        raise ConfigError(f"--exact-corpus is a source of exact samples; it cannot be combined with --exact {exact}")
    if sampler not in ("smc", "sis"):
        raise ConfigError(f"unknown --sampler {sampler!r}; choose from: smc, sis")
    if resampler not in RESAMPLERS:
        raise ConfigError(f"unknown resampler {resampler!r}; choose from: {', '.join(RESAMPLERS)}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ConfigError(f"--ess-threshold κ must lie in [0, 1], got {ess_threshold}")
    if batch_particles < 1:
        raise ConfigError(f"--batch-particles must be positive, got {batch_particles}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    twists = list(twist or [])
    for path in twists:
        check_twist(path, task)
    task_obj = get_task(task)
    policies = list(policy or [])
    options, horizon = check_policies(policies, task, options, model)  # the policies' task options filled in
    max_new_tokens = max_new_tokens if max_new_tokens is not None else horizon
    check_task_options(task_obj, options)
    if model != TOY_MODEL:
        check_model(model)
    if out.exists() and not out.is_dir():
        raise TwistLMError(f"--out {out} exists and is not a folder")

    with loading_status(model or 'embedded', quiet):
        lm = load_model(model)
    target = task_obj.build(lm, max_new_tokens=max_new_tokens, **options)
    pool = None if exact_corpus is None else load_corpus(exact_corpus, target, chunks=chunks)
    proposals: dict[str, Any] = {"base": "base"}
    for name, path in zip(_twist_names(twists), twists):
        proposals[name] = ("twisted", load_twist(path, lm))
    meta = {
        "task": task,
        "task_options": options,
        "model": model or "embedded",
        "twists": {name: str(p) for name, p in zip(list(proposals)[1:], twists)},
        "seed": seed,
    }
    if policies:  # each on its own copy of the base model (the adapter is injected into the model it is loaded on)
        loaded = {n: load_policy_lm(p, model, lm, task) for n, p in zip(_twist_names(policies, "policy"), policies)}
        twisted = {name: spec[1] for name, spec in proposals.items() if name != "base"}
        proposals.update(_policy_proposals(loaded, twisted, sampler))
        meta["policies"] = {name: str(p) for name, p in zip(loaded, policies)}
    kwargs = {
        "exact": exact, "ending_tokens": ending_tokens, "sampler": sampler, "resampler": resampler,
        "ess_threshold": ess_threshold, "seed": seed, "max_proposals": max_proposals,
        "max_batch_particles": batch_particles, "meta": meta, "exact_corpus": pool,
    }  # fmt: skip
    if quiet:
        report = run_evaluation(target, proposals, counts, seeds, **kwargs)
    else:
        columns = (
            TextColumn("[bold]{task.description:<28}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console, transient=True) as progress:
            bar = progress.add_task("preparing", total=1)

            def on_progress(done: int, total: int, what: str) -> None:
                progress.update(bar, completed=done, total=total, description=what)

            report = run_evaluation(target, proposals, counts, seeds, progress=on_progress, **kwargs)
    paths = write_report(report, out)
    if not quiet:
        if report.exact and report.exact.get("method") == "rejection" and not report.exact.get("complete", True):
            err_console.print(
                f"[yellow]warning:[/] rejection sampling accepted {report.exact['num_accepted']} of "
                f"{report.exact['num_requested']} samples (acceptance rate {report.exact['acceptance_rate']:.3g}); "
                "upper bounds use that many runs",
                highlight=False,
            )
        console.print(_summary(report))
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}", style="dim", highlight=False)
