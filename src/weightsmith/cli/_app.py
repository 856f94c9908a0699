"""The typer application shared by every command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="weightsmith",
    help="Weight-space engineering for PyTorch models: adapt, merge, compress and analyze weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
