"""RTN on a GPU-resident 1.1B Llama's weights: the torch path (same-shaped weights in float32 stacks) against
the fused Triton kernel (one launch a run of same-shaped weights, in place; compress/_rtn_triton.py).

The weights are TinyLlama-1.1B's decoder linears (hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
``--layers`` 22: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632), random normal x 0.02, in
``--dtype``, as ``nn.Linear`` weights on ``--device`` (``--model smollm2``: the packaged SmolLM2-135M's
instead, dequantised from its Q4_1 GGUF). Both paths run the data-free job as ``compress()`` does
(``compress_data_free`` with RTN's ``batched_quantize``; ``FUSED_DEVICES`` emptied for the torch path): codes,
scales, zeros and the per-layer errors (read back to the host) are returned and ``Ŵ`` is written over each
weight. Each repeat starts from the same weights (restored untimed). Printed: seconds (first run, which for
the kernel includes Triton's compile or its disk-cache load, and best of ``--repeats``), GB/s counted as the
bytes a single pass must move (read W, write Ŵ and a code byte a weight), and the speed-up; then the check
that both paths gave the same codes, scales, zeros and weights (the run fails otherwise) and the largest
relative gap between their per-layer errors (summation order: on SmolLM2's layer 0 the kernel's errors are
within 4e-8 of a float64 reference, the torch path's within 4e-7).

Also printed, for the kernel: the seconds ``import`` of compress/_rtn_triton.py (Triton's import) takes, and
the kernel alone (``rtn_fused`` called on the same runs as the data-free path makes, without its
bookkeeping; best of ``--repeats``): the host time until the last launch returns and the time until the
device is done (when the two are close the run is bound by the host's launches, not by memory). With
``--sweep``, the kernel alone also at tile sizes 2048-16384 elements a program and 4 or 8 warps.

    python benchmarks/bench_rtn_kernel.py --device cuda --dtype bf16 --out benchmarks/results/rtn_kernel.json

On a machine without CUDA, ``--device cpu`` runs the torch path only (Triton has no CPU backend); with
``TRITON_INTERPRET=1`` also the kernel under Triton's interpreter (a check of the wiring, far too slow to
mean anything as a time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from weightsmith.compress import RTN
from weightsmith.compress import _datafree as df
from weightsmith.layers import Layer
from weightsmith.staging import write_text

Result = df.DataFreeResult
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {  # TinyLlama-1.1B, one decoder layer: (out, in)
    "q_proj": (2048, 2048),
    "k_proj": (256, 2048),
    "v_proj": (256, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (5632, 2048),
    "up_proj": (5632, 2048),
    "down_proj": (2048, 5632),
}


def build(model: str, n_layers: int, dtype: torch.dtype, dev: torch.device) -> list[Layer]:
    """The decoder linears of the first ``n_layers`` layers: random TinyLlama-shaped ones, or the packaged
    SmolLM2-135M's (dequantised from its Q4_1 GGUF)."""
    if model == "smollm2":
        from weightsmith.compress._core import target_layers
        from weightsmith.models import load_model

        m = load_model("smollm2", dtype=dtype)[0].to(dev).requires_grad_(False)
        keep = tuple(f"model.layers.{i}." for i in range(n_layers))
        return [ly for ly in target_layers(m, RTN(group_size=0)) if ly.name.startswith(keep)]
    g = torch.Generator(device=dev).manual_seed(0)
    layers = []
    for i in range(n_layers):
        for name, (o, k) in SHAPES.items():
            lin = nn.Linear(k, o, bias=False, device=dev, dtype=dtype).requires_grad_(False)
            lin.weight.copy_(torch.randn(o, k, generator=g, device=dev) * 0.02)
            layers.append(Layer(f"model.layers.{i}.{name}.weight", lin, "linear"))
    return layers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(layers: list[Layer], cfg: RTN, dev: torch.device, fused: bool) -> tuple[float, list[Result]]:
    df.BATCH_DEVICES = (dev.type,)  # as on CUDA (on the CPU the loop would run instead)
    df.FUSED_DEVICES = (dev.type,) if fused else ()
    q, batched = (lambda W: cfg.quantize(W, None)), df.batch_quantizer(cfg)
    sync(dev)
    t0 = time.perf_counter()
    got = list(df.compress_data_free(layers, q, dev, False, batched))
    sync(dev)
    return time.perf_counter() - t0, got


def kernel_only(layers: list[Layer], cfg: RTN, dev: torch.device, repeats: int) -> tuple[float, float]:
    """Best (host, total) seconds of ``rtn_fused`` over the data-free path's runs of same-shaped weights
    (the weights are quantised again each repeat: the time does not depend on their values)."""
    from weightsmith.compress._rtn_triton import rtn_fused

    runs = [[layers[i].weight() for i in run] for run in df.batches(layers, df.BATCH_BYTES)]
    host, done = [], []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        for Ws in runs:
            rtn_fused(Ws, cfg.bits, cfg.group_size, cfg.symmetric)
        host.append(time.perf_counter() - t0)
        sync(dev)
        done.append(time.perf_counter() - t0)
    return min(host), min(done)


