"""``twistlm infill``: fill the missing 4th sentence of Story Cloze stories and score it against the true one.

Flow: cheap checks (numbers, methods, data file, policy folders, output path) → load the model (each ``--policy`` on
its own copy) → the infilling task in ``mode=stories`` over ``--limit`` stories from ``--index`` →
:func:`twistlm.infill_eval.infill` with a progress bar → a table (BLEU-4, GLEU, embedding similarity with 95% CIs,
seconds) → optionally ``--json OUT`` (atomic) with every infill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from twistlm.cli.app import app, console, err_console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    check_model,
    check_writable,
    load_model,
    load_policy_lm,
    method_names,
    write_json,
)
from twistlm.errors import ConfigError
from twistlm.infill_eval import DEFAULT_BATCH, DEFAULT_PARTICLES, METHODS, infill, policy_method
from twistlm.tasks.registry import get_task
from twistlm.text_overlap import check_scorers

TASK = "infilling"
DEFAULT_METHODS = "p0,prompt,smc"
DEFAULT_LIMIT = 100


def _policy_names(policies: list[Path]) -> list[str]:
    names = [p.expanduser().resolve().name for p in policies]
    if len(set(names)) != len(names) or set(names) & set(METHODS):
        names = [f"policy{k + 1}" for k in range(len(policies))]
    return names


def _table(result, title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold",
                  caption="95% intervals: bootstrap over stories (BLEU, GLEU), mean ± 1.96 SE (similarity)",
                  caption_justify="left")
    for col in ("method", "BLEU-4", "GLEU", "similarity", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col != "method")
    for m in result.methods:
        b, g, s = m.scores["bleu"], m.scores["gleu"], m.scores["similarity"]
        table.add_row(m.name, f"{b.value:.1f} [{b.low:.1f}–{b.high:.1f}]", f"{g.value:.3f} [{g.low:.3f}–{g.high:.3f}]",
                      f"{s.value:.2f} [{s.low:.2f}–{s.high:.2f}]", f"{m.seconds:.0f}")
    return table


@app.command("infill")
def infill_command(
    data: Annotated[Path, typer.Option("--data", help="Story Cloze CSV (e.g. ../shared/data/stories/storycloze_val.csv).")],
    index: Annotated[int, typer.Option("--index", help="First story (rows before it can be a training split).")] = 0,
    limit: Annotated[int, typer.Option("--limit", help="Stories to infill.")] = DEFAULT_LIMIT,
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated: {', '.join(METHODS)}.")] = DEFAULT_METHODS,
    policy: Annotated[
        list[Path] | None, typer.Option("--policy", help="A train-gfn output (GFN or SFT policy); repeatable.")
    ] = None,
    particles: Annotated[int, typer.Option("--particles", "-K", help="Particles of the smc method.")] = DEFAULT_PARTICLES,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-T", help="Horizon (task default).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Hub id, model directory or .gguf file.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    batch: Annotated[int, typer.Option("--batch", help="Stories sampled side by side.")] = DEFAULT_BATCH,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every infill and score here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Infill Story Cloze's missing sentence with base, prompted, SMC and trained policies; BLEU, GLEU, similarity."""
    for name, value in (("--limit", limit), ("--particles", particles), ("--batch", batch)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if index < 0:
        raise ConfigError(f"--index must be ≥ 0, got {index}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    names = method_names(methods, METHODS, "infill method", " (and --policy DIR)")
    policies = list(policy or [])
    if not names and not policies:
        raise ConfigError("nothing to run: give --methods and/or --policy")
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such file")
    if json_out is not None:
        check_writable(json_out)
    from twistlm.data import load_storycloze

    available = len(load_storycloze(str(data)))
    if index + limit > available:
        raise ConfigError(f"--index {index} + --limit {limit} exceeds the {available} stories in {data}")
    from twistlm.gfn.policy import load_action_space, read_policy_info

    for path in policies:
        read_policy_info(path.expanduser())  # a missing folder or file is named before any model loads
    check_scorers(None)
    check_model(model)

    with loading_status(model or EMBEDDED_LABEL, quiet):
        lm = load_model(model)
        run = {name: METHODS[name] for name in names}
        for name, path in zip(_policy_names(policies), policies):
            run[name] = policy_method(load_policy_lm(path, model, lm, TASK), load_action_space(path.expanduser()))
    target = get_task(TASK).build(lm, num_prompts=limit, max_new_tokens=max_new_tokens, mode="stories",
                                  data=str(data), index=index)
    settings = {"particles": particles}
    if quiet:
        result = infill(target, run, seed=seed, batch=batch, settings=settings)
    else:
        columns = (TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task_id = bar.add_task("infilling", total=len(run) * limit)

            def on_progress(done: int, total: int, what: str) -> None:
                bar.update(task_id, completed=done, total=total, description=what)

            result = infill(target, run, seed=seed, batch=batch, settings=settings, progress=on_progress)
    title = (f"Infilling stories {index}–{index + limit - 1} of {data.name} (T = {target.max_new_tokens}, one infill "
             f"per story, smc K = {particles}, seed {seed})")
    console.print(_table(result, title))
    if json_out is not None:
        payload = {"settings": {"data": str(data), "index": index, "limit": limit, "methods": list(run),
                                "policies": {n: str(p) for n, p in zip(_policy_names(policies), policies)},
                                "particles": particles, "max_new_tokens": target.max_new_tokens, "seed": seed,
                                "model": model or EMBEDDED_LABEL},
                   **result.to_dict()}
        write_json(json_out, payload)
        console.print(f"wrote {json_out}", style="dim", highlight=False)
