"""``weightsmith export``: turn a trained output into a merged Hugging Face model or a PEFT LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import WeightsmithError
from ._app import app


@app.command("export")
def export_cmd(
    adapter_dir: Path = typer.Argument(..., help="an output directory of weightsmith adapt"),
    merged: Path = typer.Option(None, "--merged", help="write a merged Hugging Face model directory here"),
    peft: Path = typer.Option(None, "--peft", help="write a PEFT LoRA adapter here"),
    rank: int = typer.Option(
        None, "--rank", help="--peft for non-LoRA methods: rank of the SVD (default 16)"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Export a trained adapter: merged into the base weights (--merged) or as a PEFT LoRA (--peft).

    Example: weightsmith export runs/lora --merged runs/lora-merged
    """
    from ..train import export_run_merged, export_run_peft

    if (merged is None) == (peft is None):
        raise WeightsmithError("pass exactly one of --merged OUT or --peft OUT")
    if merged is not None:
        path = export_run_merged(adapter_dir, merged, force=force)
        Console().print(f"merged model written to {path} (loads with transformers' from_pretrained)")
        return
    assert peft is not None
    errors = export_run_peft(adapter_dir, peft, rank=rank, force=force)
    worst = max(errors.values(), default=0.0)
    if worst == 0.0:
        Console().print(f"PEFT LoRA adapter written to {peft} (exact: the method is low-rank)")
        return
    table = Table(title=f"PEFT LoRA adapter written to {peft}: truncated SVD of each update")
    table.add_column("weight")
    table.add_column("relative error ‖ΔW − BA‖/‖ΔW‖", justify="right")
    for name, err in errors.items():
        table.add_row(name, f"{err:.4f}")
    Console().print(table)
    mean = sum(errors.values()) / len(errors)
    Console().print(f"approximation error: mean {mean:.4f}, max {worst:.4f} (raise --rank to lower it)")
