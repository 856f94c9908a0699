"""``weightsmith analyze``, ``compare`` and ``nuclear-norm``: read what the weights say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..errors import WeightsmithError
from ..progress import log
from ..store import atomic_write_text, prepare_output
from ._app import app

DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


def _outputs(json_out: Path | None, html_out: Path | None, force: bool) -> None:
    for out in (json_out, html_out):
        if out is not None and str(out) != "-":
            prepare_output(out, force)


def _emit(data: dict[str, Any], json_out: Path | None, html_out: Path | None) -> None:
    text = json.dumps(data, indent=1, allow_nan=False)
    if (json_out is None and html_out is None) or str(json_out) == "-":
        typer.echo(text)
    elif json_out is not None:
        atomic_write_text(json_out, text + "\n")
        log(f"wrote {json_out}")


def _device(device: str) -> str | None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise WeightsmithError(f"--device {device}: use auto, cpu or cuda")
    return None if device == "auto" else device


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(..., help="asset name, model directory, .safetensors file or hub id"),
    json_out: Path | None = typer.Option(None, "--json", help="write the metrics as JSON here ('-': stdout)"),
    html_out: Path | None = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    select: str | None = typer.Option(None, "--select", help="comma-separated globs of weight names"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    farms: bool = typer.Option(True, "--farms/--no-farms", help="also compute FARMS alpha"),
    mp: bool = typer.Option(True, "--mp/--no-mp", help="also fit the Marchenko-Pastur bulk"),
    precision: str = typer.Option(
        "auto", "--precision", help="eigensolver dtype: auto (CPU float64, GPU float32), float64, float32"
    ),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
) -> None:
    """Spectral metrics (alpha, norms, ranks, MP spikes, FARMS alpha) of every 2-D weight."""
    from .. import models
    from ..analyze import analyze_weights
    from ..report import Report

    if precision not in ("auto", "float64", "float32"):
        raise WeightsmithError(f"--precision must be auto, float64 or float32, got {precision!r}")
    _outputs(json_out, html_out, force)
    store = models.open_weights(model)
    result = analyze_weights(
        store, select=select, device=_device(device), farms=farms, name=model, mp_fit=mp, precision=precision
    )
    if html_out is not None:
        report = Report(f"weightsmith analyze: {model}", subtitle=store.source)
        result.add_to_report(report)
        report.write(html_out)
        log(f"wrote {html_out}")
    _emit(result.to_json(), json_out, html_out)
    s = result.summary()
    log(
        f"{s['num_matrices']} matrices, mean alpha {s.get('mean_alpha')}, "
        f"{s['num_skipped']} skipped, {s['seconds']} s"
    )


@app.command("compare")
def compare_cmd(
    base: str = typer.Argument(..., help="the base (pre-trained) model"),
    other: str = typer.Argument(..., help="the fine-tuned model"),
    json_out: Path | None = typer.Option(
        None, "--json", help="write the comparison as JSON here ('-': stdout)"
    ),
    html_out: Path | None = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    k: int = typer.Option(10, "--k", min=1, help="top singular vectors of OTHER examined"),
    epsilon: float = typer.Option(0.5, "--epsilon", min=0.0, max=1.0, help="intruder |cosine| threshold"),
    select: str | None = typer.Option(None, "--select", help="comma-separated globs of weight names"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
) -> None:
    """Intruder dimensions, subspace overlap and update size of OTHER relative to BASE, per matrix."""
    from .. import models
    from ..analyze import compare_weights
    from ..report import Report

    _outputs(json_out, html_out, force)
    result = compare_weights(
        models.open_weights(base), models.open_weights(other), k=k, epsilon=epsilon, select=select,
        device=_device(device),
    )  # fmt: skip
    if not result.matrices:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in result.skipped[:5])
        raise WeightsmithError(f"no 2-D weight could be compared between {base} and {other} ({reasons})")
    if html_out is not None:
        report = Report(f"weightsmith compare: {other} vs {base}")
        result.add_to_report(report)
        report.write(html_out)
        log(f"wrote {html_out}")
    _emit(result.to_json(), json_out, html_out)
    s = result.summary()
    log(f"{s['num_matrices']} matrices, {s['total_intruders']} intruders, {s['num_skipped']} skipped")


@app.command("nuclear-norm")
def nuclear_norm_cmd(
    model: str = typer.Argument(..., help="a causal LM: asset name, model directory or hub id"),
    text: str = typer.Option("hamlet", "--text", help="'hamlet' (packaged) or a path to a UTF-8 text file"),
    max_tokens: int = typer.Option(512, "--max-tokens", min=2, help="tokens per window (one forward pass)"),
    windows: int = typer.Option(8, "--windows", min=1, help="at most this many windows from the start"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="write the result as JSON here"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Matrix Nuclear-Norm (Li et al., 2024) of the model's last hidden states on a text."""
    from .. import assets, models
    from ..analyze import text_mnn
    from ..execute import resolve_device

    _outputs(json_out, None, force)
    if text == "hamlet":
        body = assets.load_text("hamlet")
    else:
        path = Path(text)
        if not path.is_file():
            raise WeightsmithError(f"--text {text}: not 'hamlet' and not an existing file")
        body = path.read_text(encoding="utf-8", errors="replace")
    net, tokenizer = models.load_model(model, task="causal-lm")
    net.to(resolve_device(_device(device)))
    try:
        result = text_mnn(net, tokenizer, body, max_tokens=max_tokens, max_windows=windows)
    except ValueError as exc:
        raise WeightsmithError(f"--text {text}: {exc}") from exc
    result = {"model": model, "text": text, "max_tokens": max_tokens, **result}
    _emit(result, json_out, None)
