"""``twistlm train-gfn``: GFlowNet fine-tuning of a LoRA policy that samples a task's σ directly.

Flow: cheap checks (objective, task, numbers, output folder) → load the model → the task's GFN problem
(:mod:`twistlm.gfn.problems`: training prompts, reward, action space, labelled trajectories) → a LoRA policy
(:class:`~twistlm.gfn.policy.LoRAPolicy`; the toy model gets a tabular policy) → :class:`~twistlm.gfn.GFNTrainer` with a
progress bar → ``--out`` holds the adapter (``peft.PeftModel.from_pretrained(base, DIR)`` loads it; ``twistlm solve
--policy DIR`` decodes with it), ``gfn_policy.json``, ``training_config.json``, ``log_history.json``,
``training_curve.png`` and the ``checkpoint-N`` folders ``--resume`` continues from. Defaults are the tuned recipe:
``twistlm train-gfn --task arithmetic -o data=../shared/data/arithmetic/train_50.json --out DIR`` reproduces the
EXPERIMENTS.md row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from twistlm.cli.app import app, console, loading_status
from twistlm.cli.common import (
    EMBEDDED_LABEL,
    TOY_MODEL,
    check_model,
    config_options,
    load_model,
    parse_options,
    run_training,
)
from twistlm.errors import TwistLMError
from twistlm.gfn.config import GFNConfig
from twistlm.gfn.objectives import OBJECTIVES, get_objective
from twistlm.tasks.registry import get_task
from twistlm.trainloop import CURVE_NAME

FLAG_FIELDS = (
    "output_dir",
    "objective",
    "learning_rate",
    "max_steps",
    "seed",
    "logging_steps",
    "save_steps",
    "resume",
    "overwrite",
)
PROGRESS_KEYS = (("loss", "loss"), ("log_reward", "log R"), ("policy_log_q", "log q"), ("diversity", "distinct"))


def _policy(lm, problem, config: GFNConfig):
    from twistlm.gfn.policy import LoRAPolicy, LoraSettings
    from twistlm.lm import HFLM

    if isinstance(lm, HFLM):
        settings = LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
        return LoRAPolicy.create(lm, settings)
    from twistlm.gfn.toy_policy import TabularPolicy

    return TabularPolicy(lm)


@app.command("train-gfn")
def train_gfn(
    task: Annotated[str, typer.Option("--task", help="A registered task (see `twistlm tasks`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (adapter, config, curves, checkpoints).")],
    task_option: Annotated[
        list[str] | None, typer.Option("--task-option", "-o", help="Task option key=value (repeatable).")
    ] = None,
    objective: Annotated[
        str | None, typer.Option("--objective", help=" | ".join(OBJECTIVES) + " (default: the task's recipe).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer updates (default: the recipe's).")] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", "--lr", help="AdamW learning rate (default: the recipe's).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Hub id, model directory, .gguf file, or 'toy' (default: embedded)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    train_option: Annotated[
        list[str] | None,
        typer.Option("--train-option", "-t", help="Any other GFNConfig field as key=value, e.g. lora_r=16."),
    ] = None,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Log every N updates.")] = 10,
    save_steps: Annotated[
        int, typer.Option("--save-steps", help="Checkpoint every N updates (0: never).")
    ] = GFNConfig.save_steps,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run in a non-empty --out (default: refuse).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """GFlowNet fine-tuning (SubTB, TB or SFT) of a LoRA policy for a task; saves the adapter and the curves."""
    from twistlm.gfn.problems import build_problem
    from twistlm.gfn.trainer import GFNTrainer

    if objective is not None:
        get_objective(objective)
    get_task(task)
    options = parse_options(task_option)
    if out.exists() and not out.is_dir():
        raise TwistLMError(f"--out {out} exists and is not a folder")
    given = config_options(GFNConfig, parse_options(train_option), FLAG_FIELDS)
    flags = {"objective": objective, "learning_rate": learning_rate, "max_steps": steps}
    given.update({k: v for k, v in flags.items() if v is not None})
    fixed = {"output_dir": str(out), "seed": seed, "logging_steps": logging_steps, "save_steps": save_steps,
             "resume": resume, "overwrite": overwrite}
    config = GFNConfig(**given, **fixed)  # the numbers are checked before the model loads
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise TwistLMError(f"--out {out} is not empty (another run?); add --resume to continue it or --overwrite")
    if model != TOY_MODEL:
        check_model(model)
    with loading_status(model or EMBEDDED_LABEL, quiet):
        lm = load_model(model)
    problem = build_problem(task, lm, **options)
    if problem.config:  # the task's recipe where the user gave nothing
        config = GFNConfig(**{**problem.config, **given}, **fixed)
    policy = _policy(lm, problem, config)
    run_info = {
        "task": task,
        "task_options": options,
        "model": model or EMBEDDED_LABEL,
        "model_name": lm.name,
        "max_new_tokens": problem.target.max_new_tokens,
    }
    trainer, state = run_training(
        lambda callbacks: GFNTrainer(policy, problem, config, callbacks=callbacks, run_info=run_info), steps, PROGRESS_KEYS, quiet
    )
    if not quiet and trainer.accelerator.is_main_process:  # one summary, not one per process
        last = state.log_history[-1] if state.log_history else {}
        summary = " · ".join(f"{k} {last[k]:.4g}" for k, _ in PROGRESS_KEYS if k in last)
        console.print(f"trained a GFlowNet policy with {config.objective} for {state.global_step} steps: {summary}",
                      highlight=False)
        console.print(f"wrote {out} (adapter, gfn_policy.json, training_config.json, {CURVE_NAME})", style="dim",
                      highlight=False)
