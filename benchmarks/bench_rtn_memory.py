"""Peak memory of RTN's compress and of its save, codes kept (as before) or recovered from Ŵ (now)."""

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightsmith.compress import RTN, compress, save_compressed
from weightsmith.compress import _datafree as df
from weightsmith.compress._grid import QuantizedWeight


def start(dev):  # CPU: reset VmHWM to the current RSS (Linux); CUDA: reset the peak
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def status(field):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))


def peak(dev, base):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20 - base
    return status("VmHWM") - base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--path", default="one", choices=["one", "batched", "fused"])
    ap.add_argument("--keep", action="store_true", help="every result keeps its codes (as before)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(a.device)
    df.BATCH_DEVICES = ("cuda",) if a.path == "one" else ("cpu", "cuda")
    df.FUSED_DEVICES = ("cuda",) if a.path == "fused" else ()
    os.environ["WEIGHTSMITH_RTN_KERNEL"] = "triton" if a.path == "fused" else "torch"
    if a.keep:
        df.written = lambda rs, places, check=True: [
            QuantizedWeight(r.q, r.scale, r.zero, r.bits, r.group_size, r.symmetric)
            if isinstance(r, QuantizedWeight)
            else r
            for r in rs
        ]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=a.hidden,
        intermediate_size=a.inter,
        num_hidden_layers=a.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM(cfg).eval().to(dtype).to(dev)
    base = start(dev)
    t0 = time.perf_counter()
    model, report = compress(model, RTN(bits=4, group_size=128), device=dev)
    secs = time.perf_counter() - t0
    cpeak = peak(dev, base)
    held = (torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else status("VmRSS")) - base
    with tempfile.TemporaryDirectory() as tmp:
        base2 = start(dev)
        t1 = time.perf_counter()
        save_compressed(model, report, os.path.join(tmp, "out"))
        ssecs, speak = time.perf_counter() - t1, peak(dev, base2)
    n = sum(r.shape[0] * r.shape[1] for r in report.layers)
    print(
        json.dumps(
            {
                "device": str(dev),
                "dtype": a.dtype,
                "path": a.path,
                "codes_kept": a.keep,
                "codes_mib": round(n / 2**20, 1),
                "compress_s": round(secs, 3),
                "compress_peak_mib": round(cpeak, 1),
                "held_after_compress_mib": round(held, 1),
                "save_s": round(ssecs, 3),
                "save_peak_mib": round(speak, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
