"""``weightsmith compress MODEL --method NAME --out DIR``: quantise, prune or factor a model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..config import parse_opts
from ..errors import WeightsmithError
from ._app import app

if TYPE_CHECKING:
    import torch

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
integer_zero (hqq); symmetric (all); tf32 (or --tf32: calibrated methods on CUDA, TF32 calibration passes).

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

Data-parallel calibration: under torchrun (torchrun --nproc_per_node N -m weightsmith compress ...) each
process calibrates on its share of the --samples windows, the statistics are summed over the processes
block by block, and rank 0 writes OUT (one directory, complete or not at all). A recipe step can compress
too: see weightsmith recipe --help.

Examples: weightsmith compress smollm2 --method gptq --bits 4 --group-size 64 --out runs/smollm2-gptq4;
weightsmith compress smollm2 --method wanda --opt n=2 --opt m=4 --out runs/smollm2-wanda24
"""
# one line per paragraph, so the terminal (not the source's line breaks) decides where lines wrap
HELP = "\n\n".join(" ".join(par.split()) for par in _HELP.split("\n\n"))


def _opts(items: list[str]) -> dict[str, Any]:
    return {k: v for k, (_, v) in parse_opts(items, "damp=0.01").items()}


RESIDENT = ("auto", "host", "device")
FREE_FRACTION = 0.9  # of the device's free memory the model and its codes may take under --resident auto


def _resident_wanted(config: object, dev: torch.device, world_size: int, resident: str) -> bool:
    """Whether the model should be moved to ``dev`` whole before a data-free quantisation: for a method with
    a batch path on the GPU (``batched_quantize``: RTN) on one CUDA device, unless ``--resident host``."""
    from ..compress._datafree import batch_quantizer

    if resident not in RESIDENT:
        raise WeightsmithError(f"--resident {resident}: use {', '.join(RESIDENT)}")
    return (
        resident != "host" and dev.type == "cuda" and world_size == 1 and batch_quantizer(config) is not None
    )


def _fits(net: torch.nn.Module, config: Any, dev: torch.device) -> bool:
    """Whether ``net`` (its parameters and buffers) and a byte a weight of codes for its target layers fit
    in :data:`FREE_FRACTION` of ``dev``'s free memory."""
    import torch

    from ..compress._core import target_layers

    tensors = [*net.parameters(), *net.buffers()]
    need = sum(t.numel() * t.element_size() for t in tensors if t.device != dev)
    need += sum(ly.weight().numel() for ly in target_layers(net, config))
    free, _ = torch.cuda.mem_get_info(dev)
    return need <= FREE_FRACTION * free


@app.command("compress", help=HELP)
def compress_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="packaged model name or Hugging Face model directory"
    ),
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
    tf32: bool = typer.Option(
        False,
        "--tf32",
        help="CUDA, float32 models: calibration forward passes and Gram matrices with TF32 matrix products "
        "(faster; inputs rounded to 10 significand bits, float32 sums); the method's solve stays float32",
    ),
    resident: str = typer.Option(
        "auto",
        "--resident",
        help="where the model lives while a data-free quantiser with a GPU batch path (rtn) runs on one "
        "CUDA device: device (moved there whole after loading; RTN then runs as one fused Triton kernel "
        "launch a run of same-shaped weights, warmed up in the background while the model loads, or as "
        "torch batches, whichever is faster), host (streamed to the GPU a weight at a time), auto (device "
        "when the model and its codes fit in the GPU's free memory)",
    ),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    import torch
    from rich.console import Console

    from .. import distributed
    from ..compress._core import check_tf32
    from ..compress._rtn_choice import prime
    from ..compress.step import CompressStep, summary
    from ..models import load_model

    given = {k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None}
    if tf32:
        given["tf32"] = True
    step = CompressStep.build(
        {"method": method, **given, **_opts(opt)}, out, fmt, calib, samples, seq_len, force
    )
    world, dev = distributed.init(device)
    check_tf32(step.config, dev)  # before the model loads
    on_device = _resident_wanted(step.config, dev, world.size, resident)
    if on_device:  # the kernel's start-up (about 0.45 s) hides behind the load (load_model's float32)
        prime(step.config, dev, (torch.float32,))
    elif callable(warm_up := getattr(step.config, "warm_up", None)):
        warm_up(dev)  # the method's own start-up (GPTQ: Triton, cuSOLVER), also behind the load
    net, tokenizer = load_model(model)
    if on_device and (resident == "device" or _fits(net, step.config, dev)):
        try:
            net.to(dev)
        except torch.OutOfMemoryError as exc:
            raise WeightsmithError(
                f"--resident device: the model does not fit on {dev}; use --resident host"
            ) from exc
    report, path = step.execute(net, tokenizer, dev, world)
    if world.main:
        Console().print(summary(report, path, step.format))
