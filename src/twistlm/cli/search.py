"""``twistlm search``: best-of-N, SMC and twisted SMC at an equal budget of generated tokens per question.

Flow: cheap checks (numbers, task and its options, methods, selection, resampler, twist folder, output path) → the
horizon T (``-T``, else the one the ``--twist`` was trained with, else the task's) and the budget check B ≥ T → load
the model (and the twist) → the questions: with a task that has a dataset (``gsm8k``) the rows of ``-o part=`` (default
**dev** when ``-o data=`` is given: the held-out last ``dev_size`` rows, so a twist is never scored on questions it
trained on) from ``-o index=``
on, at most ``--limit``; otherwise ``task.build(num_prompts=--limit)`` → :func:`twistlm.search.search` with a progress
bar → a table per method (solved and found with 95% Wilson intervals, mean reward, format rate, tokens, wall time) →
optionally ``--json OUT`` (written atomically) with every question's returned solution.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from twistlm.cli.app import app, console, err_console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    check_model,
    check_task_options,
    check_twist,
    check_writable,
    load_model,
    load_twist,
    parse_options,
    write_json,
)
from twistlm.errors import ConfigError
from twistlm.resampling import RESAMPLERS, get_resampler
from twistlm.search import (
    DEFAULT_BATCH,
    DEFAULT_ESS_THRESHOLD,
    METHODS,
    SELECTORS,
    SearchResult,
    default_methods,
    particles_for,
    search,
)
from twistlm.solve import Rate
from twistlm.tasks.registry import Task, get_task
from twistlm.trainloop import CONFIG_NAME

PART_OPTION, DATA_OPTION = "part", "data"
SEARCH_PART = "dev"
"""The part of a task's dev split that ``search`` uses unless ``-o part=`` says otherwise."""


@dataclass
class Settings:
    """The run's settings, as written to the JSON output."""

    model: str
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    max_new_tokens: int | None = None
    particles: int = 0
    methods: list[str] = field(default_factory=list)
    twist: str | None = None
    select: str = "sample"
    resampler: str = "systematic"
    ess_threshold: float = DEFAULT_ESS_THRESHOLD
    limit: int | None = None
    questions: int = 0
    source: str = ""
    batch: int = DEFAULT_BATCH
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ validation


def _check_numbers(tokens: int, limit: int | None, batch: int, max_new_tokens: int | None, ess: float) -> None:
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(ess) and 0.0 <= ess <= 1.0):
        raise ConfigError(f"--ess-threshold must lie in [0, 1], got {ess:g}")


def _methods(spec: str | None, twist: Path | None) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()] if spec else list(default_methods(twist))
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"unknown search method {name!r}; choose from: {', '.join(METHODS)}")
        if METHODS[name].needs_twist and twist is None:
            raise ConfigError(f"method {name!r} needs --twist DIR (a train-twist output)")
    if not names or len(set(names)) != len(names):
        raise ConfigError("--methods must list distinct methods, e.g. best-of-n,smc,twisted-smc")
    return names


def _twist_horizon(twist: Path | None) -> int | None:
    """The horizon T a train-twist output was trained with (its training_config.json), if it says."""
    if twist is None:
        return None
    path = twist.expanduser() / CONFIG_NAME
    try:
        value = json.loads(path.read_text()).get("max_new_tokens") if path.is_file() else None
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _horizon(task: Task, given: int | None, twist: Path | None) -> int | None:
    if given is not None:
        return given
    trained = _twist_horizon(twist)
    if trained is not None:
        return trained
    default = getattr(task, "default_max_new_tokens", None)
    return default if isinstance(default, int) else None


def _with_search_part(task: Task, options: dict[str, Any]) -> dict[str, Any]:
    """``part=dev`` unless given, for tasks with a dev split of a data file (``-o data=``)."""
    if (task.dataset is not None and PART_OPTION in task.options and PART_OPTION not in options
            and options.get(DATA_OPTION) is not None):
        return {**options, PART_OPTION: SEARCH_PART}
    return options


