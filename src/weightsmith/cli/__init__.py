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
    "compress", "recipe", "align", "demo",
)  # fmt: skip


# The module of each top-level command, so that running one command imports only its module (the others
# pull in training, merging, ...). A command missing here still works: every module is then registered.
# tests/analyze/test_cli.py checks that this table matches what the modules register.
COMMAND_OF = {
    "assets": "assets_cmd", "analyze": "analyze", "compare": "analyze", "nuclear-norm": "analyze",
    "analyze-phases": "phases", "adapt": "adapt", "train": "train", "export": "export", "merge": "merge",
    "merge-moe": "merge_moe", "extract-lora": "extract_lora", "compress": "compress", "recipe": "recipe",
    "align": "align",
    "zoo-train": "align", "barrier": "align", "signature": "align", "demo": "demo",
}  # fmt: skip


ROOT_OPTIONS_WITH_VALUE = ("--threads",)  # options of ``_app._root`` that take a value


def _register(argv: list[str] | None = None) -> None:
    """Import the command modules: only the one ``argv``'s command lives in when that is known (not for
    ``--help`` or an unknown name, which list every command)."""
    args = sys.argv[1:] if argv is None else argv
    valued = [i + 1 for i, a in enumerate(args) if a in ROOT_OPTIONS_WITH_VALUE]
    first = next((i for i, a in enumerate(args) if not a.startswith("-") and i not in valued), None)
    module = COMMAND_OF.get(args[first]) if first is not None else None
    lone = module is not None and not {"--help", "--version"} & set(args[:first])
    for name in (module,) if lone else COMMAND_MODULES:
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
