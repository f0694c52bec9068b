"""The task registry: name → how to build a target, with defaults, and how to score samples.

A task turns a user's goal ("toxic continuations", "1-star reviews", "infill the middle sentence") into a
:class:`~twistlm.target.Target` in one call. Tasks register themselves with :func:`register_task`; the CLI's
``--task NAME`` and ``twistlm tasks`` read :data:`TASKS`. Tasks with a final answer to grade (arithmetic, gsm8k,
subjectivity) also carry :class:`Answers`, which ``twistlm solve`` (:func:`twistlm.solve.solve`) needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.target import Target

AnswerReader = Callable[[Target, list[str], list[int]], list[str | None]]
"""``read(target, texts, prompt_index)``: the answer each completion gives (None: none could be read)."""


@dataclass(frozen=True)
class Answers:
    """How a task's completions are graded by their final answer (``twistlm solve``).

    read: ``read(target, texts, prompt_index) -> list[str | None]``, the answer of each completion of prompt
        ``prompt_index[i]``, normalised so that equal answers are equal strings (majority votes count strings);
        None when no answer can be read.
    gold: ``gold(target) -> list[str]``, the correct answer of each prompt of a built target (same normalisation).
    count: ``count(**options) -> int``, how many problems the task's data holds for these options (``index`` not
        subtracted), so that a caller can take "all of them" without loading a model.
    """

    read: AnswerReader
    gold: Callable[[Target], list[str]]
    count: Callable[..., int]


@dataclass
class Task:
    """One registered task.

    name / description: shown by ``twistlm tasks``.
    build: ``build(lm, max_new_tokens=None, num_prompts=1, **options) -> Target``; unknown options raise ConfigError.
        ``max_new_tokens=None`` means the task's default horizon.
    success: ``success(target, texts, prompt_index) -> list[bool]``, whether each completion meets the goal (for the
        "fraction meeting the goal" figures); None if the task has no binary goal.
    options: documented option names → one-line help, for ``twistlm tasks``.
    answer: :class:`Answers` (read a completion's answer, the gold answers, the number of problems); None if the
        task has no final answer to grade.
    dataset: ``dataset(**options) -> PromptDataset``, the task's problems as a dataset of prompts (the rows the
        options select: data file, part of the dev split, from ``index`` on), for training one twist over many
        questions and for ``twistlm search``; None if the task has no such data. Pair it with a target built by
        ``build`` for the same options: ``task.dataset(**o).target(task.build(lm, **o))``.
    formatted: ``formatted(target, texts, prompt_index) -> list[bool]``, whether each completion is in the layout
        the task asks for (``twistlm search``'s format rate); None if the task asks for none.
    """

    name: str
    description: str
    build: Callable[..., Target]
    success: Callable[[Target, list[str], list[int]], list[bool]] | None = None
    options: dict[str, str] = field(default_factory=dict)
    answer: Answers | None = None
    dataset: Callable[..., Any] | None = None
    formatted: Callable[[Target, list[str], list[int]], list[bool]] | None = None


TASKS: dict[str, Task] = {}


def answer_tasks() -> list[str]:
    """Names of the registered tasks that have :class:`Answers` (sorted)."""
    _load_builtin_tasks()
    return sorted(name for name, task in TASKS.items() if task.answer is not None)


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    _load_builtin_tasks()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from: {', '.join(sorted(TASKS)) or '(none registered)'}")
    return TASKS[name]


def build_task(name: str, lm: ParticleLM, **options: Any) -> Target:
    """``get_task(name).build(lm, **options)``."""
    return get_task(name).build(lm, **options)


def _load_builtin_tasks() -> None:
    """Import the built-in task modules (each registers itself on import)."""
    import importlib
    import pkgutil

    import twistlm.tasks as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in {"registry", "calculator"} and not info.name.startswith("_"):
            importlib.import_module(f"twistlm.tasks.{info.name}")
