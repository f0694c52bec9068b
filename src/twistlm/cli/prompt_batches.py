"""``train-twist`` over a task's dataset of prompts: when it applies, and the target it trains on.

Dataset mode (one twist trained over many questions, :class:`twistlm.prompt_data.PromptBatches`) is on when

* ``-t prompts_per_step=P`` with P ≥ 1 is given (``-t prompts_per_step=0`` turns it off), or
* without that option, the task has a dataset (``gsm8k``) and ``-o data=`` is given without ``-o index=`` (one
  problem): then P = :data:`DEFAULT_PROMPTS_PER_STEP`.

A task without a dataset trains in dataset mode over the prompts its target holds, when it builds several (BDMC
infilling with ``-o problems=N``: N problems, each its own ending o and exact sample).

In dataset mode a task with a dev split trains on ``part=train`` unless ``-o part=`` says otherwise (the last
``dev_size`` rows stay held out for ``twistlm search``, which defaults to ``part=dev``); the target holds every row of
that part and each update draws P of them.
"""

from __future__ import annotations

from typing import Any

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.target import Target
from twistlm.tasks.registry import Task

DEFAULT_PROMPTS_PER_STEP = 8
"""Questions per update when dataset mode is inferred (K particles each, as ``--particles`` says)."""
FIELD = "prompts_per_step"
DATA_OPTION, INDEX_OPTION, PART_OPTION = "data", "index", "part"
TRAIN_PART = "train"


def resolve(task: Task, options: dict[str, Any], train_options: dict[str, Any]) -> tuple[dict, dict]:
    """(task options, --train-option values) with dataset mode decided (module docstring); cheap, no model."""
    size = train_options.get(FIELD)
    if size is None and task.dataset is not None and options.get(DATA_OPTION) is not None \
            and INDEX_OPTION not in options:
        size = DEFAULT_PROMPTS_PER_STEP
        train_options = {**train_options, FIELD: size}
    if not size or task.dataset is None:  # without a dataset: the built target's prompts (training_target)
        return options, train_options
    if PART_OPTION in task.options and PART_OPTION not in options:
        options = {**options, PART_OPTION: TRAIN_PART}
    task.dataset(**options)  # read and check the rows now, before a model is loaded
    return options, train_options


def training_target(task: Task, lm: ParticleLM, max_new_tokens: int | None, options: dict[str, Any],
                    prompts_per_step: int) -> tuple[Target, str | None]:
    """The target to train on and, in dataset mode, a line saying which rows it holds."""
    template = task.build(lm, max_new_tokens=max_new_tokens, **options)
    if not prompts_per_step:
        return template, None
    if task.dataset is None:
        if template.num_prompts < 2:
            raise ConfigError(f"task {task.name!r} has no dataset of prompts and built one prompt: prompts_per_step "
                              "needs a task with a dataset (e.g. gsm8k) or one that builds many (e.g. infilling with "
                              "-o problems=N)")
        return template, f"training over the task's {template.num_prompts} prompts, {prompts_per_step} per update"
    data = task.dataset(**options)
    note = (f"training over {len(data)} questions (rows {data.first_row}–{data.row_number(len(data) - 1)} of "
            f"{data.source}), {prompts_per_step} per update")
    if PART_OPTION in options:
        note += f"; part={options[PART_OPTION]}"
    return data.target(template), note
