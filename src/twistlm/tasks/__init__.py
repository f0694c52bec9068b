"""Tasks: ready-made targets for common goals (see :mod:`twistlm.tasks.registry`)."""

from twistlm.tasks.registry import TASKS, Task, build_task, get_task, register_task

__all__ = ["TASKS", "Task", "build_task", "get_task", "register_task"]
