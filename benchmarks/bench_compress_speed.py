"""Speed of compressed layers: prefill and decode throughput of a Llama-shaped model, dense / 2:4 / low-rank.

A random-weight Llama (``--size 1b``: TinyLlama-1.1B's shape, hidden 2048, 22 layers, intermediate 5632,
32 heads, 4 KV heads; ``--size tiny`` for a CPU smoke run) in fp16/bf16, every ``nn.Linear`` of the decoder
blocks (not ``lm_head``) in three forms:

- ``dense``: as built;
- ``sparse-2:4``: magnitude 2:4 masks (``weightsmith.compress._sparse.nm_mask``), the weights then packed by
  ``torch.sparse.to_sparse_semi_structured`` so ``F.linear`` runs PyTorch's semi-structured sparse kernels
  (cuSPARSELt or CUTLASS; CUDA with fp16/bf16 only: skipped elsewhere, with a message). The logits are
  checked against the same masked weights run densely;
- ``lowrank-50%``: every Linear as two thin Linears (``weightsmith.compress.thin_linears``) at the uniform
  rank that keeps 50 % of its parameters, ``r = ⌊0.5 · out · in / (out + in)⌋``: two GEMMs per layer.

Prefill: tokens/s of one forward pass over ``--prefill-batch × --prefill-len`` tokens. Decode: tokens/s of
``--new-tokens`` greedy steps with the KV cache after a ``--prompt-len`` prompt, for each batch size in
``--decode-batches``. Only the last position's logits are computed (``logits_to_keep=1``), as a server
does. Each number is the median of ``--repeats`` timed runs after a warm-up run.

    .venv/bin/python benchmarks/bench_compress_speed.py --device cuda --size 1b \\
        --out benchmarks/results/compress_speed_1b_h200.json
    .venv/bin/python benchmarks/bench_compress_speed.py --device cpu --size tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.compress._lowrank import thin_linears, uniform_ranks
from weightsmith.compress._sparse import nm_mask
from weightsmith.layers import find_layers
from weightsmith.staging import write_text

SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}  # fmt: skip
DEFAULTS = {  # prefill batch, prefill length, prompt length, new tokens, repeats
    "1b": (4, 1024, 128, 128, 5),
    "tiny": (2, 64, 16, 8, 2),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(size: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size]))
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tps(model: nn.Module, batch: int, length: int, device: torch.device, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    return (
        batch
        * length
        / timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, repeats)
    )


def cache_key(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_tps(
    model: nn.Module, batch: int, prompt: int, new: int, device: torch.device, repeats: int
) -> float:
    import copy

    key = cache_key(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def steps() -> None:  # greedy decoding from a copy of the prompt's cache
        cache = copy.deepcopy(out[key])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            step = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{key: cache})
            cache, nxt = step[key], step.logits[:, -1:].argmax(-1)

    return batch * new / timed(steps, device, repeats)


def linear_params(model: nn.Module) -> int:
    """Stored numbers of the decoder blocks' Linear weights (a 2:4 weight counts its kept half)."""
    from torch.sparse import SparseSemiStructuredTensor

    total = 0
    for name, p in model.named_parameters():
        if "layers." in name and name.endswith("weight") and p.dim() == 2:
            total += p.numel() // 2 if isinstance(p, SparseSemiStructuredTensor) else p.numel()
    return total


def mask_24(model: nn.Module) -> None:
    """Magnitude 2:4 masks applied in place to every Linear of the decoder blocks (still dense)."""
    with torch.no_grad():
        for ly in find_layers(model):
            W = ly.module.weight
            W.mul_(nm_mask(W.abs().float(), 2, 4).to(W.dtype))


def pack_24(model: nn.Module) -> None:
    """The (already 2:4) weights packed as semi-structured sparse tensors."""
    from torch.sparse import to_sparse_semi_structured

    for ly in find_layers(model):
        lin = ly.module
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)


def lowrank_50(model: nn.Module) -> None:
    """Every Linear of the blocks as two thin Linears at the uniform rank keeping 50 % of its parameters."""
    layers = find_layers(model)
    ranks = uniform_ranks({ly.name: ly.shape for ly in layers}, 0.5)
    thin_linears(model, dict(ranks))
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".down.weight" in name or ".up.weight" in name:
                init = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
                p.copy_(init.to(p.device, p.dtype))


@torch.inference_mode()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def measure(model: nn.Module, name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "linear_params": linear_params(model)}
    row["prefill_tok_s"] = prefill_tps(model, args.prefill_batch, args.prefill_len, device, args.repeats)
    for b in args.decode_batches:
        row[f"decode_b{b}_tok_s"] = decode_tps(
            model, b, args.prompt_len, args.new_tokens, device, args.repeats
        )
    print(f"{name}: {row}", flush=True)
    return row


def table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    base = rows[0]
    head = "| variant | block Linear params (M) | prefill tok/s | " + " | ".join(
        f"decode b={b} tok/s" for b in batches
    )
    lines = [head + " |", "|---" * (3 + len(batches)) + "|"]
    for r in rows:
        cells = [f"{r['variant']}", f"{r['linear_params'] / 1e6:.1f}"]
        for key in ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in batches]:
            x = f"{r[key]:,.0f}"
            cells.append(x if r is base else f"{x} ({r[key] / base[key]:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument("--prefill-batch", type=int, default=None)
    ap.add_argument("--prefill-len", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--decode-batches", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    for key, value in zip(
        ("prefill_batch", "prefill_len", "prompt_len", "new_tokens", "repeats"),
        DEFAULTS[args.size],
        strict=True,
    ):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size} Llama, {dtype}, {device} ({gpu})")

    rows = [measure(build(args.size, dtype, device), "dense", args, device)]
    notes: list[str] = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        model = build(args.size, dtype, device)
        mask_24(model)
        probe = torch.randint(0, model.config.vocab_size, (1, 128), device=device)
        ref = logits(model, probe)
        pack_24(model)
        err = float((logits(model, probe) - ref).norm() / ref.norm())
        notes.append(f"2:4 semi-structured logits vs the same masks run densely: relative error {err:.2e}")
        rows.append({**measure(model, "sparse-2:4", args, device), "logit_rel_err_vs_masked_dense": err})
        del model
    else:
        notes.append(
            "sparse-2:4 skipped: torch.sparse.to_sparse_semi_structured needs CUDA and fp16/bf16 weights "
            f"(here {device.type}, {dtype})"
        )
    model = build(args.size, dtype, device)
    lowrank_50(model)
    rows.append(measure(model, "lowrank-50%", args, device))
    for n in notes:
        print(n)
    md = table(rows, args.decode_batches)
    print(md)
    if args.out is not None:
        meta = {
            "size": args.size,
            "config": SIZES[args.size],
            "dtype": str(dtype),
            "device": gpu,
            "torch": torch.__version__,
            "prefill": [args.prefill_batch, args.prefill_len],
            "decode": {
                "prompt": args.prompt_len,
                "new_tokens": args.new_tokens,
                "batches": args.decode_batches,
            },
            "repeats": args.repeats,
            "notes": notes,
        }
        write_text(args.out, json.dumps({"meta": meta, "rows": rows, "table": md}, indent=2) + "\n")


if __name__ == "__main__":
    main()
