"""The typer application shared by every command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="weightsmith",
    help="Weight-space engineering for PyTorch models: adapt, train, merge, compress and analyze weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"weightsmith {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads for torch (default: from the CPUs this process may use)."
    ),
) -> None:
    """Weight-space engineering for PyTorch models: adapt, train, merge, compress and analyze weights."""
    if threads is not None:
        from ..threads import configure

        configure(threads)
