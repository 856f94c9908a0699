"""The ``weightsmith`` command. Each command lives in its own module and registers on ``app``."""

from __future__ import annotations

import importlib
import os
import sys

from ..errors import WeightsmithError
from ..staging import install_signal_handlers
from ._app import app

# Command modules, in help order. Each registers its commands on ``app`` when imported.
COMMAND_MODULES = ("assets_cmd", "analyze", "adapt", "export", "merge", "align", "demo")


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register()
    install_signal_handlers()
    try:
        app()
    except WeightsmithError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
