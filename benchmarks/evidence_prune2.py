"""Evidence for ARMOR, D-Pruner and PST (compress part 2, pruning): SmolLM2-135M held-out perplexity.

- ``--part armor``: 2:4 pruning, Wanda / SparseGPT / ARMOR (from Wanda's and from SparseGPT's mask), held-out
  Hamlet perplexity. The paper's claim: ARMOR below Wanda and SparseGPT at 2:4.
- ``--part dpruner``: general text Hamlet, domain text the 2012 convention speeches (the packaged
  ``speeches`` data set, train split paragraphs for calibration, test split for perplexity). Magnitude,
  Wanda on either text, D-Pruner (and its domain-only ablation ``lam=0``) at one sparsity; perplexity on
  both held-out texts. The paper's claim: D-Pruner keeps domain perplexity lower than general-purpose pruners.
- ``--part pst``: PST's one-shot importance (magnitude + low-rank/structured movement score) vs magnitude
  (and the ablations rank 0 / unstructured), held-out Hamlet perplexity.

SmolLM2's packaged weights are dequantised Q4_1 (16 levels per block of 32).

    .venv/bin/python benchmarks/evidence_prune2.py --part armor --device cpu \
        --out benchmarks/results/prune2_armor_cpu.json      # likewise --part dpruner, --part pst

Writes a JSON list of rows and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _evidence import common_args, heldout_perplexity, load_for, printed_table, save_rows

from weightsmith.assets import load_dataset
from weightsmith.compress import calibration_batches, compress, heldout_text
from weightsmith.compress.armor import ARMOR
from weightsmith.compress.dpruner import DPruner, dpruner_compress
from weightsmith.compress.magnitude import Magnitude
from weightsmith.compress.pst import PST
from weightsmith.compress.sparsegpt import SparseGPT
from weightsmith.compress.wanda import Wanda


def speeches_text(split: str) -> str:
    d = load_dataset("speeches")
    return "\n\n".join(getattr(d, split).x)


def jobs(part: str, sparsity: float) -> list[tuple[str, str, Any]]:
    """(label, calibration text, config) per row; calibration "" = none, "both" = D-Pruner's two texts."""
    s = sparsity
    if part == "armor":
        return [
            ("wanda 2:4", "general", Wanda(n=2, m=4)),
            ("sparsegpt 2:4", "general", SparseGPT(n=2, m=4)),
            ("armor 2:4 (init wanda)", "general", ARMOR()),
            ("armor 2:4 (init sparsegpt)", "general", ARMOR(init="sparsegpt")),
        ]
    if part == "dpruner":
        return [
            (f"magnitude {s:g}", "", Magnitude(sparsity=s)),
            (f"wanda {s:g} (general calib)", "general", Wanda(sparsity=s)),
            (f"wanda {s:g} (domain calib)", "domain", Wanda(sparsity=s)),
            (f"dpruner {s:g} lam=1", "both", DPruner(sparsity=s, lam=1.0)),
            (f"dpruner {s:g} lam=0 (domain only)", "both", DPruner(sparsity=s, lam=0.0)),
            (f"dpruner {s:g} lam=1 row", "both", DPruner(sparsity=s, lam=1.0, prune_scope="row")),
        ]
    if part == "pst":
        return [
            (f"magnitude {s:g} layer", "", Magnitude(sparsity=s)),
            (f"magnitude {s:g} row", "", Magnitude(sparsity=s, prune_scope="row")),
            (f"pst {s:g} rank 8", "general", PST(sparsity=s)),
            (f"pst {s:g} rank 0 (row+column only)", "general", PST(sparsity=s, rank=0)),
            (f"pst {s:g} rank 8 unstructured-only", "general", PST(sparsity=s, structured=False)),
            (f"pst {s:g} rank 8 row", "general", PST(sparsity=s, prune_scope="row")),
            (f"pst {s:g} rank 8 alpha 0.1", "general", PST(sparsity=s, alpha=0.1)),
            (f"pst {s:g} rank 8 alpha 0.1 row", "general", PST(sparsity=s, alpha=0.1, prune_scope="row")),
            (f"pst {s:g} rank 8 alpha 0.01", "general", PST(sparsity=s, alpha=0.01)),
        ]
    raise SystemExit(f"--part {part}: use armor, dpruner or pst")


def table(rows: list[dict[str, Any]]) -> str:
    cols = [k for k in rows[0] if k.startswith("ppl")]
    head = "| method | " + " | ".join(cols) + " | sparsity | extra params | time (s) |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for r in rows:
        ppl = " | ".join(f"{r[c]:.2f}" for c in cols)
        extra = "" if r.get("extra") is None else f"{100 * r['extra']:.1f} %"
        sp = "" if r.get("sparsity") is None else f"{r['sparsity']:.3f}"
        lines.append(f"| {r['method']} | {ppl} | {sp} | {extra} | {r.get('seconds', 0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=("armor", "dpruner", "pst"))
    common_args(ap, samples=8, seq_len=256, eval_tokens=4096)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--armor-iters", type=int, default=30)
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    ap.add_argument("--skip-dense", action="store_true", help="do not score the dense model")
    args = ap.parse_args()
    if printed_table(args, table):
        return
    model, tok, dev = load_for(args)
    evals = {"ppl hamlet": heldout_text("hamlet")}
    if args.part == "dpruner":
        evals["ppl speeches"] = speeches_text("test")

    scorers = {k: heldout_perplexity(tok, dev, args.eval_tokens, t) for k, t in evals.items()}

    def ppls(m: torch.nn.Module) -> dict[str, float]:
        return {k: score(m) for k, score in scorers.items()}

    with tempfile.TemporaryDirectory() as tmp:
        domain_file = Path(tmp) / "speeches_train.txt"
        domain_file.write_text(speeches_text("train"), encoding="utf-8")
        calib = {
            "general": calibration_batches(tok, "hamlet", args.samples, args.seq_len),
            "domain": calibration_batches(tok, str(domain_file), args.samples, args.seq_len),
        }
        rows: list[dict[str, Any]] = [] if args.skip_dense else [{"method": "dense", **ppls(model)}]
        if rows:
            print(rows[-1], flush=True)
        only = {s for s in args.only.split(",") if s}
        for label, which, cfg in jobs(args.part, args.sparsity):
            if only and label not in only:
                continue
            if isinstance(cfg, ARMOR):
                cfg = ARMOR(init=cfg.init, iters=args.armor_iters)
            m = copy.deepcopy(model).to(dev)  # gradients (D-Pruner, PST) are taken where the model is
            t0 = time.perf_counter()
            if which == "both":
                m, report = dpruner_compress(m, cfg, calib["general"], calib["domain"], device=dev)
            else:
                m, report = compress(m, cfg, calib=calib.get(which), device=dev)
            seconds = time.perf_counter() - t0
            ws = list(report.weights.values())
            masks = [w.mask for w in ws]  # type: ignore[attr-defined]
            sparsity = 1.0 - sum(int(k.sum()) for k in masks) / sum(k.numel() for k in masks)
            extra = None
            if isinstance(cfg, ARMOR):
                extra = sum(w.A.numel() + w.B.numel() for w in ws) / sum(k.numel() for k in masks)  # type: ignore[attr-defined]
            rows.append(
                {"method": label, **ppls(m), "sparsity": sparsity, "extra": extra, "seconds": seconds}
            )
            save_rows(rows, args.out)
            del m
    print(table(rows))


if __name__ == "__main__":
    main()
