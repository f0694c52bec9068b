"""The Typer application object and the entry point that turns user errors into one clear line (exit code 2)."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext

import typer
from rich.console import Console

from twistlm.errors import TwistLMError

app = typer.Typer(
    name="twistlm",
    help="Probabilistic inference in language models: SMC, twisted SMC, bounds on log Z.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def loading_status(label: str, quiet: bool) -> AbstractContextManager:
    """``with loading_status(label, quiet): lm = load_model(name)`` — a "loading model" spinner unless quiet."""
    return nullcontext() if quiet else err_console.status(f"loading model {label} …")

USAGE_ERROR = 2
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def _exception_classes(name: str) -> tuple[type, ...]:
    """click's exception class ``name`` wherever it lives: typer ≥ 0.16 ships its own copy of click (with Exit and
    Abort moved to typer.exceptions); older typer uses click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _exception_classes("UsageError")
_EXITS = _exception_classes("Exit")
_ABORTS = _exception_classes("Abort")


def fail(message: str) -> None:
    """Abort a command with one line on stderr and exit code 2."""
    raise TwistLMError(message)


def _interrupted() -> int:
    err_console.print("interrupted", highlight=False)
    return INTERRUPTED


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted by Ctrl-C)."""
    try:
        # Non-standalone typer returns the exit code of a ctx.exit() / Ctrl-C (130) instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        return _interrupted()
    except TwistLMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return USAGE_ERROR
    except _USAGE_ERRORS as exc:
        if exc.ctx is not None and not (argv if argv is not None else sys.argv[1:]):
            err_console.print(exc.ctx.get_help(), highlight=False)  # bare `twistlm`: show the help, not an error
            return USAGE_ERROR
        err_console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        return USAGE_ERROR
    except _EXITS as exc:
        return _interrupted() if exc.exit_code == INTERRUPTED else exc.exit_code
    except _ABORTS as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):  # older click: Ctrl-C becomes Abort
            return _interrupted()
        err_console.print("aborted")
        return 1
    if code == INTERRUPTED:
        return _interrupted()
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def main() -> None:
    sys.exit(run_app())
