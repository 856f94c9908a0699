"""``weightsmith export``: turn a trained run, or any PEFT adapter folder, into a merged Hugging Face model
or a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import WeightsmithError
from ._app import app

FORMATS = ("merged", "peft")


@app.command("export")
def export_cmd(
    source: Path = typer.Argument(
        ...,
        metavar="SOURCE",
        help="an output directory of weightsmith adapt, or a PEFT adapter folder (then pass --base)",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="write the export here (see --format)"),
    fmt: str = typer.Option(
        None, "--format", help="with --out: 'merged' (Hugging Face model) or 'peft' (PEFT adapter)"
    ),
    merged: Path = typer.Option(None, "--merged", help="alias of --out OUT --format merged"),
    peft: Path = typer.Option(None, "--peft", help="alias of --out OUT --format peft"),
    base: str = typer.Option(
        None,
        "--base",
        help="for a PEFT folder: the base model it was made for (a directory, hub id or asset)",
    ),
    encoder_only: bool = typer.Option(
        False,
        "--encoder-only",
        help="merged classification runs: write the encoder alone (to merge with its base in weight space); "
        "the head stays in head.safetensors",
    ),
    rank: int = typer.Option(
        None, "--rank", help="--format peft for non-LoRA methods: SVD rank (default 16)"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Export a trained adapter merged into the base weights or as a PEFT adapter.

    Examples: weightsmith export runs/lora --out runs/lora-merged;
    weightsmith export my-peft-adapter --base minilm --out merged --format merged
    """
    from ..adapters._peft import is_peft_dir
    from ..train import export_run_merged, export_run_peft
    from ..train.runs import export_peft_as_peft, export_peft_merged

    given = [(p, f) for p, f in ((out, fmt or "merged"), (merged, "merged"), (peft, "peft")) if p is not None]
    if fmt is not None and out is None:
        raise WeightsmithError("--format goes with --out OUT (--merged/--peft name their format)")
    if len(given) != 1:
        raise WeightsmithError(
            "pass exactly one output: --out OUT [--format merged|peft], --merged OUT or --peft OUT"
        )
    target, kind = given[0]
    if kind not in FORMATS:
        raise WeightsmithError(f"--format must be 'merged' or 'peft', got {kind!r}")
    is_run = (source / "run.json").is_file()
    if not is_run and not is_peft_dir(source):
        raise WeightsmithError(
            f"{source}: neither a weightsmith run (run.json) nor a PEFT folder (adapter_config.json)"
        )
    if is_run and base is not None:
        raise WeightsmithError(f"{source} is a weightsmith run, which names its base model; drop --base")
    if not is_run and base is None:
        raise WeightsmithError(
            f"{source} is a PEFT adapter folder: pass --base MODEL (the model it was made for)"
        )
    if kind == "merged":
        path = (
            export_run_merged(source, target, force=force, classifier=not encoder_only)
            if is_run
            else export_peft_merged(source, base, target, force=force)
        )
        Console().print(f"merged model written to {path} (loads with transformers' from_pretrained)")
        return
    errors = (
        export_run_peft(source, target, rank=rank, force=force)
        if is_run
        else export_peft_as_peft(source, base, target, rank=rank, force=force)
    )
    worst = max(errors.values(), default=0.0)
    if worst == 0.0:
        Console().print(f"PEFT adapter written to {target} (exact)")
        return
    table = Table(title=f"PEFT LoRA adapter written to {target}: truncated SVD of each update")
    table.add_column("weight")
    table.add_column("relative error ‖ΔW − BA‖/‖ΔW‖", justify="right")
    for name, err in errors.items():
        table.add_row(name, f"{err:.4f}")
    Console().print(table)
    mean = sum(errors.values()) / len(errors)
    Console().print(f"approximation error: mean {mean:.4f}, max {worst:.4f} (raise --rank to lower it)")
