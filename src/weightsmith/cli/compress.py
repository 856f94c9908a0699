"""``weightsmith compress MODEL --method NAME --out DIR``: quantise, prune or factor a model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..config import parse_opts
from ..errors import WeightsmithError
from ._app import app

_HELP = """Compress the weights of MODEL (a packaged name such as smollm2, or a Hugging Face model directory)
and write a complete model directory to OUT. Calibrated methods run on --samples windows of --seq-len
tokens of --calib (a packaged text such as hamlet, or a UTF-8 text file).

Quantisers (--bits, default 4; --group-size, default 128, 0 = per-channel): rtn (round to nearest,
data-free), hqq (half-quadratic, data-free), bcq (binary-coding, sums of scaled ±1 vectors, data-free;
iters, po2_scales for ShiftAddLLM's power-of-two scales; avg_bits for its sensitivity-based mixed bits),
gptq and awq (calibrated), udfc (data-free compensation of the quantisation or pruning error by the next
layer; prune_only, sparsity, combine), bitstack (sign x low-rank residual stack, activation-aware; levels,
rank, sort; --format weightsmith, reloaded at any size by ws.load_compressed(DIR, memory_mb=...)).
Options: act_order, damp, block_size (gptq); n_grid, clip, max_shrink, rows (awq); p, beta, kappa, iters,
integer_zero (hqq); symmetric (all).

Pruners (options sparsity, default 0.5, or n and m for N:M such as n=2 m=4): magnitude (data-free;
prune_scope layer or row), wanda (calibrated; prune_scope), sparsegpt (calibrated; damp, block_size),
dsnot (training-free prune-and-grow on an init mask; calibrated; init, max_cycles, threshold, pow_var),
armor (N:M core wrapped by block-diagonal correctors; n, m, block_size, iters, init), dpruner (general
importance from --calib and domain importance from domain=FILE; lam, prune_scope), pst (magnitude plus a
low-rank and structured fit of gradient importance; rank, alpha, structured).

Low-rank (options keep, default 0.5 of the parameters; allocation global or uniform; rank, a fixed rank):
svd (data-free), fwsvd (Fisher-weighted, calibrated; eps), asvd (activation-aware, calibrated; whiten
cholesky or scale, alpha, damp), welore (ranks from each matrix's singular-value tail under the keep
budget; matrices that do not compress stay dense; min_ratio). Structure: masa (attention projections of
all layers as combinations of shared matrix atoms; keep, atoms), monarch (nearest Monarch matrix; nblocks,
block_rank); both dense output for now.

Formats (default: compressed-tensors for quantisers, dense otherwise): compressed-tensors (quantisers only:
pack-quantized, loads in transformers with the compressed-tensors package and in vLLM), dense (the dense
weights as a plain checkpoint; every method), weightsmith (read by ws.load_compressed; low-rank layers come
back as two thin Linears, so the model really is smaller).

Examples: weightsmith compress smollm2 --method gptq --bits 4 --group-size 64 --out runs/smollm2-gptq4;
weightsmith compress smollm2 --method wanda --opt n=2 --opt m=4 --out runs/smollm2-wanda24
"""
# one line per paragraph, so the terminal (not the source's line breaks) decides where lines wrap
HELP = "\n\n".join(" ".join(par.split()) for par in _HELP.split("\n\n"))


def _opts(items: list[str]) -> dict[str, Any]:
    return {k: v for k, (_, v) in parse_opts(items, "damp=0.01").items()}


@app.command("compress", help=HELP)
def compress_cmd(
    model: str = typer.Argument(..., help="packaged model name or Hugging Face model directory"),
    method: str = typer.Option(
        ...,
        "--method",
        help="rtn, hqq, bcq, gptq, awq, udfc, bitstack (quantise); magnitude, wanda, sparsegpt, dsnot, "
        "armor, dpruner, pst (prune); svd, fwsvd, asvd, welore, masa, monarch (low-rank / structure)",
    ),
    out: Path = typer.Option(..., "--out", help="output model directory"),
    bits: int | None = typer.Option(None, "--bits", help="bits per weight, 2 to 8 (quantisers; default 4)"),
    group_size: int | None = typer.Option(
        None,
        "--group-size",
        help="weights per scale along the input; 0 = per-channel (quantisers; default 128)",
    ),
    opt: list[str] = typer.Option([], "--opt", help="method option key=value (repeatable)"),
    calib: str = typer.Option("hamlet", "--calib", help="calibration text: packaged name or text file"),
    samples: int = typer.Option(32, "--samples", help="calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration window"),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="compressed-tensors (quantisers; their default), dense (default otherwise) or weightsmith",
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
    if fmt is not None and fmt not in C.FORMATS:
        raise WeightsmithError(f"--format {fmt}: unknown; use one of {', '.join(C.FORMATS)}")
    given = {k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None}
    options = {"method": method, **given, **_opts(opt)}
    try:
        config = config_from_dict(options, "compress")
    except TypeError as exc:
        raise WeightsmithError(f"--opt: {exc}") from exc
    if fmt is None:
        fmt = config.default_format
    config.check_format(fmt)
    if config.needs_calibration() and (samples < 1 or seq_len < 2):
        raise WeightsmithError(
            f"--samples {samples} / --seq-len {seq_len}: need at least 1 window of 2 tokens"
        )
    if fmt == "compressed-tensors" and getattr(config, "integer_zero", True) is False:
        raise WeightsmithError(
            "--format compressed-tensors stores integer zero points; drop integer_zero=false "
            "or use --format weightsmith"
        )
    if config.needs_calibration():
        C._core.calibration_text(calib)  # a missing or unreadable --calib is refused before the model loads
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
    log(f"compressing {len(layers)} layer(s) of {model} with {config}")
    net, report = C.compress(net, config, calib=batches, device=dev)
    path = C.save_compressed(net, report, out, tokenizer, fmt, force)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    errs = [r.rel_error for r in report.layers]
    Console().print(
        f"{len(errs)} layers {config.verb} in {report.seconds:.1f} s; relative weight error mean "
        f"{sum(errs) / len(errs):.4f}, max {max(errs):.4f}; {config.describe(report)}; "
        f"{size / 1e6:.1f} MB written to {path} ({fmt})"
    )
