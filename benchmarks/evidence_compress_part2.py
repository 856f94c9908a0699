"""Evidence for compress part 2: SmolLM2-135M held-out perplexity under pruning and low-rank compression.

Pruning (magnitude, Wanda, SparseGPT, DSnoT on Wanda/magnitude masks) at unstructured sparsities and 2:4;
low-rank (truncated SVD, FWSVD, ASVD/SVD-LLM whitening) at kept-parameter fractions, with global rank
allocation. SmolLM2's packaged weights are dequantised Q4_1 (16 levels per block of 32).

    .venv/bin/python benchmarks/evidence_compress_part2.py --device cpu \
        --out benchmarks/results/compress_part2_smollm2_cpu.json
    .venv/bin/python benchmarks/evidence_compress_part2.py --device cuda --samples 128 --seq-len 512 \
        --sparsities 0.5,0.6,0.7 --keeps 0.9,0.8,0.7 --eval-tokens 0 \
        --out benchmarks/results/compress_part2_smollm2_gpu.json

Writes a JSON list of rows and prints a Markdown table (also with ``--table JSON`` from a saved run).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from _evidence import common_args, heldout_perplexity, load_for, printed_table, save_rows

from weightsmith.compress import calibration_batches, compress
from weightsmith.compress._lowrank import LowRankConfig, compress_lowrank
from weightsmith.config import config_from_dict


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["method"] == "dense"), None)
    lines = [
        "| method | setting | held-out ppl | Δ vs dense | sparsity / kept params | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if base is None or r is base else f"{r['ppl'] - base['ppl']:+.2f}"
        size = "" if r.get("size") is None else f"{r['size']:.3f}"
        lines.append(
            f"| {r['method']} | {r.get('setting', '')} | {r['ppl']:.2f} | {delta} | {size} | "
            f"{r.get('seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def prune_configs(
    sparsities: list[float], structured: list[str], methods: list[str]
) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for setting in [f"{s:g}" for s in sparsities] + structured:
        n, _, m = setting.partition(":")
        shape = {"n": int(n), "m": int(m)} if m else {"sparsity": float(setting)}
        for m in methods:
            name, _, init = m.partition("+")
            opts = {"method": name, **shape}
            if init:
                opts["init"] = init
            out.append((m, setting, opts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prune", default="magnitude,wanda,sparsegpt,dsnot+wanda,dsnot+magnitude")
    ap.add_argument("--sparsities", default="0.5")
    ap.add_argument("--nm", default="2:4", help="N:M patterns, comma-separated ('' for none)")
    ap.add_argument("--lowrank", default="svd,fwsvd,asvd")
    ap.add_argument("--keeps", default="0.9,0.8")
    common_args(ap, samples=16, seq_len=256, eval_tokens=4096)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out; run the rest")
    args = ap.parse_args()
    if printed_table(args, table):
        return
    model, tok, dev = load_for(args)
    ppl = heldout_perplexity(tok, dev, args.eval_tokens)

    old = json.loads(args.out.read_text()) if args.resume and args.out and args.out.exists() else []
    done = {(r["method"], r.get("setting")) for r in old}
    rows: list[dict[str, Any]] = old or [{"method": "dense", "ppl": ppl(model)}]
    print(rows[-1], flush=True)
    calib = calibration_batches(tok, "hamlet", args.samples, args.seq_len)
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    jobs = prune_configs(
        sparsities, [p for p in args.nm.split(",") if p], [p for p in args.prune.split(",") if p]
    )
    jobs += [
        (m, f"keep {k}", {"method": m, "keep": float(k)})
        for k in args.keeps.split(",")
        if k
        for m in args.lowrank.split(",")
        if m
    ]
    for label, setting, opts in jobs:
        if (label, setting) in done:
            continue
        cfg = config_from_dict(opts, "compress")
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        batches = calib if cfg.needs_calibration() else None
        if isinstance(cfg, LowRankConfig):
            m, report = compress_lowrank(m, cfg, calib=batches, device=dev)
            dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
            size = sum(f.params for f in report.weights.values()) / dense  # type: ignore[attr-defined]
        else:
            m, report = compress(m, cfg, calib=batches, device=dev)
            masks = [w.mask for w in report.weights.values()]  # type: ignore[attr-defined]
            size = 1.0 - sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"method": label, "setting": setting, "ppl": ppl(m), "size": size, "seconds": seconds})
        save_rows(rows, args.out)
        del m
    print(table(rows))


if __name__ == "__main__":
    main()
