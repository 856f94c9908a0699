"""``weightsmith compress MODEL --method NAME --out DIR``: quantise a model's weights and write it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from ..errors import WeightsmithError
from ._app import app

HELP = """Quantise the weights of MODEL (a packaged name such as smollm2, or a Hugging Face model directory)
and write a complete model directory to OUT.

Methods: rtn (round to nearest, data-free), hqq (half-quadratic, data-free), gptq and awq (calibrated on
--samples windows of --seq-len tokens of --calib, a packaged text such as hamlet or a UTF-8 text file).
Method options go in --opt key=value: act_order, damp, block_size (gptq); n_grid, clip, max_shrink, rows
(awq); p, beta, kappa, iters, integer_zero (hqq); symmetric (all).

Formats: compressed-tensors (pack-quantized; loads in transformers with the compressed-tensors package and
in vLLM), dense (dequantised weights, a plain checkpoint), weightsmith (read by ws.load_compressed).

Example: weightsmith compress smollm2 --method gptq --bits 4 --group-size 64 --out runs/smollm2-gptq4
"""


def _opts(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WeightsmithError(f"--opt '{item}': expected key=value (e.g. --opt damp=0.01)")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out


@app.command("compress", help=HELP)
def compress_cmd(
    model: str = typer.Argument(..., help="packaged model name or Hugging Face model directory"),
    method: str = typer.Option(..., "--method", help="rtn, hqq, gptq or awq"),
    out: Path = typer.Option(..., "--out", help="output model directory"),
    bits: int = typer.Option(4, "--bits", help="bits per weight, 2 to 8"),
    group_size: int = typer.Option(
        128, "--group-size", help="weights per scale along the input; 0 = per-channel"
    ),
    opt: list[str] = typer.Option([], "--opt", help="method option key=value (repeatable)"),
    calib: str = typer.Option("hamlet", "--calib", help="calibration text: packaged name or text file"),
    samples: int = typer.Option(32, "--samples", help="calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration window"),
    fmt: str = typer.Option(
        "compressed-tensors", "--format", help="compressed-tensors, dense or weightsmith"
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    from rich.console import Console

    from .. import compress as C
    from ..config import config_from_dict, registered
    from ..execute import resolve_device
    from ..models import load_model
    from ..progress import log
    from ..staging import check_output

    methods = registered("compress")
    if method not in methods:
        raise WeightsmithError(f"--method {method}: unknown; known: {', '.join(sorted(methods))}")
    if fmt not in C.FORMATS:
        raise WeightsmithError(f"--format {fmt}: unknown; use one of {', '.join(C.FORMATS)}")
    options = {"method": method, "bits": bits, "group_size": group_size, **_opts(opt)}
    try:
        config = config_from_dict(options, "compress")
    except TypeError as exc:
        raise WeightsmithError(f"--opt: {exc}") from exc
    if config.needs_calibration() and (samples < 1 or seq_len < 2):
        raise WeightsmithError(
            f"--samples {samples} / --seq-len {seq_len}: need at least 1 window of 2 tokens"
        )
    if fmt == "compressed-tensors" and getattr(config, "integer_zero", True) is False:
        raise WeightsmithError(
            "--format compressed-tensors stores integer zero points; drop integer_zero=false "
            "or use --format weightsmith"
        )
    dev = resolve_device(device)
    check_output(out, force, directory=True)
    net, tokenizer = load_model(model)
    layers = C._core.target_layers(net, config)
    if fmt != "dense":
        conv = [ly.name for ly in layers if ly.kind != "linear"]
        if conv:
            raise WeightsmithError(
                f"--format {fmt} stores nn.Linear layers only; '{conv[0]}' is a GPT-2 Conv1D. "
                "Use --format dense"
            )
    batches = None
    if config.needs_calibration():
        batches = C.calibration_batches(tokenizer, calib, samples, seq_len)
    log(
        f"compressing {len(layers)} layer(s) of {model} with {method} "
        f"({bits} bits, group {group_size or 'per-channel'})"
    )
    net, report = C.compress(net, config, calib=batches, device=dev)
    path = C.save_compressed(net, report, out, tokenizer, fmt, force)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    errs = [r.rel_error for r in report.layers]
    Console().print(
        f"{len(errs)} layers quantised in {report.seconds:.1f} s; relative weight error mean "
        f"{sum(errs) / len(errs):.4f}, max {max(errs):.4f}; {report.bits_per_weight:.2f} bits/weight; "
        f"{size / 1e6:.1f} MB written to {path} ({fmt})"
    )
