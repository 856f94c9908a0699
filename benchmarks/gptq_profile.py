"""Where the time of ``ws.compress(model, GPTQ(...))`` goes, phase by phase (issue 9), on the random
1.1B Llama of ``benchmarks/bench_compress.py`` (hidden 2048, 22 layers; float32, on the CPU, one block on
the device at a time), the issue's settings: 4 bits, group 128, act order, 64 x 512 calibration tokens.
Run from the repo root with ``PYTHONPATH=src``:

    python benchmarks/gptq_profile.py --device cuda [--dtype bf16] [--tf32] [--kernels] [--out OUT.json]
    python benchmarks/gptq_profile.py --device cpu --model random-llama-tiny --samples 8 --seq-len 64 \
        --group-size 16   # CPU smoke test

``--tf32`` (float32 model): the calibration forwards and Gram matrices with TF32 matrix products (the
option ``tf32=true``). The first call is timed on its own ("cold": CUDA libraries loading, Triton compiling
the GPTQ kernel), then one plain run (the wall time a user sees in a warm process) and one with the
block moves not overlapped with the device's work (``layers.OVERLAP_TRANSFERS = False``), then one run with
every phase boundary synchronised (``torch.cuda.synchronize``) and timed with its own time only (a phase's
time leaves out the phases inside it): the calibration forward passes (the statistics pass; the capture of
block 0's inputs and the changed blocks' outputs), the Gram accumulation in the hooks, moving blocks between
the host and the device, the GPTQ solve (its inverse-Hessian factor apart), stacking / splitting rows and
writing Ŵ back, the error report, and then packing the codes and writing the compressed-tensors checkpoint.
``--kernels``: also the top CUDA kernels of one run (torch.profiler). The synchronised run is slower than
the plain one (no overlap across the boundaries); its shares are what to read.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_compress import random_llama  # noqa: E402

from weightsmith import layers as L  # noqa: E402
from weightsmith.compress import GPTQ, calibration_batches, compress, save_compressed  # noqa: E402
from weightsmith.compress import _core as _core  # noqa: E402
from weightsmith.compress import _format as _format  # noqa: E402
from weightsmith.compress import gptq as gptq  # noqa: E402
from weightsmith.compress._core import calibration_text  # noqa: E402


class Phases:
    """Exclusive wall time per phase: wrapped functions synchronise the device on entry and exit."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []  # [label, start, time spent in inner phases]
        self.undo: list[Callable[[], None]] = []

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        real = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            self.stack.append([label, time.perf_counter(), 0.0])
            try:
                return real(*args, **kwargs)
            finally:
                self.sync()
                _, t0, inner = self.stack.pop()
                took = time.perf_counter() - t0
                self.time[label] += took - inner
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1][2] += took

        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, real))

    def restore(self) -> None:
        for u in reversed(self.undo):
            u()
        self.undo.clear()


