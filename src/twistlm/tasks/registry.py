"""The task registry: name → how to build a target, with defaults, and how to score samples.

A task turns a user's goal ("toxic continuations", "1-star reviews", "infill the middle sentence") into a
:class:`~twistlm.target.Target` in one call. Tasks register themselves with :func:`register_task`; the CLI's
``--task NAME`` and ``twistlm tasks`` read :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.target import Target


@dataclass
class Task:
    """One registered task.

    name / description: shown by ``twistlm tasks``.
    build: ``build(lm, max_new_tokens=None, num_prompts=1, **options) -> Target``; unknown options raise ConfigError.
        ``max_new_tokens=None`` means the task's default horizon.
    success: ``success(target, texts, prompt_index) -> list[bool]``, whether each completion meets the goal (for the
        "fraction meeting the goal" figures); None if the task has no binary goal.
    options: documented option names → one-line help, for ``twistlm tasks``.
    """

    name: str
    description: str
    build: Callable[..., Target]
    success: Callable[[Target, list[str], list[int]], list[bool]] | None = None
    options: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, Task] = {}


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
