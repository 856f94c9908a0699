"""GPTQ's fused block kernel (compress/_gptq_kernel.py) on one 1.1B-Llama block's stacked passes (q/k/v,
o, gate/up, down; 4 bits, group 128, act order) at each (rows per program, warps) setting: the wall time of
one ``gptq_quantize`` per pass, best of 3 (the codes do not depend on the setting). Run from the repo root:

    PYTHONPATH=src python benchmarks/gptq_kernel_tune.py
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gptq_kernel_tune.py --small   # CPU smoke test
"""

from __future__ import annotations

import sys
import time

import torch

from weightsmith.compress import _gptq_kernel as K
from weightsmith.compress.gptq import gptq_quantize

SMALL = "--small" in sys.argv
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cpu" if SMALL else "cuda")
gen = torch.Generator(device=dev).manual_seed(0)
d = 32 if SMALL else 1  # --small: every size / 32


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hessian(n: int) -> torch.Tensor:
    X = torch.randn(4096 // d, 64 // d, device=dev, generator=gen)
    X = X @ torch.randn(64 // d, n, device=dev, generator=gen) + 0.3 * torch.randn(X.shape[0], n, device=dev)
    return 2 * X.T @ X / X.shape[0]


def gptq(W: torch.Tensor, H: torch.Tensor, group: int, act_order: bool, fused: bool):  # type: ignore[no-untyped-def]
    return gptq_quantize(W, H, 4, group // d, True, 0.01, 128 // d, act_order, fused=fused)


def timed(fn, *args):  # type: ignore[no-untyped-def]
    sync()
    t = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t


# one Llama-1.1B decoder block: (rows, H) per pass when stacked, per layer when not
H2048, H5632 = hessian(2048 // d), hessian(5632 // d)
stacked = {
    "qkv": ((2048 + 256 + 256) // d, H2048),
    "o": (2048 // d, H2048),
    "gate_up": (2 * 5632 // d, H2048),
    "down": (2048 // d, H5632),
}
for name in ("qkv", "o", "gate_up", "down"):
    r, H = stacked[name]
    W = torch.randn(r, H.shape[0], device=dev, generator=gen)
    res = {}
    for br in (4, 8, 16, 32):
        for nw in (1, 2, 4):
            K.BLOCK_ROWS, K.NUM_WARPS = br, nw
            try:
                gptq(W[:64], H, 128, True, True)
                ts = [timed(gptq, W, H, 128, True, True)[1] for _ in range(3)]
            except Exception:
                res[(br, nw)] = "err"
                continue
            res[(br, nw)] = round(min(ts) * 1e3, 2)
    print(name, r, "x", H.shape[0], "ms by (rows, warps):", res, flush=True)
