"""``twistlm sample``: draw weighted samples from σ(s) ∝ p0(s | x) φ(s) with SMC and show them.

Flow: validate every cheap option (files, ranges, registry names) → load the model (quietly) → build the target
(a prompt + potential, or a task) → run :func:`twistlm.smc.run_smc` with a progress bar → print the distinct samples
with their normalised weights, log Ẑ and the ESS trace; optionally write everything as JSON.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from twistlm.cli.app import app, console, err_console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    check_model,
    check_policies,
    check_task_options,
    check_twist,
    check_writable,
    load_model,
    load_policy_lm,
    load_twist,
    parse_options,
    write_json,
)
from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import ParticleLM, Prompt
from twistlm.potentials import Potential, potential_from_spec
from twistlm.resampling import RESAMPLERS, get_resampler
from twistlm.result import SMCResult
from twistlm.smc import MAX_SEED, PROPOSALS, run_smc
from twistlm.target import Target
from twistlm.tasks.registry import Task, get_task
from twistlm.trace import SMCTrace
from twistlm.twists.base import Twist

DEFAULT_PARTICLES = 16
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TOP = 10
SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60
"""Longest ESS sparkline; longer traces are bucketed (each character shows the minimum ESS of its bucket)."""
NEWLINE_MARK = "↵"
TRUNCATED_MARK = "…"
LABEL_WIDTH = 9
"""Width of the label column of the header and summary lines ("potential" is the longest label)."""


@dataclass
class Settings:
    """The run's settings, as written to the JSON output."""

    model: str
    prompt: Prompt | None
    potential: str | None
    task: str | None
    task_options: dict[str, Any] = field(default_factory=dict)
    particles: int = DEFAULT_PARTICLES
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    proposal: str = "base"
    twist: str | None = None
    policy: str | None = None
    resampler: str = "systematic"
    ess_threshold: float = 1.0
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ validation


