"""``weightsmith analyze-phases``: the loss-landscape phase diagram of a grid of zoo models.

Every option is checked (``PhaseGrid``) before any model is trained; outputs go through
``weightsmith.staging`` (``Report.write``, ``write_text``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import WeightsmithError
from . import _options as opt
from ._app import app


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise WeightsmithError(f"{option} {text!r}: expected comma-separated numbers, e.g. 4,16,64") from exc
    if not values:
        raise WeightsmithError(f"{option} {text!r}: give at least one value")
    return values


@app.command("analyze-phases")
def analyze_phases_cmd(
    out: Path = typer.Option(..., "--out", help="write the HTML report (phase diagram, metric maps) here"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the per-cell metrics as JSON"),
    task: str = typer.Option("digits", "--task", help="digits or mnist1d"),
    temperature: str = typer.Option("batch_size", "--temperature", help="batch_size or lr"),
    temperatures: str = typer.Option("256,64,16", "--temperatures", help="batch sizes or learning rates"),
    load: str = typer.Option("width", "--load", help="width or data (fraction of the training set)"),
    loads: str = typer.Option("4,16,64", "--loads", help="MLP widths or training-set fractions in (0, 1]"),
    epochs: int = typer.Option(20, "--epochs", help="training epochs per model, >= 1"),
    seeds: int = typer.Option(2, "--seeds", help="models per cell, >= 2"),
    depth: int = typer.Option(2, "--depth", help="hidden layers of each MLP, >= 1"),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
) -> None:
    """Train a temperature x load grid of zoo MLPs, read Hessian, mode connectivity and CKA, label phases."""
    import torch

    from .. import zoo
    from ..analyze.phases import PhaseGrid, phase_grid
    from ..analyze.report_sections import add_phases
    from ..progress import log
    from ..report import Report
    from ..staging import write_text

    opt.choice(task, "--task", zoo.TASKS)
    opt.choice(temperature, "--temperature", ("batch_size", "lr"))
    opt.choice(load, "--load", ("width", "data"))
    try:
        grid = PhaseGrid(
            task=task,
            temperature=temperature,
            temperatures=_numbers(temperatures, "--temperatures"),
            load=load,
            loads=_numbers(loads, "--loads"),
            epochs=epochs,
            seeds=seeds,
            depth=depth,
        )
    except WeightsmithError as exc:
        raise WeightsmithError(f"analyze-phases: {exc}") from exc
    if str(out) == "-":
        raise WeightsmithError("--out -: the HTML report goes to a file; use --json - for JSON on stdout")
    opt.outputs(
        force, ("--out", out), ("--json", json_out if json_out is not None and str(json_out) != "-" else None)
    )
    torch.set_num_threads(min(torch.get_num_threads(), 4))  # tiny models: more threads only add overhead
    result = phase_grid(grid)
    report = Report(f"weightsmith analyze-phases: {task}", subtitle=f"{temperature} x {load}")
    add_phases(report, result)
    report.write(out, force=force)
    log(f"wrote {out}")
    if json_out is not None:
        text = json.dumps(result.to_json(), indent=1, allow_nan=False)
        if str(json_out) == "-":
            typer.echo(text)
        else:
            write_text(json_out, text + "\n", force=force)
            log(f"wrote {json_out}")
    counts = {p: sum(c["phase"] == p for c in result.cells) for p in ("I", "II", "III", "IV-A", "IV-B")}
    log(f"{len(result.cells)} cells, phases {counts}, {result.seconds:.1f} s")
