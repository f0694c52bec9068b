"""The Typer application object and the entry point that turns user errors into one clear line (exit code 2)."""

from __future__ import annotations

import sys

import click
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

USAGE_ERROR = 2


def fail(message: str) -> None:
    """Abort a command with one line on stderr and exit code 2."""
    raise TwistLMError(message)


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input)."""
    try:
        app(args=argv, standalone_mode=False)
    except TwistLMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return USAGE_ERROR
    except click.exceptions.UsageError as exc:
        err_console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        return USAGE_ERROR
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 1
    return 0


def main() -> None:
    sys.exit(run_app())