def _read_prompt(prompt: str | None, prompt_file: Path | None, chat: bool) -> Prompt:
    """The prompt from ``--prompt`` or ``--prompt-file`` (one prompt per file), as chat messages with ``--chat``."""
    if prompt is not None and prompt_file is not None:
        raise TwistLMError("give either --prompt or --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise TwistLMError("give a prompt with --prompt TEXT or --prompt-file PATH (or use --task NAME)")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise TwistLMError(f"prompt file not found: {prompt_file}")
        try:
            prompt = prompt_file.read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise TwistLMError(f"prompt file {prompt_file} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        except OSError as exc:
            raise TwistLMError(f"cannot read prompt file {prompt_file}: {exc.strerror or exc}") from exc
        if not prompt.strip():
            raise TwistLMError(f"prompt file is empty: {prompt_file}")
    elif not prompt.strip():
        raise TwistLMError("--prompt is empty: give some text to continue")
    return [{"role": "user", "content": prompt}] if chat else prompt


def _check_numbers(
    particles: int, max_new_tokens: int | None, ess_threshold: float, top: int, seed: int = 0
) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must lie in [0, 2^64 − 1], got {seed}")
    if particles < 1:
        raise ConfigError(f"--particles must be at least 1, got {particles}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ConfigError(f"--ess-threshold κ must lie in [0, 1], got {ess_threshold}")
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")


def _check_sampler(proposal: str, twist: Path | None, resampler: str, policy: Path | None = None,
                   task: str | None = None) -> None:
    if proposal not in PROPOSALS:
        raise ConfigError(f"unknown proposal {proposal!r}; choose from: {', '.join(PROPOSALS)}")
    get_resampler(resampler)
    if proposal == "twisted" and twist is None:
        raise ConfigError("--proposal twisted needs a trained twist: --twist DIR")
    if proposal == "policy" and policy is None:
        raise ConfigError("--proposal policy needs a trained GFlowNet policy: --policy DIR")
    if policy is not None and proposal != "policy":
        raise ConfigError(f"--policy DIR is a proposal: add --proposal policy (got --proposal {proposal})")
    if twist is not None:
        check_twist(twist.expanduser(), task)


# ---------------------------------------------------------------------------------------------------------- output


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", NEWLINE_MARK)


def _completion_cell(text: str, cut_at_t: bool) -> Text:
    """A completion on one line: newlines shown as ↵, a trailing … when it was cut at T rather than ending on EOS."""
    cell = Text(_one_line(text)) if text else Text("(empty)", style="dim")
    if cut_at_t:
        cell.append(TRUNCATED_MARK, style="dim")
    return cell


def _sparkline(values: list[float], top: float) -> str:
    """ESS per step as bars of height ESS / K (bucketed to at most SPARK_WIDTH characters by the bucket minimum)."""
    if not values:
        return ""
    size = math.ceil(len(values) / SPARK_WIDTH)
    values = [v if math.isfinite(v) else 0.0 for v in values]  # a NaN ESS shows as the lowest bar
    buckets = [min(values[i : i + size]) for i in range(0, len(values), size)]
    levels = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[max(0, min(levels, round(levels * v / top)))] for v in buckets)


def _exp_text(log_value: float) -> str:
    """e^x as a short number, or as ``e^x`` itself when it over- or underflows a float."""
    try:
        value = math.exp(log_value)
    except OverflowError:
        value = math.inf
    return f"{value:.3g}" if 0 < value < math.inf else f"e^{log_value:.1f}"


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] → '1–3, 7, 9–10'."""
    parts: list[str] = []
    start = prev = None
    for s in steps + [None]:
        if start is not None and (s is None or s != prev + 1):
            parts.append(str(start) if start == prev else f"{start}–{prev}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    return ", ".join(parts)


def _print_header(s: Settings, model_label: str, prompt_text: str, potential_label: str) -> None:
    algorithm = "SIS" if s.ess_threshold == 0 else f"SMC ({s.resampler} resampling, κ={s.ess_threshold:g})"
    proposal = f"{s.proposal} proposal" + (f", policy {s.policy}" if s.policy else "")
    proposal += f", twist {s.twist}" if s.twist else ""
    lines = [("model", model_label)]
    if s.task:
        opts = " ".join(f"{k}={v}" for k, v in s.task_options.items())
        lines.append(("task", s.task + (f" ({opts})" if opts else "")))
    lines += [
        ("prompt", _one_line(prompt_text)),
        ("potential", potential_label),
        ("sampler", f"{algorithm}, K={s.particles}, T={s.max_new_tokens}, {proposal}, seed {s.seed}"),
    ]
    _print_fields(lines)
    console.print()


def _samples_table(result: SMCResult, top: int) -> tuple[str, Table, list[str]]:
    """Title, table of the top distinct completions by weight (only weight > 0 unless all are zero), footnotes."""
    first: dict[str, tuple[float, bool]] = {}
    for text, lp, by_eos in zip(result.texts, result.log_phi.tolist(), result.finished_by_eos):
        first.setdefault(text, (lp, not by_eos))
    rows = result.distinct()
    dead = math.isinf(result.log_z) and result.log_z < 0
    live = sorted(rows, key=lambda r: -r[2]) if dead else [r for r in rows if r[1] > 0]
    shown = live[:top]
    title = "Completions (all ruled out by φ)" if dead else "Samples from σ ∝ p0·φ"
    # log φ is worth a column only when it varies among the rows (an indicator φ gives 0, or −inf when dead).
    show_phi = len({first[text][0] for text, _, _ in shown}) > 1
    table = Table(expand=False)
    table.add_column("#", justify="right", style="dim")
    if not dead:
        table.add_column("weight", justify="right")
    table.add_column("particles", justify="right")
    if show_phi:
        table.add_column("log φ", justify="right")
    table.add_column("completion", overflow="fold")
    for i, (text, weight, count) in enumerate(shown, 1):
        lp, cut = first[text]
        cells = [str(i)] + ([f"{weight:.3f}"] if not dead else []) + [str(count)] + ([f"{lp:.3g}"] if show_phi else [])
        table.add_row(*cells, _completion_cell(text, cut))
    notes = []
    if len(live) > len(shown):
        notes.append(f"{len(live) - len(shown)} more distinct completions not shown (--top {top})")
    zero = sum(c for _, w, c in rows if w <= 0)
    if zero and not dead:
        notes.append(f"{zero} of {result.num_particles} particles have weight 0 (not shown)")
    if any(cut for _, cut in first.values()):
        notes.append(f"{TRUNCATED_MARK} = cut at --max-new-tokens (no EOS)")
    return title, table, notes


def _print_result(result: SMCResult, top: int, ess_threshold: float, quiet: bool) -> None:
    title, table, notes = _samples_table(result, top)
    console.print(Text(title, style="bold"))
    console.print(table)
    for note in notes:
        console.print(f"  {note}", style="dim", highlight=False)
    K = result.num_particles
    fields: list[tuple[str, str | Text]] = []
    if math.isinf(result.log_z) and result.log_z < 0:
        fields.append(("log Ẑ", "-inf: every particle has weight zero (no completion satisfies φ)"))
        hint = f"with K={K}, outcomes rarer than about 1/K are usually missed: raise -K or -T, or use --proposal "
        fields.append(("hint", Text(hint + "twisted --twist DIR", style="yellow")))
    else:
        z = f"   Ẑ = {_exp_text(result.log_z)}, estimate of Z = E_p0[φ]"
        fields.append(("log Ẑ", Text.assemble(f"{result.log_z:.4f}", (z, "dim"))))
    if not quiet and result.ess:
        t_min = min(range(len(result.ess)), key=lambda i: result.ess[i])
        if result.resampled_at:
            resampled = f"resampled after t = {_ranges(result.resampled_at)}"
        else:
            resampled = "never resampled" + (" (κ = 0: SIS)" if ess_threshold == 0 else " (ESS stayed ≥ κ·K)")
        fields.append(("ESS", Text.assemble((_sparkline(result.ess, K), "cyan"), f"  per step, out of K = {K}")))
        fields.append(("", f"final {result.ess[-1]:.1f}, min {result.ess[t_min]:.1f} at t = {t_min + 1}; {resampled}"))
    _print_fields(fields)


def _print_fields(fields: list[tuple[str, str | Text]]) -> None:
    """Label/value lines; long values wrap under their value column."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, min_width=LABEL_WIDTH)
    grid.add_column(overflow="fold")
    for label, value in fields:
        grid.add_row(label, value)
    console.print(grid)


# ------------------------------------------------------------------------------------------------------- sampling


def _sample_with_progress(
    target: Target, settings: Settings, twist: Twist | None, quiet: bool, trace: SMCTrace | None = None,
    policy: ParticleLM | None = None,
) -> list[SMCResult]:
    kwargs = {
        "proposal": settings.proposal,
        "twist": twist,
        "policy": policy,
        "resampler": settings.resampler,
        "ess_threshold": settings.ess_threshold,
        "seed": settings.seed,
    }
    if quiet:
        return run_smc(target, settings.particles, callback=trace, **kwargs)
    K = settings.particles
    columns = (
        TextColumn("[bold]sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens · ESS {task.fields[ess]:.1f}/" + str(K) + " · finished {task.fields[finished]:.0%}"),
        TimeElapsedColumn(),
    )
    # No bar when stderr is not a terminal (logs, pipes): rich would only leave a stray blank line there.
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        bar = progress.add_task("sampling", total=target.max_new_tokens, ess=float(K), finished=0.0)

        def callback(t: int, T: int, info: dict) -> None:
            progress.update(bar, completed=t, ess=info["ess"], finished=info["finished"])
            if trace is not None:
                trace(t, T, info)

        return run_smc(target, K, callback=callback, **kwargs)


def _build_target(lm: ParticleLM, settings: Settings, task: Task | None, potential: Potential | None) -> Target:
    if task is not None:
        return task.build(lm, max_new_tokens=settings.max_new_tokens, **settings.task_options)
    return Target(lm, prompt=settings.prompt, potential=potential, max_new_tokens=settings.max_new_tokens)


@app.command()
def sample(
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text to continue.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", help="Read the prompt from a file (one prompt per file).")
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send the prompt as a user chat message (chat template).")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Hub id, model directory or .gguf file (default: the embedded SmolLM2-135M)."
        ),
    ] = None,
    potential: Annotated[
        str | None,
        typer.Option("--potential", help="φ as name:arg, e.g. contains:dragon, regex:^The, length:0.1, none."),
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="A registered task (see `twistlm tasks`).")] = None,
    task_option: Annotated[
        list[str] | None, typer.Option("--task-option", "-o", help="Task option key=value (repeatable).")
    ] = None,
    particles: Annotated[int, typer.Option("--particles", "-K", help="Number of particles K.")] = DEFAULT_PARTICLES,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", "-T", help=f"Horizon T (default: {DEFAULT_MAX_NEW_TOKENS}, or the task's)."),
    ] = None,
    proposal: Annotated[
        str,
        typer.Option(
            "--proposal",
            help="base (p0), twisted (p0·ψ, needs --twist) or policy (a GFlowNet policy q_θ, needs --policy; with "
            "--twist, ψ sets the intermediate targets).",
        ),
    ] = "base",
    twist: Annotated[Path | None, typer.Option("--twist", help="Directory of a trained twist.")] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="A GFlowNet LoRA policy folder (train-gfn output) as the proposal.")
    ] = None,
    resampler: Annotated[str, typer.Option("--resampler", help=" | ".join(RESAMPLERS))] = "systematic",
    ess_threshold: Annotated[
        float, typer.Option("--ess-threshold", help="κ: resample when ESS < κ·K (1 = every step, 0 = never).")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML view of the run here (works offline).")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="How many distinct samples to show.")] = DEFAULT_TOP,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, header or ESS trace.")] = False,
) -> None:
    """Sample completions from σ(s) ∝ p0(s | prompt) φ(s) with (twisted) SMC."""
    # Cheap checks first: nothing here loads a model.
    options = parse_options(task_option)
    _check_numbers(particles, max_new_tokens, ess_threshold, top, seed)
    _check_sampler(proposal, twist, resampler, policy, task)
    if policy is not None:  # its files, its task, and the task options it was trained with (filled in)
        if task is not None:
            get_task(task)
        options, horizon = check_policies([policy], task, options, model)
        max_new_tokens = max_new_tokens if max_new_tokens is not None else horizon
    task_obj, prompt_value, potential_obj = _resolve_inputs(task, options, prompt, prompt_file, chat, potential)
    if task_obj is None and max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    check_model(model)
    if json_path is not None:
        check_writable(json_path)
    if html_path is not None:
        check_writable(html_path)
    settings = Settings(
        model=model or EMBEDDED_LABEL,
        prompt=prompt_value,
        potential=potential_obj.name if potential_obj is not None else None,
        task=task,
        task_options=options,
        particles=particles,
        max_new_tokens=max_new_tokens,
        proposal=proposal,
        twist=str(twist) if twist is not None else None,
        policy=str(policy) if policy is not None else None,
        resampler=resampler,
        ess_threshold=ess_threshold,
        seed=seed,
    )
    _run(settings, model, task_obj, potential_obj, json_path, top, quiet, html_path)


