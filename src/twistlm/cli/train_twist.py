"""``twistlm train-twist``: learn a twist ψ for a task with CTL, RL, SIXO or FUDGE and save it.

Flow: validate every cheap option (loss, twist kind, task, numbers) → load the model → build the task's target →
build an untrained twist of the chosen kind → :class:`~twistlm.training.TwistTrainer` with a progress bar → the output
folder holds the twist (``twist.safetensors`` + ``twist_config.json``, loadable with
:func:`twistlm.twists.io.load_twist` or ``twistlm sample --twist DIR``), ``training_config.json``,
``log_history.json``, ``training_curve.png`` and the ``checkpoint-N`` folders that ``--resume`` continues from.

``--model toy`` uses the seeded toy LM (``ToyLM(vocab_size=5, seed=1)``): a testing aid with the tabular twist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from twistlm.cli import prompt_batches
from twistlm.cli.app import app, console, err_console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    TOY_MODEL,
    check_model,
    check_task_options,
    config_options,
    load_model,
    parse_options,
    run_training,
)
from twistlm.corpus_training import make_twist_trainer
from twistlm.errors import ConfigError, TwistLMError
from twistlm.losses import LOSSES, get_loss
from twistlm.recipes import twist_recipe
from twistlm.tasks.registry import get_task
from twistlm.training import CURVE_NAME, POSITIVE_SOURCES, TwistTrainingConfig
from twistlm.twists import io as twist_io

TWIST_KINDS_HELP = "linear | mlp | embedding | tabular (toy) | conditional | lora | ratio"


PROGRESS_KEYS = (("loss", "loss"), ("ess", "ESS/K"), ("log_z", "log Ẑ"))


FLAG_FIELDS = (
    "output_dir",
    "loss",
    "learning_rate",
    "max_steps",
    "num_particles",
    "proposal",
    "positives",
    "seed",
    "logging_steps",
    "save_steps",
    "resume",
    "overwrite",
)
"""Config fields that have their own flag (``--train-option`` refuses them, so one setting has one spelling)."""


def training_options(options: dict) -> dict:
    """``--train-option`` values checked against :class:`TwistTrainingConfig` and converted to the field's type."""
    return config_options(TwistTrainingConfig, options, FLAG_FIELDS)


CORPUS_REPORTS = 4
"""How many progress lines a corpus build prints (at each quarter)."""