# ---------------------------------------------------------------------------------------------------------- output


def _rate(rate: Rate | None) -> str:
    if rate is None:
        return "–"
    return f"{100 * rate.value:.0f}% [{100 * rate.low:.0f}–{100 * rate.high:.0f}]"


def _summary_table(result: SearchResult) -> Table:
    """Metrics as rows, methods as columns (three methods fit an 80-column terminal)."""
    table = Table(
        title=f"Search at B = {result.budget} tokens per question (T = {result.max_new_tokens}, "
        f"N = K = {result.particles}, {result.num_questions} questions)",
        title_justify="left",
        title_style="bold",
        caption="shares of questions [95% Wilson interval]; 'by': how the returned solution is picked",
        caption_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    methods = list(result.methods.values())
    for m in methods:
        table.add_column(f"{m.method}\nby {m.select}", justify="right", no_wrap=True)
    Q = max(result.num_questions, 1)
    rows = [
        ("solved (returned)", lambda m: _rate(m.solved)),
        ("found (any particle)", lambda m: _rate(m.found)),
        ("mean reward", lambda m: f"{m.mean_reward:.3f}" if math.isfinite(m.mean_reward) else "–"),
        ("format", lambda m: _rate(m.format_rate)),
        ("tokens / question", lambda m: f"{m.tokens / Q:.1f}"),
        ("max tokens / question", lambda m: str(m.max_tokens)),
        ("wall time (s)", lambda m: f"{m.wall_s:.1f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *[cell(m) for m in methods])
    return table


def _print_header(s: Settings, model_label: str) -> None:
    opts = " ".join(f"{k}={v}" for k, v in s.task_options.items())
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, min_width=9)
    grid.add_column(overflow="fold")
    grid.add_row("model", model_label)
    grid.add_row("task", s.task + (f" ({opts})" if opts else ""))
    grid.add_row("questions", f"{s.questions} from {s.source}")
    grid.add_row("budget", f"B = {s.tokens} tokens per question: N = K = {s.particles} particles of T = "
                 f"{s.max_new_tokens}, seed {s.seed}")
    grid.add_row("methods", ", ".join(s.methods) + (f" (twist {s.twist})" if s.twist else "")
                 + f"; SMC: {s.resampler}, κ = {s.ess_threshold:g}, returns by {s.select}")
    console.print(grid)
    console.print()


# --------------------------------------------------------------------------------------------------------- running


def _dataset(task: Task, options: dict[str, Any], limit: int | None):
    """The questions of a task with a dataset (read and checked before any model is loaded), else None."""
    if task.dataset is None:
        return None
    data = task.dataset(**options)
    return data.slice(0, limit) if limit is not None else data


def _questions(lm, task: Task, settings: Settings, data):
    """The target over the questions, and a label of where they come from."""
    options = settings.task_options
    if data is not None:
        template = task.build(lm, max_new_tokens=settings.max_new_tokens, **options)
        last = data.row_number(len(data) - 1)
        return data.target(template), f"rows {data.first_row}–{last} of {data.source}"
    count = settings.limit or 1
    target = task.build(lm, max_new_tokens=settings.max_new_tokens, num_prompts=count, **options)
    return target, f"task {task.name!r} (num_prompts={count})"


def _search(target, task: Task, twist, settings: Settings, quiet: bool) -> SearchResult:
    columns = (
        TextColumn("[bold]searching"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("question runs"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    disable = quiet or not err_console.is_terminal
    with Progress(*columns, console=err_console, transient=True, disable=disable) as progress:
        bar = progress.add_task("searching", total=len(settings.methods) * target.num_prompts)
        return search(
            target,
            settings.tokens,
            methods=settings.methods,
            twist=twist,
            success=task.success,
            formatted=task.formatted,
            select=settings.select,
            resampler=settings.resampler,
            ess_threshold=settings.ess_threshold,
            batch=settings.batch,
            seed=settings.seed,
            callback=lambda done, total: progress.update(bar, completed=done),
        )


@app.command("search")
def search_command(
    task: Annotated[str, typer.Option("--task", help="A registered task, e.g. gsm8k (see `twistlm tasks`).")],
    tokens: Annotated[int, typer.Option("--tokens", "-B", help="Budget B of generated tokens per question.")],
    task_option: Annotated[
        list[str] | None,
        typer.Option("--task-option", "-o", help="Task option key=value (repeatable), e.g. data=PATH, part=dev."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Hub id, model directory, .gguf file or 'toy' (default: the embedded model)."),
    ] = None,
    twist: Annotated[
        Path | None, typer.Option("--twist", help="A trained twist (train-twist output): adds twisted SMC.")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help=f"Comma-separated, from {', '.join(METHODS)} (default: all that apply)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most N questions (default: all).")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-T", help="Horizon T (default: the twist's, else the task's).")
    ] = None,
    select: Annotated[
        str, typer.Option("--select", help=f"What SMC returns: {' | '.join(SELECTORS)} (best-of-N: reward).")
    ] = "sample",
    resampler: Annotated[str, typer.Option("--resampler", help=" | ".join(RESAMPLERS))] = "systematic",
    ess_threshold: Annotated[
        float, typer.Option("--ess-threshold", help="SMC resamples when ESS < κ·K.")
    ] = DEFAULT_ESS_THRESHOLD,
    batch: Annotated[int, typer.Option("--batch", help="Questions per sampler call.")] = DEFAULT_BATCH,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the summary and every question's returned solution here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or header.")] = False,
) -> None:
    """Best-of-N, SMC and twisted SMC at an equal budget of generated tokens per question: solved, found, reward."""
    options = parse_options(task_option)
    _check_numbers(tokens, limit, batch, max_new_tokens, ess_threshold)
    task_obj = get_task(task)
    check_task_options(task_obj, options)
    options = _with_search_part(task_obj, options)
    names = _methods(methods, twist)
    if select not in SELECTORS:
        raise ConfigError(f"unknown --select {select!r}; choose from: {', '.join(SELECTORS)}")
    get_resampler(resampler)
    if twist is not None:
        check_twist(twist.expanduser(), task)
    check_model(model)
    if json_path is not None:
        check_writable(json_path)
    data = _dataset(task_obj, options, limit)
    horizon = _horizon(task_obj, max_new_tokens, twist)
    if horizon is not None:
        particles_for(tokens, horizon)  # B ≥ T, before loading anything
    settings = Settings(
        model=model or EMBEDDED_LABEL,
        task=task_obj.name,
        task_options=options,
        tokens=tokens,
        max_new_tokens=horizon,
        methods=names,
        twist=str(twist) if twist is not None else None,
        select=select,
        resampler=resampler,
        ess_threshold=ess_threshold,
        limit=limit,
        batch=batch,
        seed=seed,
    )
    _run(settings, model, task_obj, twist, json_path, quiet, data)


def _run(settings: Settings, model: str | None, task: Task, twist_path: Path | None, json_path: Path | None,
         quiet: bool, data=None) -> None:
    start = time.perf_counter()
    with loading_status(settings.model, quiet):
        lm = load_model(model)
    twist = load_twist(twist_path, lm) if twist_path is not None else None
    target, source = _questions(lm, task, settings, data)
    settings.max_new_tokens = target.max_new_tokens
    settings.particles = particles_for(settings.tokens, target.max_new_tokens)
    settings.questions, settings.source = target.num_prompts, source
    loaded = time.perf_counter()
    if not quiet:
        _print_header(settings, lm.name if model is None else settings.model)
    result = _search(target, task, twist, settings, quiet)
    done = time.perf_counter()
    console.print(_summary_table(result))
    if not quiet:
        console.print(f"time: load {loaded - start:.1f} s · search {done - loaded:.1f} s", style="dim", highlight=False)
    if json_path is not None:
        data = result.to_dict()
        data["settings"] = {**data["settings"], **asdict(settings)}
        write_json(json_path, {**data, "model_name": lm.name})
        if not quiet:
            console.print(f"wrote {json_path}", style="dim", highlight=False)