def _resolve_inputs(
    task: str | None,
    options: dict[str, Any],
    prompt: str | None,
    prompt_file: Path | None,
    chat: bool,
    potential: str | None,
) -> tuple[Task | None, Prompt | None, Potential | None]:
    """(task, prompt, potential): a task supplies prompt and potential, otherwise they come from the options."""
    if task is None:
        if options:
            raise TwistLMError("--task-option needs --task NAME")
        spec = "none" if potential is None else potential  # an empty --potential is an error, not "none"
        return None, _read_prompt(prompt, prompt_file, chat), potential_from_spec(spec)
    clashing = {"--prompt": prompt, "--prompt-file": prompt_file, "--potential": potential, "--chat": chat or None}
    given = [name for name, value in clashing.items() if value is not None]
    if given:
        raise TwistLMError(f"--task supplies the prompt and potential; drop {', '.join(given)}")
    task_obj = get_task(task)
    check_task_options(task_obj, options)
    return task_obj, None, None


def _run(
    settings: Settings,
    model: str | None,
    task: Task | None,
    potential: Potential | None,
    json_path: Path | None,
    top: int,
    quiet: bool,
    html_path: Path | None = None,
) -> None:
    """Load the model, build the target, sample, print, and write the JSON (and HTML) output."""
    start = time.perf_counter()
    with loading_status(settings.model, quiet):
        lm = load_model(model)
    task_name = task.name if task is not None else None
    policy = load_policy_lm(Path(settings.policy), model, lm, task_name) if settings.policy is not None else None
    loaded = time.perf_counter()
    target = _build_target(lm, settings, task, potential)
    settings.max_new_tokens = target.max_new_tokens
    twist = load_twist(settings.twist, lm) if settings.twist is not None else None
    if not quiet:
        model_label = lm.name if model is None else settings.model
        if isinstance(settings.prompt, list):
            prompt_label = f"{settings.prompt[-1]['content']}  (user chat message)"
        else:
            prompt_label = target.prompt_texts[0]
        potential_label = getattr(target.potential, "name", "task potential")
        _print_header(settings, model_label, prompt_label, potential_label)

    trace = SMCTrace(lm) if html_path is not None else None
    results = _sample_with_progress(target, settings, twist, quiet, trace, policy)
    done = time.perf_counter()

    for b, result in enumerate(results):
        if len(results) > 1:
            console.print(Text.assemble((f"\nprompt {b + 1}/{len(results)}  ", "bold"), _one_line(result.prompt)))
        _print_result(result, top, settings.ess_threshold, quiet)
    if not quiet:
        _print_fields([("time", Text(f"load {loaded - start:.1f} s · sampling {done - loaded:.1f} s", style="dim"))])
    if json_path is not None:
        _write_output(json_path, settings, lm, target, results)
        if not quiet:
            console.print(f"wrote {json_path}", style="dim", highlight=False)
    if html_path is not None:
        _write_html(html_path, settings, lm, target, results, trace)
        if not quiet:
            console.print(f"wrote {html_path}", style="dim", highlight=False)


def _write_html(path: Path, settings: Settings, lm: ParticleLM, target: Target, results: list[SMCResult],
                trace: SMCTrace) -> None:
    """The run page (:mod:`twistlm.html.run_page`): every prompt's particles, ancestry and steps, with the settings."""
    from twistlm.html.run_page import write_run_page

    shown = {**asdict(settings), "model_name": lm.name, "potential": getattr(target.potential, "name", None)}
    write_run_page(path, results, trace, shown, title=f"twistlm sample · {lm.name}")


def _write_output(path: Path, settings: Settings, lm: ParticleLM, target: Target, results: list[SMCResult]) -> None:
    """One prompt: ``{settings, model_name, potential, **result.to_dict()}``; several: ``{..., results: [...]}``."""
    head = {
        "settings": asdict(settings),
        "model_name": lm.name,
        "potential": getattr(target.potential, "name", None),
    }
    if len(results) == 1:
        write_json(path, {**head, **results[0].to_dict()})
    else:
        write_json(path, {**head, "results": [r.to_dict() for r in results]})
