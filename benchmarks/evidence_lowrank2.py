"""Evidence for WeLore, MASA and Monarch compression on the packaged models (small CPU runs).

Parts (``--parts``, comma-separated):

- ``lm``: SmolLM2-135M (dequantised Q4_1) held-out perplexity for WeLore at each ``--keeps`` against truncated
  SVD with **uniform** ranks at the same stored-parameter fraction and with the energy-greedy **global**
  allocation; then WeLore's LRC fine-tuning (``finetune(task=lrc_task(...), adapter="head")``: only the
  low-rank factors train, on the first 90 % of Hamlet) for ``--ft-steps`` steps, perplexity before / after.
- ``cls``: a MiniLM sentence classifier fully fine-tuned by ``finetune`` on Rotten Tomatoes, then its encoder
  compressed by WeLore and by uniform / global SVD at equal parameters: validation accuracy.
- ``masa``: SmolLM2's attention projections as shared matrix atoms (MASA) vs per-layer SVD of the same
  layers with the same number of stored parameters: mean relative weight error and perplexity.
- ``monarch``: every Linear of SmolLM2 replaced by its nearest Monarch matrix vs a truncated SVD with the same
  parameters: mean relative weight error and perplexity.

    .venv/bin/python benchmarks/evidence_lowrank2.py --parts lm,cls,masa,monarch \\
        --out benchmarks/results/lowrank2_cpu.json

Perplexity: ``weightsmith.evaluate.perplexity`` on the first ``--eval-tokens`` tokens of Hamlet's last 10 %
(window 512, stride 256). Prints a Markdown table per part.
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
from torch import nn

from weightsmith.compress import compress, heldout_text, save_compressed
from weightsmith.compress._lowrank import LowRankWeight
from weightsmith.compress.masa import MASA, group_layers, masa_params
from weightsmith.compress.monarch_compress import MonarchCompress
from weightsmith.compress.svd import SVD
from weightsmith.compress.welore import WeLore, WeLoreReport, lrc_task
from weightsmith.evaluate import perplexity
from weightsmith.layers import find_layers
from weightsmith.models import load_model
from weightsmith.staging import write_text
from weightsmith.train.loop import finetune
from weightsmith.train.runs import load_finetuned


def stored_fraction(report: Any) -> float:
    """Stored numbers of the compressed layers (factors, plus N-LRCs kept dense) over their dense size."""
    dense_layers = report.dense_layers if isinstance(report, WeLoreReport) else []
    total = sum(r.shape[0] * r.shape[1] for r in [*report.layers, *dense_layers])
    kept = sum(w.params for w in report.weights.values() if isinstance(w, LowRankWeight))
    return (kept + sum(r.shape[0] * r.shape[1] for r in dense_layers)) / total


def md(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {}

    def save(self, part: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
        self.results[part] = rows
        print(md(rows, cols), flush=True)
        if self.args.out is not None:
            write_text(self.args.out, json.dumps(self.results, indent=1) + "\n")

    def smollm2(self) -> tuple[nn.Module, Any]:
        if not hasattr(self, "_lm"):
            self._lm = load_model("smollm2", task="causal-lm")
        return self._lm

    def ppl(self, model: nn.Module) -> float:
        _, tok = self.smollm2()
        with torch.no_grad():
            return perplexity(
                model, tok, heldout_text("hamlet"), window=512, stride=256, max_tokens=self.args.eval_tokens
            )

    # --------------------------------------------------------------------------------------------- lm
    def lm(self) -> None:
        base, tok = self.smollm2()
        rows: list[dict[str, Any]] = [{"method": "dense", "keep": 1.0, "ppl": self.ppl(base)}]
        for keep in self.args.keeps:
            t0 = time.perf_counter()
            m, rep = compress(copy.deepcopy(base), WeLore(keep=keep))
            frac = stored_fraction(rep)
            ranks = [w.rank for w in rep.weights.values()]
            rows.append(
                {
                    "method": "welore",
                    "keep": frac,
                    "ppl": self.ppl(m),
                    "seconds": time.perf_counter() - t0,
                    "lrc": len(rep.weights),
                    "dense": len(rep.dense_layers),
                    "ranks": f"{min(ranks)}-{max(ranks)}",
                }  # fmt: skip
            )
            print(rows[-1], flush=True)
            welore_model, welore_rep = m, rep
            for alloc in ("uniform", "global"):
                t0 = time.perf_counter()
                m, rep = compress(copy.deepcopy(base), SVD(keep=frac, allocation=alloc))
                ranks = [w.rank for w in rep.weights.values()]
                rows.append(
                    {
                        "method": f"svd-{alloc}",
                        "keep": stored_fraction(rep),
                        "ppl": self.ppl(m),
                        "seconds": time.perf_counter() - t0,
                        "lrc": len(rep.weights),
                        "dense": 0,
                        "ranks": f"{min(ranks)}-{max(ranks)}",
                    }  # fmt: skip
                )
                print(rows[-1], flush=True)
            if keep == self.args.keeps[0] and self.args.ft_steps:
                rows.append(self.lrc_finetune(welore_model, welore_rep, tok, frac))
        self.save("lm", rows, ["method", "keep", "ppl", "lrc", "dense", "ranks", "seconds"])

    def lrc_finetune(self, model: nn.Module, rep: Any, tok: Any, frac: float) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            save_compressed(model, rep, Path(tmp) / "w", tokenizer=tok, format="weightsmith")
            task = lrc_task(str(Path(tmp) / "w"), "hamlet", max_len=128, eval_examples=16)
            net, _ = task.build()
            before = task.evaluate(net, tok)
            result = finetune(
                task=task, adapter="head", lr=self.args.ft_lr, batch_size=8, max_steps=self.args.ft_steps,
                warmup=0.1, device="cpu", out=Path(tmp) / "run",
            )  # fmt: skip
        row = {
            "method": f"welore + LRC fine-tuning ({self.args.ft_steps} steps, lr {self.args.ft_lr})",
            "keep": frac,
            "ppl_task_eval_before": before,
            "ppl_task_eval_after": result.metric,
            "trainable": result.trainable_params,
            "total": result.total_params,
            "seconds": result.wall_time_s,
        }
        print(row, flush=True)
        return row

    # -------------------------------------------------------------------------------------------- cls
    def cls(self) -> None:
        a = self.args
        with tempfile.TemporaryDirectory() as tmp:
            run = finetune(
                "minilm", "rotten_tomatoes", "full", out=Path(tmp) / "ft", max_examples=a.cls_examples,
                eval_examples=a.cls_eval, epochs=1, batch_size=32, device="cpu",
            )  # fmt: skip
            net, tok, task = load_finetuned(Path(tmp) / "ft")
        rows: list[dict[str, Any]] = [
            {"method": "dense (fine-tuned)", "keep": 1.0, "acc": task.evaluate(net, tok)}
        ]
        sel = r"re:^encoder\.layer\.\d+\."
        for keep in a.cls_keeps:
            m = copy.deepcopy(net)
            _, rep = compress(m.encoder, WeLore(keep=keep, targets=sel))
            frac = stored_fraction(rep)
            rows.append(
                {"method": "welore", "keep": frac, "acc": task.evaluate(m, tok), "lrc": len(rep.weights)}
            )
            for alloc in ("uniform", "global"):
                m = copy.deepcopy(net)
                _, rep = compress(m.encoder, SVD(keep=frac, allocation=alloc, targets=sel))
                rows.append(
                    {"method": f"svd-{alloc}", "keep": stored_fraction(rep), "acc": task.evaluate(m, tok)}
                )
            print(rows[-3:], flush=True)
        rows.append({"method": "(fine-tuning run)", "acc": run.metric, "seconds": run.wall_time_s})
        self.save("cls", rows, ["method", "keep", "acc", "lrc", "seconds"])

    # ------------------------------------------------------------------------------------------- masa
    def masa(self) -> None:
        base, _ = self.smollm2()
        rows: list[dict[str, Any]] = []
        for atoms in self.args.atoms:
            m, rep = compress(copy.deepcopy(base), MASA(atoms=atoms))
            dense = sum(r.shape[0] * r.shape[1] for r in rep.layers)
            frac = masa_params(rep.weights) / dense
            err = sum(r.rel_error for r in rep.layers) / len(rep.layers)
            rows.append({"method": f"masa ({atoms} atoms / 30 layers)", "kept": frac, "mean_rel_err": err,
                         "ppl": self.ppl(m)})  # fmt: skip
            # the same budget as per-layer SVD: per projection type, L r (out + in) <= S out in + L S
            groups = group_layers([ly for ly in find_layers(base) if ly.name in rep.weights])
            m = copy.deepcopy(base)
            errs, kept = [], 0
            for group in groups.values():
                L, (o, i) = len(group), group[0].shape
                r = max(1, (atoms * o * i + L * atoms) // (L * (o + i)))
                sel = "re:^(" + "|".join(ly.name.replace(".", r"\.") for ly in group) + ")$"
                _, srep = compress(m, SVD(rank=r, allocation="uniform", targets=sel))
                errs += [x.rel_error for x in srep.layers]
                kept += sum(w.params for w in srep.weights.values())
            rows.append({"method": "per-layer svd, same budget", "kept": kept / dense,
                         "mean_rel_err": sum(errs) / len(errs), "ppl": self.ppl(m)})  # fmt: skip
            print(rows[-2:], flush=True)
        self.save("masa", rows, ["method", "kept", "mean_rel_err", "ppl"])

    # ---------------------------------------------------------------------------------------- monarch
    def monarch(self) -> None:
        base, _ = self.smollm2()
        rows: list[dict[str, Any]] = []
        for nb, b in self.args.monarch:
            m, rep = compress(copy.deepcopy(base), MonarchCompress(nblocks=nb, block_rank=b))
            dense = sum(r.shape[0] * r.shape[1] for r in rep.layers)
            kept = sum(w.params for w in rep.weights.values())  # type: ignore[attr-defined]
            err = sum(r.rel_error for r in rep.layers) / len(rep.layers)
            rows.append({"method": f"monarch nblocks={nb} block_rank={b}", "kept": kept / dense,
                         "mean_rel_err": err, "ppl": self.ppl(m)})  # fmt: skip
            m, rep = compress(copy.deepcopy(base), SVD(rank=nb * b, allocation="uniform"))
            kept = sum(w.params for w in rep.weights.values())  # type: ignore[attr-defined]
            err = sum(r.rel_error for r in rep.layers) / len(rep.layers)
            rows.append({"method": f"svd rank {nb * b} (same parameters)", "kept": kept / dense,
                         "mean_rel_err": err, "ppl": self.ppl(m)})  # fmt: skip
            print(rows[-2:], flush=True)
        self.save("monarch", rows, ["method", "kept", "mean_rel_err", "ppl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="lm,cls,masa,monarch")
    ap.add_argument("--keeps", default="0.9,0.8", help="WeLore budgets on SmolLM2")
    ap.add_argument("--cls-keeps", default="0.7,0.5", help="WeLore budgets on the MiniLM classifier")
    ap.add_argument("--cls-examples", type=int, default=2000)
    ap.add_argument("--cls-eval", type=int, default=500)
    ap.add_argument("--ft-steps", type=int, default=20)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--atoms", default="10,20", help="MASA atoms per projection type (of 30 layers)")
    ap.add_argument("--monarch", default="4:36,4:8", help="nblocks:block_rank pairs")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.keeps = [float(k) for k in args.keeps.split(",") if k]
    args.cls_keeps = [float(k) for k in args.cls_keeps.split(",") if k]
    args.atoms = [int(a) for a in args.atoms.split(",") if a]
    args.monarch = [tuple(int(x) for x in p.split(":")) for p in args.monarch.split(",") if p]
    runner = Runner(args)
    for part in args.parts.split(","):
        getattr(runner, part)()


if __name__ == "__main__":
    main()
