"""The ``weightsmith`` command. Each command lives in its own module and registers on ``app``."""

from __future__ import annotations

import importlib
import os
import sys

from .. import threads
from ..errors import WeightsmithError
from ..staging import install_signal_handlers
from ._app import app

# Command modules, in help order. Each registers its commands on ``app`` when imported.
COMMAND_MODULES = (
    "assets_cmd", "analyze", "phases", "adapt", "train", "export", "merge", "merge_moe", "extract_lora",
    "compress", "align", "demo",
)  # fmt: skip


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register()
    install_signal_handlers()
    try:
        threads.configure()  # torch's CPU threads from the CPUs this process may use (weightsmith.threads)
        app()
    except WeightsmithError as exc:
        from rich.console import Console
        from rich.markup import escape

        # escape: a message may hold [brackets] (shapes, lists); soft_wrap: never break a path in two
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
