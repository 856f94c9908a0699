"""``weightsmith assets``: list the packaged offline models and data sets."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .. import assets
from ._app import app


@app.command("assets")
def list_assets() -> None:
    """List the packaged models and data sets, their packages and sizes."""
    table = Table(title="weightsmith packaged assets")
    for col in ("name", "kind", "package", "size", "what"):
        table.add_column(col)
    for a in assets.ASSETS.values():
        table.add_row(a.name, a.kind, a.package, assets.asset_size(a.name), a.description)
    Console().print(table)