def sweep(
    layers: list[Layer], cfg: RTN, dev: torch.device, repeats: int, moved: int
) -> list[dict[str, float]]:
    """The kernel alone (:func:`kernel_only`) at each tile size (elements a program) and number of warps; each
    pair is one more compilation (untimed: a warm-up run first)."""
    from weightsmith.compress import _rtn_triton as rt

    keep, rows = (rt.TILE, rt.NUM_WARPS), []
    for tile in (2048, 4096, 8192, 16384):
        for warps in (4, 8):
            rt.TILE, rt.NUM_WARPS = tile, warps
            kernel_only(layers, cfg, dev, 1)
            host, done = kernel_only(layers, cfg, dev, repeats)
            row = {"tile": tile, "warps": warps, "host_s": host, "seconds": done, "gb_s": moved / done / 1e9}
            rows.append(row)
            gbs = row["gb_s"]
            print(f"tile {tile:>5}, {warps} warps: host {host:.4f} s, done {done:.4f} s, {gbs:,.0f} GB/s")
    rt.TILE, rt.NUM_WARPS = keep
    return rows


def same_codes(a: list[Result], b: list[Result]) -> bool:
    return all(
        torch.equal(getattr(x.compressed, t), getattr(y.compressed, t))
        for x, y in zip(a, b, strict=True)
        for t in ("q", "scale", "zero")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--model", choices=("random-llama-1b", "smollm2"), default="random-llama-1b")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers whose linears are quantised")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--sweep", action="store_true", help="also time the kernel alone at other tile sizes / warps"
    )
    ap.add_argument("--out", type=Path, default=None, help="the numbers, as JSON")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = RTN(bits=args.bits, group_size=args.group_size, symmetric=not args.asym)
    layers = build(args.model, args.layers, DTYPES[args.dtype], dev)
    original = [ly.weight().clone() for ly in layers]
    n = sum(w.numel() for w in original)
    moved = n * (2 * original[0].element_size() + 1)  # read W, write Ŵ, a code byte a weight
    print(f"{len(layers)} weights, {n / 1e9:.3f} G parameters, {args.dtype}, {moved / 1e9:.2f} GB a pass")
    t_import = time.perf_counter()
    from weightsmith.compress._rtn_triton import fusable

    t_import = time.perf_counter() - t_import
    print(f"import compress/_rtn_triton.py (Triton): {t_import:.3f} s")
    paths = ["torch", "fused"] if fusable(original[0], dev) else ["torch"]  # CUDA (or the CPU interpreter)
    rows: dict[str, dict[str, object]] = {}
    times: dict[str, list[float]] = {}
    finals: dict[str, tuple[list[torch.Tensor], list[df.DataFreeResult]]] = {}
    for path in paths:
        t = times[path] = []
        for _ in range(args.repeats):
            for ly, w in zip(layers, original, strict=True):
                ly.weight().copy_(w)
            dt, got = run(layers, cfg, dev, path == "fused")
            t.append(dt)
        finals[path] = ([ly.weight().clone() for ly in layers], got)
        gbs = moved / min(t) / 1e9
        rows[path] = {"seconds_first": t[0], "seconds_best": min(t), "seconds_all": t, "gb_s": gbs}
        print(f"{path:>5}: first {t[0]:.4f} s, best {min(t):.4f} s, {gbs:,.1f} GB/s")
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": args.model, "dtype": args.dtype, "layers": args.layers, "bits": args.bits,
        "group_size": args.group_size, "symmetric": not args.asym, "parameters": n, "bytes_a_pass": moved,
        "paths": rows,
    }  # fmt: skip
    if "fused" in finals:
        (w_t, r_t), (w_f, r_f) = finals["torch"], finals["fused"]
        same_w = all(torch.equal(a, b) for a, b in zip(w_t, w_f, strict=True))
        same_q = same_codes(r_t, r_f)
        worst = max(
            abs(a.rel_error - b.rel_error) / max(a.rel_error, 1e-30) for a, b in zip(r_t, r_f, strict=True)
        )
        tt, tf = times["torch"], times["fused"]
        speedup = {"seconds_first": tt[0] / tf[0], "seconds_best": min(tt) / min(tf)}
        print(f"speed-up: first {speedup['seconds_first']:.2f}x, best {speedup['seconds_best']:.2f}x")
        print(f"same weights: {same_w}, same codes/scales/zeros: {same_q}, worst error gap {worst:.2e}")
        result.update(speedup=speedup, same_weights=same_w, same_codes=same_q, worst_error_gap=worst)
        host, done = kernel_only(layers, cfg, dev, args.repeats)
        print(f"kernel alone: launches return after {host:.4f} s, device done after {done:.4f} s, "
              f"{moved / done / 1e9:,.1f} GB/s")  # fmt: skip
        result.update(import_seconds=t_import, kernel_host_seconds=host, kernel_seconds=done)
        if args.sweep:
            result["sweep"] = sweep(layers, cfg, dev, args.repeats, moved)
        if not (same_w and same_q):
            raise SystemExit("the fused kernel's weights or codes differ from the torch path's")
    if args.out:
        write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
