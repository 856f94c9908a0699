"""Data-aware merges on the MiniLM three-task table (docs/merging-data-aware.md); RegMean's cost on a decoder.

1. The setting of benchmarks/merge_experiments.py (its ``Evaluator``, fine-tunes from merge_finetune.py): the
   shared encoder of three full fine-tunes (Rotten Tomatoes, debates, speeches) is merged, each task keeps its
   own head. Rows beside task arithmetic (lambda picked on validation from {0.5, 1.0} as in that script):
   - RegMean (alpha 0.9, and alpha picked on validation from {0.5, 0.9, 1.0}), each model's Gram
     matrices from ``--samples`` of its own training sentences;
   - Fisher merging, the Fisher of encoder + own head from ``--samples`` training sentences per task, labels
     ``predicted`` (the model's own label) and ``empirical`` (the data's);
   - AdaMerging, task-wise and layer-wise, started at task arithmetic's validation-chosen lambda, entropy on
     300 unlabelled test sentences per task (the paper's test-time setting), ``--steps`` Adam steps at
     ``--lr``; beside it the fixed coefficient it starts from.
2. RegMean through the recipe path on a decoder (``--decoder``, default the packaged SmolLM2-135M) merged with
   a perturbed copy of itself (there are no packaged SmolLM2 fine-tunes): wall time and peak RSS of a fresh
   process, ``--decoder-samples`` windows of 128 tokens of Hamlet per model, on ``--device``.

Run (CPU): ``.venv/bin/python benchmarks/evidence_merge_data.py`` (table + decoder), ``--only table`` or
``--only decoder``. GPU: ``--only decoder --device cuda --decoder PATH``. Writes
benchmarks/results/merge_data_evidence.md (and .json for the decoder timing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_experiments import GRID, TASKS, VAL_EXAMPLES, Evaluator, mean, row  # noqa: E402

from weightsmith.merge import Average, TaskArithmetic  # noqa: E402
from weightsmith.merge._dataaware import load_batches  # noqa: E402
from weightsmith.merge.adamerging import AdaMerging, learn_adamerging  # noqa: E402
from weightsmith.merge.fisher import Fisher, fisher_merge_modules  # noqa: E402
from weightsmith.merge.regmean import RegMean, regmean_merge  # noqa: E402
from weightsmith.tasks import SentenceClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "merge_data_evidence.md"
CACHE = ROOT.parent / ".cache" / "merge-data-evidence"
KEEP = ("input_ids", "attention_mask", "labels")


def task_batches(ev: Evaluator, task: str, opts: RegMean | Fisher | AdaMerging, single: bool = False) -> list:
    """Sentences of ``task`` tokenized as the tasks are (max_len 64), without token_type_ids."""
    raw = load_batches(ev.tok, task, opts, single=single)
    return [{k: v for k, v in b.items() if k in KEEP} for b in raw]


def classifiers(ev: Evaluator) -> list[SentenceClassifier]:
    """One classifier per task over ONE shared encoder module, each with its task's head."""
    out = []
    for t in TASKS:
        head = ev.heads[t]
        clf = SentenceClassifier(ev.model.encoder, head["weight"].shape[0])
        clf.head.load_state_dict(head)
        out.append(clf.eval())
    return out


def chosen_on_val(ev: Evaluator, make, grid) -> tuple[object, dict[str, torch.Tensor]]:
    """The grid value whose merge has the best mean validation accuracy, and that merge."""
    best, best_acc, best_state = None, -1.0, None
    for v in grid:
        state = make(v)
        acc = mean(ev.all_tasks(state, "val", VAL_EXAMPLES))
        if acc > best_acc:
            best, best_acc, best_state = v, acc, state
    assert best_state is not None
    return best, best_state


def table(args: argparse.Namespace) -> list[str]:
    ev = Evaluator()
    fts = [ev.fts[t] for t in TASKS]
    encoder = ev.model.encoder
    lines = ["| model | " + " | ".join(TASKS) + " | mean | setting |", "|---" * 6 + "|"]

    def add(name: str, state: dict[str, torch.Tensor], extra: str = "", t0: float | None = None) -> None:
        took = f"; {time.perf_counter() - t0:.0f} s" if t0 is not None else ""
        lines.append(row(name, ev.all_tasks(state, "test"), extra + took))
        print(lines[-1], flush=True)

    add("zero-shot (base encoder + task head)", ev.base)
    add("weighted average", ev.merge(Average()))
    lam, ta = chosen_on_val(ev, lambda v: ev.merge(TaskArithmetic(scaling=v)), GRID)
    add("task arithmetic", ta, f"lambda={lam} (val)")
    ta03 = ev.merge(TaskArithmetic(scaling=0.3))
    add("task arithmetic, lambda 0.3", ta03, "fixed")

    done: dict[float, dict[str, torch.Tensor]] = {}

    def regmean(alpha: float) -> dict[str, torch.Tensor]:
        if alpha not in done:
            cfg = RegMean(alpha=alpha, samples=args.samples, seq_len=64)
            data = [task_batches(ev, t, cfg, single=True) for t in TASKS]
            merged = regmean_merge(encoder, fts, data, cfg)
            done[alpha] = {k: merged[k] for k in ev.base}
        return done[alpha]

    t0 = time.perf_counter()
    add("RegMean (alpha 0.9)", regmean(0.9), f"{args.samples} train sentences/task", t0)
    alpha, rm = chosen_on_val(ev, regmean, (0.5, 0.9, 1.0))
    add("RegMean (alpha on val)", rm, f"alpha={alpha} (val)")

    clfs = classifiers(ev)
    for labels in ("predicted", "empirical"):
        cfg = Fisher(labels=labels, samples=args.samples, seq_len=64, batch_size=16)
        data = [task_batches(ev, t, cfg) for t in TASKS]
        t0 = time.perf_counter()
        merged = fisher_merge_modules(clfs, fts, data, cfg, names=list(ev.base), prefix="encoder.")
        add(f"Fisher merging (labels {labels})", merged, f"{args.samples} train sentences/task", t0)

    base = dict(ev.base)
    taus = [{k: ft[k].float() - base[k] for k in base} for ft in fts]
    for gran in ("task", "layer"):
        cfg = AdaMerging(
            granularity=gran, init=float(lam), steps=args.steps, lr=args.lr, samples=300, seq_len=64
        )
        data = [task_batches(ev, t, cfg) for t in TASKS]
        t0 = time.perf_counter()
        res = learn_adamerging(clfs, base, taus, data, cfg, prefix="encoder.")
        ent = f"entropy {res.losses[0]:.3f} -> {res.losses[-1]:.3f}"
        add(f"AdaMerging ({gran}-wise)", res.state(base, taus), f"init {lam}, {args.steps} steps, {ent}", t0)
    return lines


