"""One Llama decoder block with LoRA on its 7 linears: the grouped q/k/v and gate/up node against the
per-layer path (weightsmith.adapters.lora_group, issue 14). Reports operator counts of one forward+backward
(torch.profiler) and the median time of a step, both paths timed alternately in one process.

CPU:  .venv/bin/python benchmarks/bench_lora_group.py --device cpu --threads 1
GPU:  .venv/bin/python benchmarks/bench_lora_group.py --device cuda --dtype bfloat16 --tokens 4096 --reps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from weightsmith import adapters
from weightsmith.adapters import lora_group
from weightsmith.adapters.lora import LoRA

TARGETS = "re:.*(q|k|v|o|gate|up|down)_proj"


def build(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype))
    adapters.adapt(model, LoRA(rank=args.rank, alpha=2.0 * args.rank), targets=TARGETS)
    return model, model.model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model, body = build(args)
    block, dev = body.layers[0], torch.device(args.device)
    dt = getattr(torch, args.dtype)
    x = torch.randn(args.tokens // args.seq, args.seq, args.hidden, device=dev, dtype=dt)
    x.requires_grad_(True)
    pos = body.rotary_emb(x, torch.arange(args.seq, device=dev)[None])

    def step() -> None:
        out = block(x, position_embeddings=pos)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
                              "tokens": args.tokens, "hidden": args.hidden, "rank": args.rank}  # fmt: skip
    times: dict[str, list[float]] = {"per_layer": [], "grouped": []}
    for name, on in (("per_layer", False), ("grouped", True)):
        lora_group.GROUP_SIBLINGS = on
        step()  # the grouped path learns which siblings share an input
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        counts = {e.key.removeprefix("aten::"): e.count for e in prof.key_averages()}
        keep = ("mm", "addmm", "add", "add_", "addmm_", "cat", "mul", "copy_")
        result[f"{name}_ops"] = {k: counts[k] for k in keep if counts.get(k)}
    for _ in range(2):
        for on in (False, True):
            lora_group.GROUP_SIBLINGS = on
            step()
    for _ in range(args.reps):  # alternate, so that a busy neighbour slows both alike
        for name, on in (("per_layer", False), ("grouped", True)):
            lora_group.GROUP_SIBLINGS = on
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        result[f"{name}_ms"] = round(1e3 * statistics.median(ts), 3)
    result["speedup"] = round(result["per_layer_ms"] / result["grouped_ms"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
