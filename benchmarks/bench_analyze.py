"""weightsmith analyze vs WeightWatcher 0.7.x, side by side on the same machine and the same matrices.

    python benchmarks/bench_analyze.py --model smollm2 --device cpu --layers 6 --threads 1
    python benchmarks/bench_analyze.py --model llama1b --device cuda

``smollm2`` is the packaged SmolLM2-135M; ``llama1b`` is a randomly initialised Llama-shaped 1.1B model
(hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000) written tensor by tensor
to sharded safetensors (never materialised as a model); ``smollm2-random`` has SmolLM2's shapes with
random weights (for machines without the packaged asset). ``--layers N`` keeps the 2-D weights of the first
N decoder layers (plus the embeddings unless ``--no-embeddings``). Both tools see every selected 2-D
weight; WeightWatcher gets them as an in-memory float32 state dict (its loading is not timed), ours
reads them from the store (loading is timed). WeightWatcher runs with its defaults (no MP fit); ours
always includes the MP fit and is timed with and without FARMS. Writes a JSON line per run to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import time
from pathlib import Path


def _threads(n: int | None) -> None:
    if n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(n)


SHAPES = {
    # hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
    "llama1b": (2048, 22, 5632, 32, 4, 32000, False),
    "smollm2-random": (576, 30, 1536, 9, 3, 49152, True),
}


def build_llama(out: Path, model: str, seed: int = 0) -> Path:
    """Random-init Llama-shaped weights (std 0.02, norms 1), written shard by shard in bfloat16."""
    import torch

    from weightsmith.store import ShardWriter

    if (out / "model.safetensors.index.json").is_file():
        return out
    h, layers, inter, heads, kv, vocab, tied = SHAPES[model]
    hd = h // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    with ShardWriter(out, max_shard_bytes=1 << 30, force=True) as w:
        w.add("model.embed_tokens.weight", rand(vocab, h))
        for i in range(layers):
            p = f"model.layers.{i}."
            w.add(p + "self_attn.q_proj.weight", rand(heads * hd, h))
            w.add(p + "self_attn.k_proj.weight", rand(kv * hd, h))
            w.add(p + "self_attn.v_proj.weight", rand(kv * hd, h))
            w.add(p + "self_attn.o_proj.weight", rand(h, heads * hd))
            w.add(p + "mlp.gate_proj.weight", rand(inter, h))
            w.add(p + "mlp.up_proj.weight", rand(inter, h))
            w.add(p + "mlp.down_proj.weight", rand(h, inter))
            w.add(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
            w.add(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        w.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
        if not tied:
            w.add("lm_head.weight", rand(vocab, h))
    return out


def select_names(store, layers: int | None, embeddings: bool) -> list[str]:
    names = []
    for n in store:
        shape = store.meta(n).shape
        if len(shape) != 2 or min(shape) < 10:
            continue
        m = re.search(r"\.layers\.(\d+)\.", n)
        if m is None and not embeddings:
            continue
        if m is not None and layers is not None and int(m.group(1)) >= layers:
            continue
        names.append(n)
    return names


def run_ww(state: dict) -> tuple[float, dict[str, float]]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    start = time.perf_counter()
    details = ww.WeightWatcher(model=state).analyze()
    seconds = time.perf_counter() - start
    alphas = {}
    for row in details.itertuples():
        alphas[f"{row.name}.weight"] = float(row.alpha)
    return seconds, alphas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "smollm2-random", "llama1b"], required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both tools")
    ap.add_argument("--workdir", default="/tmp/weightsmith-bench")
    ap.add_argument("--out", default=None, help="append a JSON line with the results here")
    args = ap.parse_args()
    _threads(args.threads)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from weightsmith import models
    from weightsmith.analyze import analyze_weights
    from weightsmith.execute import resolve_device
    from weightsmith.select import Selector
    from weightsmith.store import DictStore, open_store

    dev = resolve_device(None if args.device == "auto" else args.device)
    if args.model == "smollm2":
        store = models.open_weights("smollm2")
    else:
        t = time.perf_counter()
        store = open_store(build_llama(Path(args.workdir) / args.model, args.model))
        print(f"built {args.model} safetensors in {time.perf_counter() - t:.1f} s", flush=True)
    names = select_names(store, args.layers, not args.no_embeddings)
    sel = Selector(predicate=set(names).__contains__)
    print(f"{args.model}: {len(names)} matrices on {dev}", flush=True)

    # warm-up (CUDA context, solver handles) for both tools on a small matrix
    tiny = {"warm.weight": torch.randn(64, 128)}
    analyze_weights(DictStore(tiny), device=dev)
    run_ww(tiny)

    timings = {}
    for farms in (False, True):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = analyze_weights(store, select=sel, device=dev, farms=farms, keep_esd=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timings["farms" if farms else "plain"] = time.perf_counter() - t
        print(f"weightsmith (farms={farms}): {timings['farms' if farms else 'plain']:.2f} s", flush=True)
    ours = {m["name"]: m["alpha"] for m in res.matrices}

    state = {n: store[n].float() for n in names}
    ww_seconds, ww_alphas = run_ww(state)
    del state
    print(f"WeightWatcher: {ww_seconds:.2f} s", flush=True)

    rel = []
    for n in names:
        a, b = ours.get(n), ww_alphas.get(n)
        if a is not None and b is not None and math.isfinite(b) and b > 0:
            rel.append(abs(a - b) / b)
    rel.sort()
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else None
    row = {
        "model": args.model,
        "device": str(dev),
        "machine": gpu or platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "matrices": len(names),
        "layers": args.layers,
        "ww_seconds": round(ww_seconds, 2),
        "ours_seconds": round(timings["plain"], 2),
        "ours_farms_seconds": round(timings["farms"], 2),
        "speedup": round(ww_seconds / timings["plain"], 1),
        "speedup_with_farms": round(ww_seconds / timings["farms"], 1),
        "alphas_compared": len(rel),
        "alpha_within_1pct": sum(r <= 0.01 for r in rel),
        "alpha_median_rel_diff": rel[len(rel) // 2] if rel else None,
        "alpha_max_rel_diff": rel[-1] if rel else None,
    }
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