# ------------------------------------------------------------------------------------------ decoder cost


def perturbed_copy(src: Path) -> Path:
    """``src`` with every float tensor moved by 1e-3 of its mean |value| (same tensor names), config and
    tokenizer files copied: a stand-in second model (made once, outside the timed process)."""
    import shutil

    from safetensors.torch import save_file

    from weightsmith.store import open_store

    copy = CACHE / f"{src.name}-perturbed"
    if (copy / "model.safetensors").is_file():
        return copy
    g = torch.Generator().manual_seed(0)
    noisy = {
        n: (t + 1e-3 * t.float().abs().mean() * torch.randn(t.shape, generator=g)).to(t.dtype)
        if t.is_floating_point() else t
        for n, t in open_store(src).items()
    }  # fmt: skip
    copy.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and ".safetensors" not in f.name:  # weights (and a shard index) are rewritten
            shutil.copy(f, copy / f.name)
    save_file(noisy, str(copy / "model.safetensors"))
    return copy


def decoder_child(args: argparse.Namespace) -> None:
    """In a fresh process: RegMean of the decoder and its perturbed copy through the recipe path."""
    from weightsmith import models
    from weightsmith.merge import merge

    src = models.resolve(args.decoder)
    cfg = RegMean(data=("hamlet",), samples=args.decoder_samples, seq_len=128)
    t0 = time.perf_counter()
    merge([str(src), str(perturbed_copy(src))], cfg, CACHE / "regmean-out", device=args.device, force=True)
    wall = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_SELF)
    peak = use.ru_maxrss / 1024  # MiB (Linux: KiB); mapped safetensors pages that were read count too
    cpu = use.ru_utime + use.ru_stime  # the whole process, loading included
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"decoder": str(args.decoder), "device": args.device, "samples": args.decoder_samples,
                      "seq_len": 128, "models": 2, "wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1),
                      "peak_rss_mib": round(peak),
                      "peak_gpu_mib": None if gpu is None else round(gpu)}))  # fmt: skip


def decoder(args: argparse.Namespace) -> list[str]:
    from weightsmith import models

    perturbed_copy(models.resolve(args.decoder))
    cmd = [sys.executable, __file__, "--decoder-child", "--decoder", args.decoder, "--device", args.device,
           "--decoder-samples", str(args.decoder_samples)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    data = json.loads(res.stdout.strip().splitlines()[-1])
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return [
        "| decoder | device | models | calibration | wall (s) | process CPU (s) | peak RSS (MiB) "
        "| peak GPU (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.decoder} | {args.device} | 2 | {args.decoder_samples} x 128 tokens/model | "
        f"{data['wall_s']} | {data['process_cpu_s']} | "
        f"{data['peak_rss_mib']} | {data['peak_gpu_mib'] or '-'} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("table", "decoder"))
    ap.add_argument("--samples", type=int, default=256, help="training sentences per task (RegMean, Fisher)")
    ap.add_argument("--steps", type=int, default=100, help="AdaMerging Adam steps")
    ap.add_argument("--lr", type=float, default=1e-2, help="AdaMerging learning rate")
    ap.add_argument("--decoder", default="smollm2")
    ap.add_argument("--decoder-samples", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder-child", action="store_true")
    args = ap.parse_args()
    if args.decoder_child:
        decoder_child(args)
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = []
    if args.only in (None, "table"):
        parts.append("## MiniLM, three tasks (test accuracy, %)\n\n" + "\n".join(table(args)))
    if args.only in (None, "decoder"):
        parts.append("## RegMean on a decoder (recipe path)\n\n" + "\n".join(decoder(args)))
    text = "\n\n".join(parts) + f"\n\nwall time {time.perf_counter() - t0:.0f} s (torch threads 1)\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS if args.only is None else RESULTS.with_name(f"merge_data_evidence_{args.only}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
