"""Evidence for compress part 1, second half: BitStack, BCQ (ShiftAddLLM) with mixed bits, UDFC on SmolLM2.

SmolLM2-135M's packaged weights are dequantised Q4_1 (16 levels per block of 32). Held-out perplexity on the
last 10 % of Hamlet (its first ``--eval-tokens`` tokens, windows of 512, stride 256); calibration windows from
the first 90 %.

- ``bitstack``: one decomposition (``--bs-levels`` blocks of rank ``--bs-rank`` per weight, the paper's
  perplexity sort on the calibration windows), saved with ``--format weightsmith``, then loaded at a range of
  memory budgets (``load_compressed(DIR, memory_mb=...)``): perplexity against stored bits per weight of
  the linear layers, and at the sizes of RTN's 2/3/4-bit group-64 checkpoints.
- ``bitstack-sort``: the paper's perplexity sort against the ``error`` proxy on the same decomposition,
  loaded at the same memory budgets (level boundaries and ``--bs-fractions`` of the way through each level).
- ``bcq``: binary-coding quantisation at 2/3/4 bits against RTN (symmetric and asymmetric) at the same code
  bits, group 64; and ShiftAddLLM's sensitivity-based mix at ``--avg-bits`` against uniform bits.
- ``udfc``: RTN and structured (output-channel) magnitude pruning with and without UDFC's data-free
  compensation in the next layer.
- ``udfc-minilm``: the same on MiniLM (true fp32 weights): relative error of the encoder's output on 64
  Rotten Tomatoes test sentences (the ``ppl`` column holds that error for these rows).
- ``qat``: MiniLM (true fp32 weights) on Rotten Tomatoes, trained by our own adapt job (``finetune``):
  full fine-tuning, then post-training quantisation of its encoder (RTN per channel, and the StatsQ grid),
  against oscillation-free QAT (the ``ofq`` adapter through the same training loop) at 2 and 3 bits.

    .venv/bin/python benchmarks/evidence_compress_quant2.py --device cpu --parts bitstack,bcq,udfc \\
        --out benchmarks/results/compress_quant2_smollm2_cpu.json
    .venv/bin/python benchmarks/evidence_compress_quant2.py --device cuda --samples 32 --seq-len 512 \\
        --eval-tokens 0 --bs-levels 10 --bcq-iters 15 \\
        --out benchmarks/results/compress_quant2_smollm2_gpu.json
    .venv/bin/python benchmarks/evidence_compress_quant2.py --device cpu --parts bitstack-sort --samples 2 \\
        --seq-len 64 --bs-levels 3 --bs-fractions 0.5 --bs-targets 're:model\\.layers\\.[0-3]\\.' \\
        --threads 2 --out benchmarks/results/bitstack_sort_smollm2_cpu.json

Writes a JSON list of rows and prints a Markdown table (also with ``--table JSON`` from a saved run).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _evidence import common_args, heldout_perplexity, printed_table, save_rows
from safetensors import safe_open

from weightsmith.compress import calibration_batches, compress, load_compressed, save_compressed
from weightsmith.compress._format import WEIGHTS, stack_sizes
from weightsmith.config import config_from_dict
from weightsmith.models import load_model


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| part | method | setting | code bits | stored bits/weight | ppl (qat: test accuracy) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = "" if r.get("bits") is None else f"{r['bits']:g}"
        bpw = "" if r.get("bpw") is None else f"{r['bpw']:.2f}"
        lines.append(
            f"| {r.get('part', '')} | {r['method']} | {r.get('setting', '')} | {bits} | {bpw} | "
            f"{r['ppl']:.2f} | {r.get('seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def stack_bpw(out: Path, rep: Any) -> tuple[list[float], list[float]]:
    """A saved BitStack directory's loadable sizes (MB, ``stack_sizes``) and, for each, the stored bits per
    weight of its linear layers (8 × bytes of signs, float16 factors and scales / their weights)."""
    numel = sum(r.shape[0] * r.shape[1] for r in rep.layers)
    with safe_open(str(out / WEIGHTS), "pt") as fh:
        other = sum(
            fh.get_tensor(k).numel() * fh.get_tensor(k).element_size()
            for k in fh.keys()  # noqa: SIM118
            if "bitstack" not in k
        )
    sizes = stack_sizes(out)
    return sizes, [8 * (s * 1e6 - other) / numel for s in sizes]


def bitstack_sorts(args: argparse.Namespace, add: Any, model: Any, tok: Any, run: Any, ppl: Any) -> None:
    """The same decomposition stacked by each of ``--bs-sorts`` (the paper's perplexity sort, the error
    proxy), loaded at the same memory budgets: every level boundary (where both stacks hold the same
    blocks) and ``--bs-fractions`` of the way through each level (where only the order within the level
    differs). The perplexity sort's cost is the difference of the two compress times."""
    if args.bs_levels < 2:
        raise SystemExit("--bs-levels must be >= 2 for bitstack-sort (level 1 is never sorted)")
    calib = calibration_batches(tok, "hamlet", args.samples, args.seq_len)
    fractions = [float(f) for f in args.bs_fractions.split(",") if f]
    budgets: list[float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for sort in [s for s in args.bs_sorts.split(",") if s]:
            opts = {"method": "bitstack", "levels": args.bs_levels, "rank": args.bs_rank, "sort": sort,
                    "sort_batches": args.bs_sort_batches, "randomized": not args.bs_exact_svd,
                    "targets": args.bs_targets}  # fmt: skip
            _, rep, sec = run(opts, calib)
            out = save_compressed(copy.deepcopy(model), rep, Path(tmp) / sort, tok, format="weightsmith")
            sizes, bpw = stack_bpw(out, rep)
            if budgets is None:  # level boundaries are the same MB for every sort
                per_level = (len(sizes) - 1) // (args.bs_levels - 1)
                ends = [sizes[lv * per_level] for lv in range(args.bs_levels)]
                inside = {a + f * (b - a) for a, b in zip(ends, ends[1:], strict=False) for f in fractions}
                budgets = sorted(set(ends) | inside)
            setting = f"levels {args.bs_levels}, rank {args.bs_rank}, sort {sort}"
            if args.bs_targets:
                setting += f", {len(rep.layers)} layers {args.bs_targets}"
            for mb in budgets:
                i = max(j for j, x in enumerate(sizes) if x <= mb + 1e-9)
                add({"part": "bitstack-sort", "method": f"bitstack ({sort} sort)",
                     "setting": f"{setting}; budget {mb:.3f} MB, prefix {i}", "sort": sort, "budget_mb": mb,
                     "prefix": i, "bpw": bpw[i], "ppl": ppl(load_compressed(out, memory_mb=mb)),
                     "seconds": sec, "sort_passes": len(sizes) - 1 if sort == "perplexity" else 0,
                     "calib": f"{args.samples} x {args.seq_len} tokens, sort_batches {args.bs_sort_batches}",
                     "threads": args.threads})  # fmt: skip


def udfc_minilm(args: argparse.Namespace, add: Any) -> None:
    """MiniLM (true fp32 weights): relative error of the encoder's output on Rotten Tomatoes sentences after
    RTN or channel pruning, without and with UDFC's compensation."""
    from weightsmith import assets

    enc, tok = load_model("minilm", task="encoder")
    texts = list(assets.load_dataset("rotten_tomatoes").test.x[:64])
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        ref = enc(**batch).last_hidden_state
    settings: list[dict[str, Any]] = [{"bits": b, "group_size": 0} for b in (2, 3, 4)]
    settings += [{"prune_only": True, "sparsity": s} for s in (0.1, 0.25)]
    for opts in settings:
        for variant in [v for v in args.udfc_variants.split(",") if v]:
            if variant == "self" and opts.get("prune_only"):
                continue  # nothing is quantised: "self" is "group"
            comp, combine = variant != "off", "group" if variant == "off" else variant
            cfg = config_from_dict(
                {"method": "udfc", **opts, "compensate": comp, "combine": combine}, "compress"
            )
            m, _ = compress(copy.deepcopy(enc), cfg)
            with torch.no_grad():
                err = float((m(**batch).last_hidden_state - ref).norm() / ref.norm())
            what = (
                f"{opts['bits']} bits, per channel"
                if "bits" in opts
                else f"{int(100 * opts['sparsity'])} % pruned"
            )
            add({"part": "udfc-minilm", "method": f"udfc ({combine})" if comp else "no compensation",
                 "setting": what, "ppl": err})  # fmt: skip


def qat(args: argparse.Namespace, add: Any) -> None:
    """MiniLM on Rotten Tomatoes: full fine-tuning + post-training quantisation vs OFQ QAT (accuracy)."""
    from weightsmith.adapters.ofq import OFQ, statsq
    from weightsmith.layers import find_layers
    from weightsmith.train import finetune
    from weightsmith.train.runs import load_finetuned

    common = {"max_examples": args.qat_examples, "eval_examples": args.qat_eval, "epochs": args.qat_epochs,
              "seed": 0, "device": args.device}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        full = finetune("minilm", "rotten_tomatoes", "full", out=Path(tmp) / "full", **common)
        add({"part": "qat", "method": "full fine-tune (fp32)", "setting": "minilm, rotten_tomatoes",
             "ppl": full.metric, "seconds": time.perf_counter() - t0})  # fmt: skip
        net, tok, task = load_finetuned(Path(tmp) / "full")
        for b in [int(x) for x in args.qat_bits.split(",") if x]:
            for label, sym in (("rtn", True), ("rtn-asym", False)):
                m = copy.deepcopy(net)
                compress(task.backbone(m), config_from_dict(
                    {"method": "rtn", "bits": b, "group_size": 0, "symmetric": sym}, "compress"))  # fmt: skip
                add({"part": "qat", "method": f"full + {label} (per channel)", "bits": b,
                     "ppl": task.evaluate(m, tok, "test", args.device)})  # fmt: skip
            m = copy.deepcopy(net)
            for ly in find_layers(task.backbone(m)):
                ly.write(statsq(ly.weight().detach().float(), b))
            add({"part": "qat", "method": "full + StatsQ grid (post-training)", "bits": b,
                 "ppl": task.evaluate(m, tok, "test", args.device)})  # fmt: skip
            variants = [("ofq QAT (StatsQ + CGA)", 0.75)] + (
                [("ofq QAT, no CGA", 1.0)] if args.qat_ablate else []
            )
            for label, start in variants:
                t0 = time.perf_counter()
                r = finetune("minilm", "rotten_tomatoes", OFQ(bits=b, anneal_start=start),
                             lr=args.qat_lr, **common)  # fmt: skip
                add({"part": "qat", "method": label, "bits": b, "ppl": r.metric,
                     "seconds": time.perf_counter() - t0})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bitstack,bcq,udfc")
    common_args(ap, samples=4, seq_len=128, eval_tokens=1024)
    ap.add_argument("--bs-levels", type=int, default=5)
    ap.add_argument("--bs-sort-batches", type=int, default=1)
    ap.add_argument("--bs-exact-svd", action="store_true", help="exact SVDs (default: randomized)")
    ap.add_argument("--bs-rank", type=int, default=8)
    ap.add_argument("--bs-sort", default="perplexity")
    ap.add_argument("--bs-sorts", default="error,perplexity", help="bitstack-sort: the sorts compared")
    ap.add_argument("--bs-targets", default=None, help="bitstack-sort: selector of the layers decomposed")
    ap.add_argument("--bs-fractions", default="0.25,0.5,0.75", help="bitstack-sort: budgets within a level")
    ap.add_argument("--bs-points", type=int, default=8, help="stack sizes evaluated along the curve")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bcq-iters", type=int, default=5)
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--udfc-sparsity", default="0.1,0.25")
    ap.add_argument("--udfc-variants", default="off,group,self", help="off (no compensation), group, self")
    ap.add_argument("--qat-bits", default="2,3")
    ap.add_argument("--qat-examples", type=int, default=2000)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-eval", type=int, default=400, help="validation / test examples scored")
    ap.add_argument("--qat-ablate", action="store_true", help="also QAT without CGA (anneal_start=1)")
    ap.add_argument("--qat-lr", type=float, default=None, help="QAT learning rate (default: ofq's)")
    ap.add_argument("--no-rtn", action="store_true", help="skip the RTN baseline rows (run them once)")
    args = ap.parse_args()
    if printed_table(args, table):
        return
    torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    rows: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out and args.out.exists() else []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        save_rows(rows, args.out)

    if "udfc-minilm" in parts:
        udfc_minilm(args, add)
    if "qat" in parts:
        qat(args, add)
    if set(parts) <= {"qat", "udfc-minilm"}:
        print(table(rows))
        return
    model, tok = load_model(args.model, task="causal-lm")
    dev = torch.device(args.device)
    bits_list = [int(b) for b in args.bits.split(",") if b]
    g = args.group_size

    ppl = heldout_perplexity(tok, dev, args.eval_tokens)

    def run(opts: dict[str, Any], calib: Any = None) -> tuple[torch.nn.Module, Any, float]:
        cfg = config_from_dict(opts, "compress")
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        m, report = compress(m, cfg, calib=calib if cfg.needs_calibration() else None, device=dev)
        return m, report, time.perf_counter() - t0

    if not any(r["method"] == "fp32" for r in rows):
        add({"part": "", "method": "fp32", "ppl": ppl(model)})
    calib = calibration_batches(tok, "hamlet", args.samples, args.seq_len)
    if ("bcq" in parts or "bitstack" in parts) and not args.no_rtn:
        for b in bits_list:
            for sym in (True, False):
                m, rep, sec = run({"method": "rtn", "bits": b, "group_size": g, "symmetric": sym})
                add({"part": "bcq", "method": "rtn" if sym else "rtn-asym", "setting": f"g{g}", "bits": b,
                     "bpw": rep.bits_per_weight, "ppl": ppl(m), "seconds": sec})  # fmt: skip
    if "bcq" in parts:
        for b in bits_list:
            m, rep, sec = run({"method": "bcq", "bits": b, "group_size": g, "iters": args.bcq_iters})
            bpw = float(rep.config.describe(rep).split()[0])
            add({"part": "bcq", "method": "bcq", "setting": f"g{g}", "bits": b, "bpw": bpw, "ppl": ppl(m),
                 "seconds": sec})  # fmt: skip
        opts = {"method": "bcq", "avg_bits": args.avg_bits, "group_size": g, "iters": args.bcq_iters}
        m, rep, sec = run(opts, calib)
        mix = {w.bits for w in rep.weights.values()}
        add({"part": "bcq", "method": "bcq-mixed", "setting": f"g{g}, bits {sorted(mix)} by sensitivity",
             "bits": args.avg_bits, "bpw": float(rep.config.describe(rep).split()[0]), "ppl": ppl(m),
             "seconds": sec})  # fmt: skip
    if "bitstack-sort" in parts:
        bitstack_sorts(args, add, model, tok, run, ppl)
    if "bitstack" in parts:
        opts = {"method": "bitstack", "levels": args.bs_levels, "rank": args.bs_rank, "sort": args.bs_sort,
                "sort_batches": args.bs_sort_batches, "randomized": not args.bs_exact_svd}  # fmt: skip
        _, rep, sec = run(opts, calib)
        with tempfile.TemporaryDirectory() as tmp:
            out = save_compressed(copy.deepcopy(model), rep, Path(tmp) / "bs", tok, format="weightsmith")
            sizes, stack_bits = stack_bpw(out, rep)
            picks = sorted(
                {round(i * (len(sizes) - 1) / (args.bs_points - 1)) for i in range(args.bs_points)}
            )
            setting = f"levels {args.bs_levels}, rank {args.bs_rank}, sort {args.bs_sort}"
            for i in picks:
                add({"part": "bitstack", "method": "bitstack", "setting": f"{setting}; stack prefix {i}",
                     "bpw": stack_bits[i], "ppl": ppl(load_compressed(out, memory_mb=sizes[i])),
                     "seconds": sec})  # fmt: skip
            for b in bits_list:  # the largest prefix no bigger than RTN's symmetric group-g checkpoint
                target = b + 16 / g
                i = (
                    max(j for j, x in enumerate(stack_bits) if x <= target + 1e-9)
                    if stack_bits[0] <= target
                    else None
                )
                if i is None:
                    continue
                add({"part": "bitstack", "method": "bitstack@rtn-size", "setting": f"{setting}; prefix {i}",
                     "bits": b, "bpw": stack_bits[i], "ppl": ppl(load_compressed(out, memory_mb=sizes[i])),
                     "seconds": sec})  # fmt: skip
    if "udfc" in parts:
        for b in bits_list:
            for variant in [v for v in args.udfc_variants.split(",") if v]:
                comp, combine = variant != "off", "group" if variant == "off" else variant
                opts = {"method": "udfc", "bits": b, "group_size": g, "compensate": comp, "combine": combine}
                m, rep, sec = run(opts)
                label = f"udfc ({combine})" if comp else "rtn (udfc off)"
                add({"part": "udfc", "method": label, "setting": f"g{g}", "bits": b, "ppl": ppl(m),
                     "seconds": sec})  # fmt: skip
        for s in [float(x) for x in args.udfc_sparsity.split(",") if x]:
            for comp in (False, True):
                opts = {"method": "udfc", "prune_only": True, "sparsity": s, "compensate": comp}
                m, rep, sec = run(opts)
                add({"part": "udfc", "method": "udfc" if comp else "channel prune (udfc off)",
                     "setting": f"{int(100 * s)} % channels pruned", "ppl": ppl(m),
                     "seconds": sec})  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
