"""``twistlm`` command-line interface. Each command lives in its own module and registers itself on ``app``."""

import importlib
import pkgutil

from twistlm.cli.app import app, main, run_app

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"app", "common"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["app", "main", "run_app"]
