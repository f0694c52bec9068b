"""``twistlm solve``: decode N answers per problem of a task (temperature or greedy) and score them.

Flow: cheap checks (numbers, task and its options, that the task has answers, model / policy / output paths) → count
the task's problems (its data file, no model) → load the model (and a GFlowNet LoRA policy with ``--policy``) →
build the task's targets (at most :data:`~twistlm.tasks.common.MAX_NUM_PROMPTS` problems each) → :func:`twistlm.solve.
solve` with a progress bar over problems → a summary table (single-sample accuracy, majority@N, pass@N, unparsed
share, each with a 95% Wilson interval; see :mod:`twistlm.solve`) → optionally a JSON file with every problem's
samples and answers.
"""

from __future__ import annotations

import inspect
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
    check_writable,
    load_model,
    load_policy_lm,
    parse_options,
    write_json,
)
from twistlm.errors import ConfigError, TwistLMError
from twistlm.solve import DEFAULT_BATCH, DEFAULT_SAMPLES, DEFAULT_TEMPERATURE, Rate, SolveResult, solve
from twistlm.tasks.registry import Task, answer_tasks, get_task

INDEX_OPTION = "index"


@dataclass
class Settings:
    """The run's settings, as written to the JSON output."""

    model: str
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    samples: int = DEFAULT_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    max_new_tokens: int | None = None
    first: int = 0
    problems: int = 0
    batch: int = DEFAULT_BATCH
    seed: int = 0


# ------------------------------------------------------------------------------------------------------ validation


def _check_numbers(samples: int, temperature: float, limit: int | None, batch: int, max_new_tokens: int | None) -> None:
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {temperature:g}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def _answer_task(name: str | None) -> Task:
    """The task, which must have answers to grade."""
    working = ", ".join(answer_tasks()) or "(none)"
    if name is None:
        raise TwistLMError(f"give a task with --task NAME; tasks with answers: {working}")
    task = get_task(name)
    if task.answer is None:
        raise ConfigError(f"task {name!r} has no answers to grade; `twistlm solve` works with: {working}")
    return task


def _check_policy(policy: Path | None) -> None:
    if policy is not None:
        from twistlm.gfn.policy import read_policy_info

        read_policy_info(policy.expanduser())


def _takes_index(task: Task) -> bool:
    return INDEX_OPTION in inspect.signature(task.build).parameters


def _problem_range(task: Task, options: dict[str, Any], limit: int | None) -> tuple[int, int]:
    """(first problem, number of problems): from ``-o index=`` on, at most ``--limit``, within the task's data."""
    total = task.answer.count(**options)  # checks the option values (and reads the data file) first
    first = int(options.get(INDEX_OPTION, 0))
    if first >= total:
        raise ConfigError(f"task {task.name!r}: index {first} is past the last problem (the data has {total})")
    available = total - first
    count = available if limit is None else min(limit, available)
    if not _takes_index(task) and count > _max_prompts():
        raise ConfigError(f"task {task.name!r} has {count} problems but no index option: use --limit {_max_prompts()}")
    return first, count


def _max_prompts() -> int:
    from twistlm.tasks.common import MAX_NUM_PROMPTS

    return MAX_NUM_PROMPTS


# ---------------------------------------------------------------------------------------------------------- output


def _rate_cells(rate: Rate) -> tuple[str, str]:
    return f"{100 * rate.value:.1f}%", f"{100 * rate.low:.1f}–{100 * rate.high:.1f}%"


def _summary_table(result: SolveResult) -> Table:
    N = result.samples
    table = Table(title="Solve summary", title_justify="left", title_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI (Wilson)", justify="right")
    table.add_row("problems", str(result.num_problems), "")
    rows = [
        ("single-sample accuracy", result.accuracy),
        (f"majority@{N}", result.majority_accuracy),
        (f"pass@{N}", result.pass_at_n),
        ("unparsed", result.unparsed),
    ]
    for label, rate in rows:
        table.add_row(label, *_rate_cells(rate))
    return table


def _print_header(s: Settings, model_label: str) -> None:
    opts = " ".join(f"{k}={v}" for k, v in s.task_options.items())
    decoding = "greedy (τ = 0, one run per problem)" if s.temperature == 0 else f"temperature τ = {s.temperature:g}"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, min_width=8)
    grid.add_column(overflow="fold")
    grid.add_row("model", model_label + (f" + policy {s.policy}" if s.policy else ""))
    grid.add_row("task", s.task + (f" ({opts})" if opts else ""))
    grid.add_row("problems", f"{s.problems} from index {s.first}")
    grid.add_row("decoding", f"{decoding}, N = {s.samples} samples per problem, T = {s.max_new_tokens}, seed {s.seed}")
    console.print(grid)
    console.print()


# --------------------------------------------------------------------------------------------------------- solving