def corpus_progress(done: int, total: int) -> None:
    """One line per quarter of a corpus build (it runs before the training bar starts)."""
    quarter = max(1, total // CORPUS_REPORTS)
    if done == total or done // quarter != (done - 1) // quarter:
        err_console.print(f"drawing the p0 corpus: {done}/{total} samples per prompt", highlight=False)


@app.command("train-twist")
def train_twist(
    task: Annotated[str, typer.Option("--task", help="A registered task (see `twistlm tasks`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (twist, config, curves, checkpoints).")],
    task_option: Annotated[
        list[str] | None, typer.Option("--task-option", "-o", help="Task option key=value (repeatable).")
    ] = None,
    loss: Annotated[str, typer.Option("--loss", help=" | ".join(LOSSES))] = "ctl",
    twist_kind: Annotated[
        str | None, typer.Option("--twist-kind", help=TWIST_KINDS_HELP + " (default: the loss's recipe)")
    ] = None,
    twist_option: Annotated[
        list[str] | None, typer.Option("--twist-option", help="Twist option key=value, e.g. width=128 (repeatable).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer updates (default: the recipe's).")] = None,
    particles: Annotated[
        int | None, typer.Option("--particles", "-K", help="Negatives per prompt per update (default: the recipe's).")
    ] = None,
    positives: Annotated[
        str | None,
        typer.Option("--positives", help=" | ".join(POSITIVE_SOURCES) + " (on-policy sampling; default: smc)"),
    ] = None,
    proposal: Annotated[
        str | None, typer.Option("--proposal", help="Negatives from base | twisted (default: the loss's choice).")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", "--lr", help="AdamW learning rate (default: the recipe's).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-T", help="Horizon T (default: the task's).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Hub id, model directory, .gguf file, or 'toy' (default: embedded)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    train_option: Annotated[
        list[str] | None,
        typer.Option(
            "--train-option",
            "-t",
            help="Any other TwistTrainingConfig field as key=value, e.g. max_grad_norm=1 (repeatable).",
        ),
    ] = None,
    logging_steps: Annotated[
        int | None, typer.Option("--logging-steps", help="Log every N updates (default: the recipe's, else 10).")
    ] = None,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N updates (0: never).")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run in a non-empty --out (default: refuse).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Train a twist ψ for a task (CTL, RL, SIXO or FUDGE) and save it with its config and training curves."""
    # Cheap checks first: nothing here loads a model.
    loss_spec = get_loss(loss)
    user_options = parse_options(task_option)
    recipe = twist_recipe(loss, twist_kind, task, user_options)
    twist_kind = twist_kind or recipe.twist_kind
    twist_io.get_twist_kind(twist_kind)
    task_obj = get_task(task)
    options = {**recipe.task_options, **user_options}
    check_task_options(task_obj, options)
    twist_options = parse_options(twist_option)
    if twist_kind == recipe.twist_kind:
        twist_options = {**recipe.twist_options, **twist_options}
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if out.exists() and not out.is_dir():
        raise TwistLMError(f"--out {out} exists and is not a folder")
    extra = training_options(parse_options(train_option))
    options, extra = prompt_batches.resolve(task_obj, options, extra)  # dataset mode: many questions, P per update
    given = {**extra, "learning_rate": learning_rate, "max_steps": steps, "num_particles": particles,
             "proposal": proposal, "positives": positives, "logging_steps": logging_steps}
    config = TwistTrainingConfig(
        **recipe.settings(given),
        output_dir=str(out),
        loss=loss,
        seed=seed,
        save_steps=save_steps,
        resume=resume,
        overwrite=overwrite,
    )
    if model != TOY_MODEL:
        check_model(model)

    with loading_status(model or EMBEDDED_LABEL, quiet):
        lm = load_model(model)
    trained_on = {**options, **recipe.training_options}  # a relaxation of the user's potential, when the recipe has one
    target, dataset_note = prompt_batches.training_target(task_obj, lm, max_new_tokens, trained_on,
                                                          config.prompts_per_step)
    if dataset_note and not quiet:
        console.print(dataset_note, style="dim", highlight=False)
    if recipe.training_options and not quiet:
        relaxed = ", ".join(f"{k}={v}" for k, v in recipe.training_options.items())
        console.print(f"the recipe trains on a relaxation of the target ({relaxed})", style="dim", highlight=False)
    twist_options.setdefault("output", loss_spec.twist_output)
    twist_options.setdefault("seed", seed)
    twist = twist_io.build_twist(twist_kind, lm, target, **twist_options)
    run_info = {
        "task": task,
        "task_options": options,
        "training_task_options": trained_on,
        "model": model or EMBEDDED_LABEL,
        "model_name": lm.name,
        "twist_kind": twist_kind,
        "twist_options": twist_options,
        "max_new_tokens": target.max_new_tokens,
    }

    trainer, state = run_training(
        lambda callbacks: make_twist_trainer(
            twist, target, config, callbacks=callbacks, run_info=run_info, progress=None if quiet else corpus_progress
        ),
        config.max_steps,
        PROGRESS_KEYS,
        quiet,
    )
    if not quiet and trainer.accelerator.is_main_process:  # one summary, not one per process
        last = state.log_history[-1] if state.log_history else {}
        summary = " · ".join(f"{k} {last[k]:.4g}" for k in ("loss", "log_z", "ess", "mean_reward") if k in last)
        console.print(
            f"trained {twist_kind} twist with {loss} for {state.global_step} steps: {summary}", highlight=False
        )
        console.print(f"wrote {out} (twist, training_config.json, {CURVE_NAME})", style="dim", highlight=False)