def instrument(p: Phases) -> None:
    import safetensors.torch

    p.wrap(_core, "compress", "other (layer lists, setup)")
    p.wrap(_core, "walk_blocks", "forward: capture block 0 inputs + changed blocks' outputs")
    p.wrap(L, "_stats_pass", "forward: statistics pass (hooks' bookkeeping)")
    p.wrap(L.InputStats, "add", "Gram accumulation (InputStats.add)")
    p.wrap(L._Hooks, "close", "finite check (+ all-reduce)")
    p.wrap(nn.Module, "to", "move blocks host <-> device")
    p.wrap(L, "_move_outside", "move blocks host <-> device")
    p.wrap(gptq.GPTQ, "compress_block", "GPTQ: stack rows, split, dequantize, write W^")
    p.wrap(gptq, "gptq_quantize", "GPTQ solve (gptq_quantize)")
    p.wrap(gptq, "inverse_hessian_factor", "GPTQ solve: inverse-Hessian factor")
    p.wrap(_core, "_record", "error report (_record)")
    p.wrap(_format, "save_compressed", "save: config, tokenizer, staging")
    p.wrap(_format, "_quantized_tensors", "save: codes to host + pack")
    p.wrap(safetensors.torch, "save_file", "save: write safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="random-llama-1b", help="random-llama-1b or random-llama-tiny")
    ap.add_argument("--text", type=Path, default=None, help="a text file instead of the packaged Hamlet")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="also the top CUDA kernels (torch.profiler)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--tf32", action="store_true", help="the tf32 option (CUDA): TF32 forwards and Gram")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the library's default arithmetic (float32 GEMMs)
    dev = torch.device(args.device)
    full = args.text.read_text(encoding="utf-8") if args.text else calibration_text("hamlet")
    base, tok = random_llama(args.model.removeprefix("random-llama-"), full)
    if args.dtype == "bf16":
        base = base.to(torch.bfloat16)
    cut = full.rfind("\n", 0, int(len(full) * 0.9)) + 1
    calib_file = Path(tempfile.mkdtemp(prefix="gptq-profile-")) / "calib.txt"
    calib_file.write_text(full[:cut], encoding="utf-8")
    calib = calibration_batches(tok, str(calib_file), args.samples, args.seq_len)
    cfg = GPTQ(bits=args.bits, group_size=args.group_size, act_order=not args.no_act_order, tf32=args.tf32)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")

    def run() -> tuple[nn.Module, Any, float]:
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        m, report = compress(m, cfg, calib=calib, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return m, report, time.perf_counter() - t0

    def save(m: nn.Module, report: Any) -> float:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            save_compressed(m, report, Path(out) / "q", tok)
        return time.perf_counter() - t0

    _, _, cold = run()  # the first call: CUDA context, cuBLAS / cuSOLVER handles, Triton compilation
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    m, report, plain = run()
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    plain_save = save(m, report)
    del m
    L.OVERLAP_TRANSFERS = False  # every block moved at once on the main stream, as before the side stream
    _, _, serial_moves = run()
    L.OVERLAP_TRANSFERS = True

    # the floor of the forward passes: the whole model on the device, no hooks, twice over the samples
    fwd = copy.deepcopy(base).to(dev)
    with torch.no_grad():
        for _ in range(2):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for b in calib:
                fwd.model(b["input_ids"].to(dev), use_cache=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            one_forward = time.perf_counter() - t0
    del fwd

    p = Phases(dev)
    instrument(p)
    try:
        t0 = time.perf_counter()
        m, report = _core.compress(copy.deepcopy(base), cfg, calib=calib, device=dev)
        timed_compress = time.perf_counter() - t0
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            _format.save_compressed(m, report, Path(out) / "q", tok)
        timed_save = time.perf_counter() - t0
    finally:
        p.restore()
    blocks = len(L.decoder_blocks(base)[1])
    adds = p.calls["Gram accumulation (InputStats.add)"]
    print(f"\nfirst (cold) compress in this process: {cold:.2f} s")
    print(f"plain compress: {plain:.2f} s (peak {peak:,.0f} MiB); save: {plain_save:.2f} s")
    print(f"plain compress with the block moves not overlapped: {serial_moves:.2f} s")
    print(f"one forward of the whole model over the samples, model on the device: {one_forward:.2f} s")
    print(f"Gram accumulations: {adds} = {adds / blocks / len(calib):.1f} a block a batch")
    print(f"\nsynchronised run: compress {timed_compress:.2f} s, save {timed_save:.2f} s\n")
    total = timed_compress + timed_save
    print("| phase | s | share | calls |\n|---|---|---|---|")
    for label, t in sorted(p.time.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {t:.3f} | {t / total:.1%} | {p.calls[label]} |")
    result: dict[str, Any] = {
        "device": str(dev), "model": args.model, "samples": args.samples, "seq_len": args.seq_len,
        "dtype": args.dtype, "tf32": args.tf32, "torch": torch.__version__, "cold_compress_s": cold,
        "plain_compress_s": plain, "plain_save_s": plain_save, "peak_mib": peak,
        "serial_moves_s": serial_moves,
        "one_forward_s": one_forward, "gram_adds": adds, "blocks": blocks, "batches": len(calib),
        "synchronised": {"compress_s": timed_compress, "save_s": timed_save,
                         "phases": dict(p.time), "calls": dict(p.calls)},
    }  # fmt: skip
    if args.kernels and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(table)
        result["kernels"] = table
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
