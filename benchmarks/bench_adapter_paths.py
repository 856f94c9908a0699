"""One adapted layer, one forward + backward: RandLoRA and BOFT on their activation and weight paths.

The shapes of the 1.1B Llama of ``bench_adapters.py`` (q/o 2048x2048, k/v 256x2048, gate/up 5632x2048,
down 2048x5632) at N = 4096 token rows (batch 4 x 1024), the layer attached by ``adapters.adapt`` (so the
core runs it as in a model), the input requiring grad (as in every layer but the first). Rows: the frozen
layer (the floor: forward + input gradient), our LoRA (rank 16, the reference), RandLoRA (rank 32) and
BOFT (block size 4, one factor; and block size 256) on each path and on ``auto``; multiply-adds from
``randlora_costs`` / ``boft_costs``. Median of ``--repeat`` timed calls after one warm-up (on the CPU:
thread CPU time, see ``clock``).

    python benchmarks/bench_adapter_paths.py                                  # CPU, fp32, 1 thread
    python benchmarks/bench_adapter_paths.py --device cuda --dtype bfloat16   # GPU
    python benchmarks/bench_adapter_paths.py --model smollm2                  # a real model, both paths

``--model smollm2``: SmolLM2-135M (dequantised from its Q4_1 GGUF), every linear of its 30 blocks adapted,
one causal-LM training step on 2 x 512 tokens of the packaged ``hamlet``: loss and adapter gradients of
each path against the activation path, and the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.boft import BOFT, boft_costs
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.randlora import RandLoRA, randlora_costs
from weightsmith.staging import write_text

SHAPES = {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}


def clock(device: str) -> float:
    """Seconds: on the CPU the calling thread's CPU time (one intra-op thread runs every op, backward too,
    on this thread), which other processes on a shared machine disturb far less than wall time."""
    return time.thread_time() if device == "cpu" else time.perf_counter()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_layer(
    cfg: Any, shape: tuple[int, int], tokens: int, device: str, dtype: torch.dtype, repeat: int
) -> float:
    out_f, in_f = shape
    net = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device, dtype)
    if cfg is None:
        net.requires_grad_(False)
    else:
        adapters.adapt(net, cfg, targets="0")
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out_f, device=device, dtype=dtype)
    times = []
    for i in range(repeat + 1):
        sync(device)
        t0 = clock(device)
        net(x).backward(g)
        sync(device)
        if i:
            times.append(clock(device) - t0)
        x.grad = None
        net.zero_grad(set_to_none=True)
    return statistics.median(times) * 1e3


def model_step(method: Any, tokens: int, repeat: int) -> None:
    import copy

    from weightsmith.assets import load_text
    from weightsmith.models import load_model
    from weightsmith.tasks import lm_loss

    base, tok = load_model("smollm2")
    ids = tok(load_text("hamlet"), return_tensors="pt")["input_ids"][:, 1000 : 1000 + tokens].view(2, -1)
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    print("| method | path | step ms | loss | max rel. gradient difference vs activation |")
    print("|---|---|---|---|---|")
    for name, make in method:
        ref = None
        for path in ("activation", "weight", "auto"):
            model = copy.deepcopy(base).train()
            adapters.adapt(model, make(path), targets=targets)
            params = list(adapters.adapter_parameters(model))
            with torch.no_grad():
                for i, p in enumerate(params):  # move off the init (RandLoRA's λ = 0, BOFT's R = 0)
                    p.add_(0.001 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            times = []
            for _ in range(repeat):
                for p in params:
                    p.grad = None
                t0 = clock("cpu")
                loss = lm_loss(model(input_ids=ids).logits, ids)
                loss.backward()
                times.append(clock("cpu") - t0)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
            if ref is None:
                ref, diff = grads, 0.0
            else:
                diff = max(
                    float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(grads, ref, strict=True)
                )
            ms = statistics.median(times) * 1e3
            print(f"| {name} | {path} | {ms:.0f} | {float(loss.detach()):.6f} | {diff:.1e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="q/o,k/v,gate/up,down", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--methods", default="randlora,boft", help="comma list of randlora, boft")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    ap.add_argument("--model", default="", help="smollm2: one training step of the real model per path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        if args.model != "smollm2":
            raise SystemExit(f"--model: only smollm2 is packaged, got {args.model!r}")
        methods = [
            ("randlora r32", lambda p: RandLoRA(rank=32, path=p)),
            ("boft b4", lambda p: BOFT(block_size=4, path=p)),
        ]
        model_step(methods, 1024 if args.tokens == 4096 else args.tokens, args.repeat)
        return
    dtype = getattr(torch, args.dtype)
    N = args.tokens
    rows = []
    print("| shape | method | path | ms | ms / LoRA | multiply-adds (G) |")
    print("|---|---|---|---|---|---|")
    for label in args.shapes.split(","):
        out_f, in_f = SHAPES[label]
        d = min(out_f, in_f)
        k_rl = 32 * -(-d // 32)
        rl_act, rl_w = randlora_costs(N, out_f, in_f, k_rl, True, True)
        cases: list[tuple[str, str, Any, int | None]] = [
            ("frozen", "-", None, 2 * N * out_f * in_f),
            ("lora r16", "-", LoRA(rank=16, alpha=32.0), None),
        ]
        for path in ("activation", "weight", "auto") if "randlora" in args.methods else ():
            use_w = path == "weight" or (path == "auto" and rl_w < rl_act)
            cases.append(("randlora r32", path, RandLoRA(rank=32, path=path), rl_w if use_w else rl_act))
        for b in (4, 256) if "boft" in args.methods else ():
            b_act, b_w = boft_costs(N, out_f, in_f, b, 1, True, True)
            for path in ("activation", "weight", "auto"):
                use_w = path == "weight" or (path == "auto" and b_w < b_act)
                cases.append((f"boft b{b}", path, BOFT(block_size=b, path=path), b_w if use_w else b_act))
        lora_ms = None
        for name, path, cfg, macs in cases:
            ms = time_layer(cfg, (out_f, in_f), N, args.device, dtype, args.repeat)
            lora_ms = ms if name.startswith("lora") else lora_ms
            ratio = f"{ms / lora_ms:.2f}" if lora_ms else "-"
            gmacs = f"{macs / 1e9:.1f}" if macs else "-"
            print(f"| {out_f}x{in_f} | {name} | {path} | {ms:.0f} | {ratio} | {gmacs} |", flush=True)
            rows.append(dict(shape=[out_f, in_f], method=name, path=path, ms=ms, macs=macs, tokens=N,
                             device=args.device, dtype=args.dtype, threads=args.threads))  # fmt: skip
    if args.out is not None:
        write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
