"""Evidence for the compress job: SmolLM2-135M held-out perplexity and size for RTN, AWQ, GPTQ, HQQ.

SmolLM2's packaged weights are dequantised Q4_1 (16 levels per block of 32), so 4-bit re-quantisation is
close to lossless by construction; 3 and 2 bits show the methods apart.

    .venv/bin/python benchmarks/evidence_compress.py --device cpu \
        --out benchmarks/results/compress_smollm2.json
    .venv/bin/python benchmarks/evidence_compress.py --device cuda --samples 128 --seq-len 512 \
        --eval-tokens 0 --out benchmarks/results/compress_smollm2_gpu.json

Writes a JSON list of rows and prints a Markdown table (also with ``--table JSON`` from a saved run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _evidence import common_args, heldout_perplexity, load_for, printed_table, save_rows

from weightsmith.compress import (
    calibration_batches,
    compress,
    save_compressed,
)
from weightsmith.config import config_from_dict


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "fp32"), None)
    lines = [
        "| method | bits | group | grid | held-out ppl | Δ vs fp32 | bits/weight | size on disk (MB) "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if base is None or r is base else f"{r['ppl'] - base['ppl']:+.2f}"
        size = "" if r.get("mb") is None else f"{r['mb']:.1f}"
        bpw = "" if r.get("bpw") is None else f"{r['bpw']:.2f}"
        grid = "" if "symmetric" not in r else ("sym" if r["symmetric"] else "asym")
        lines.append(
            f"| {r['method']} | {r.get('bits', 32)} | {r.get('group', '')} | {grid} | {r['ppl']:.2f} | "
            f"{delta} | {bpw} | {size} | {r.get('seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rtn,hqq,awq,gptq", help="names; NAME-asym for an asymmetric grid")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--groups", default="64,0", help="group sizes; 0 = per-channel")
    common_args(ap, samples=16, seq_len=256, eval_tokens=4096)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out; run the rest")
    args = ap.parse_args()
    if printed_table(args, table):
        return
    model, tok, dev = load_for(args)
    ppl = heldout_perplexity(tok, dev, args.eval_tokens)

    old = (
        json.loads(args.out.read_text()) if args.resume and args.out is not None and args.out.exists() else []
    )
    done = {(r["method"], r.get("bits"), r.get("group")) for r in old}
    rows: list[dict] = old or [{"method": "fp32", "ppl": ppl(model)}]
    print(rows[-1], flush=True)
    calib = calibration_batches(tok, "hamlet", args.samples, args.seq_len)
    sizes: dict[tuple[int, int], float] = {}
    for bits in [int(b) for b in args.bits.split(",")]:
        for group in [int(g) for g in args.groups.split(",")]:
            for method in args.methods.split(","):
                if (method, bits, group or "channel") in done:
                    continue
                name, _, variant = method.partition("-")  # "rtn-asym": the asymmetric grid
                opts = {"method": name, "bits": bits, "group_size": group}
                if variant == "asym":
                    opts["symmetric"] = False
                cfg = config_from_dict(opts, "compress")
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                m, report = compress(m, cfg, calib=calib if cfg.needs_calibration() else None, device=dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                key = (bits, group)
                if key not in sizes:  # the packed size depends on bits and group only
                    d = Path(tempfile.mkdtemp()) / "m"
                    save_compressed(m, report, d, tok)
                    sizes[key] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6
                    shutil.rmtree(d.parent)
                p = ppl(m)
                rows.append(
                    {
                        "method": method,
                        "bits": bits,
                        "group": group or "channel",
                        "ppl": p,
                        "bpw": report.bits_per_weight,
                        "mb": sizes[key],
                        "seconds": seconds,
                        "symmetric": cfg.symmetric,
                    }
                )
                save_rows(rows, args.out)
                del m
    print(table([r for r in rows if not math.isnan(r["ppl"])]))


if __name__ == "__main__":
    main()
