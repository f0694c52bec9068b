"""``twistlm tasks``: list the registered tasks with their descriptions and options."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from twistlm.cli.app import app, console
from twistlm.tasks.registry import TASKS, _load_builtin_tasks


@app.command("tasks")
def list_tasks() -> None:
    """List the tasks usable with `twistlm sample --task NAME [--task-option key=value ...]`."""
    _load_builtin_tasks()
    if not TASKS:
        console.print("no tasks registered")
        return
    table = Table(title="Tasks", title_justify="left", title_style="bold", show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("options (--task-option key=value)")
    for name in sorted(TASKS):
        task = TASKS[name]
        options = Text()
        for i, (key, help_text) in enumerate(task.options.items()):
            options.append(("\n" if i else "") + key, style="bold")
            options.append(f": {help_text}")
        table.add_row(name, Text(task.description), options if task.options else Text("—", style="dim"))
    console.print(table)