def _solve_all(lm, task: Task, settings: Settings, quiet: bool, decoder=None) -> SolveResult:
    """Build the targets chunk by chunk and solve them with one generator (progress bar over problems)."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    chunk = _max_prompts()
    starts = list(range(settings.first, settings.first + settings.problems, chunk))
    columns = (
        TextColumn("[bold]solving"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("problems"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    disable = quiet or not err_console.is_terminal
    parts = []
    with Progress(*columns, console=err_console, transient=True, disable=disable) as progress:
        bar = progress.add_task("solving", total=settings.problems)
        for start in starts:
            size = min(chunk, settings.first + settings.problems - start)
            options = dict(settings.task_options)
            if _takes_index(task):
                options[INDEX_OPTION] = start
            target = task.build(lm, max_new_tokens=settings.max_new_tokens, num_prompts=size, **options)
            settings.max_new_tokens = target.max_new_tokens
            done_before = start - settings.first

            def callback(done: int, total: int, offset: int = done_before) -> None:
                progress.update(bar, completed=offset + done)

            parts.append(
                solve(
                    target,
                    task.answer.read,
                    task.answer.gold(target),
                    samples=settings.samples,
                    temperature=settings.temperature,
                    batch=settings.batch,
                    generator=gen,
                    callback=callback,
                    decoder=decoder,
                )
            )
    return SolveResult.concatenate(parts)


@app.command("solve")
def solve_command(
    task: Annotated[
        str | None, typer.Option("--task", help="A task with answers: arithmetic, gsm8k, subjectivity.")
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option("--task-option", "-o", help="Task option key=value (repeatable), e.g. data=PATH, index=N."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Hub id, model directory or .gguf file (default: the embedded SmolLM2-135M)."
        ),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="A GFlowNet LoRA policy folder (train-gfn output) to decode with.")
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Samples N per problem (majority@N, pass@N).")
    ] = DEFAULT_SAMPLES,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            "-t",
            help=f"Sampling temperature τ, q ∝ p0^(1/τ); 0 = greedy. Default {DEFAULT_TEMPERATURE:g}: low-temperature "
            "majority voting as in the GFlowNet paper's arithmetic evaluation; raise it (e.g. 0.7) for more diverse "
            "samples and a higher pass@N.",
        ),
    ] = DEFAULT_TEMPERATURE,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-T", help="Horizon T (default: the task's).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Solve at most N problems (from -o index=, default 0; default all).")
    ] = None,
    batch: Annotated[
        int, typer.Option("--batch", help="Problems per sampler call (batch·N sequences in memory at once).")
    ] = DEFAULT_BATCH,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write per-problem samples and answers and the summary here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or header.")] = False,
) -> None:
    """Sample N answers per problem of a task (temperature τ, or greedy) and report accuracy, majority@N, pass@N."""
    options = parse_options(task_option)
    _check_numbers(samples, temperature, limit, batch, max_new_tokens)
    task_obj = _answer_task(task)
    check_task_options(task_obj, options)
    check_model(model)
    _check_policy(policy)
    if policy is not None:  # the policy's own task options (e.g. arithmetic form=latent) unless given here
        from twistlm.gfn.policy import read_policy_info

        info = read_policy_info(policy.expanduser())
        options = {**info.get("task_options", {}), **options}
        if max_new_tokens is None:
            max_new_tokens = info.get("max_new_tokens")
    if json_path is not None:
        check_writable(json_path)
    first, count = _problem_range(task_obj, options, limit)
    settings = Settings(
        model=model or EMBEDDED_LABEL,
        task=task_obj.name,
        task_options=options,
        policy=str(policy) if policy is not None else None,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        first=first,
        problems=count,
        batch=batch,
        seed=seed,
    )
    _run(settings, model, task_obj, policy, json_path, quiet)


def _run(settings: Settings, model: str | None, task: Task, policy: Path | None, json_path: Path | None, quiet: bool):
    start = time.perf_counter()
    with loading_status(settings.model, quiet):
        lm = load_model(model)
    model_label = lm.name if model is None else settings.model
    decoder = None
    if policy is not None:
        from twistlm.gfn.policy import load_action_space
        from twistlm.gfn.sampling import policy_decoder

        # A private copy: the adapter is injected into the model it is loaded on, and the cached base must stay p0.
        lm = load_policy_lm(policy, model, lm, task.name)
        space = load_action_space(policy.expanduser())
        decoder = policy_decoder(space) if space is not None else None
    loaded = time.perf_counter()
    if not quiet:
        shown = settings.max_new_tokens
        settings.max_new_tokens = shown or getattr(task, "default_max_new_tokens", None)
        _print_header(settings, model_label)
        settings.max_new_tokens = shown
    result = _solve_all(lm, task, settings, quiet, decoder)
    done = time.perf_counter()
    console.print(_summary_table(result))
    if not quiet:
        console.print(f"time: load {loaded - start:.1f} s · solving {done - loaded:.1f} s", style="dim", highlight=False)
    if json_path is not None:
        write_json(json_path, {"settings": asdict(settings), "model_name": lm.name, **result.to_dict()})
        if not quiet:
            console.print(f"wrote {json_path}", style="dim", highlight=False)
