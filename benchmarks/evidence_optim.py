"""Evidence for the train job's optimisers on packaged data: equal steps, loss / metric and optimizer state.

Fine-tunes every weight of MiniLM on rotten_tomatoes (accuracy) and of SmolLM2-135M on hamlet (perplexity)
with AdamW, GaLore (SVD, rSVD, DCT projectors), Q-GaLore (INT4 projections, lazy refresh) and APOLLO, all at
the same number of steps, learning-rate schedule and seed, and records the final metric, the mean training
loss of the last quarter of the steps, the optimizer-state bytes and the wall time.

    .venv/bin/python benchmarks/evidence_optim.py --out benchmarks/results/optim.json            # both
    .venv/bin/python benchmarks/evidence_optim.py --only minilm --steps 60 --out /tmp/o.json     # quicker

The paper claims checked (docs/optim.md has the table):
GaLore close to AdamW at a fraction of the state memory (Zhao et al., 2024, Table 2); Q-GaLore close to
GaLore with INT4 projections (Zhang et al., 2024); DCT column selection matching SVD projections without any
SVD (Modoranu et al., 2025).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from weightsmith import staging
from weightsmith.optim import configs, state_bytes
from weightsmith.train import finetune

SETUPS: dict[str, dict[str, Any]] = {
    "minilm": {
        "model": "minilm",
        "task": "rotten_tomatoes",
        "rank": 32,
        "gap": 50,
        "steps": 100,
        "adamw_lr": 5e-5,
        "lowrank_lr": 2e-4,
        "kw": {"max_examples": 1600, "eval_examples": 300, "max_len": 64, "batch_size": 16},
    },
    "smollm2": {
        "model": "smollm2",
        "task": "hamlet",
        "rank": 64,
        "gap": 25,
        "steps": 30,
        "adamw_lr": 2e-5,
        "lowrank_lr": 1e-4,
        "kw": {"max_len": 128, "batch_size": 4, "eval_examples": 32},
    },
}


def optimizers(rank: int, gap: int) -> dict[str, Any]:
    """The optimizers compared, by label (GaLore's scale 0.25 as in the paper's fine-tuning runs)."""
    return {
        "adamw": configs.AdamW(),
        "galore-svd": configs.GaLore(rank=rank, update_proj_gap=gap, projector="svd"),
        "galore-rsvd": configs.GaLore(rank=rank, update_proj_gap=gap, projector="rsvd"),
        "galore-dct": configs.GaLore(rank=rank, update_proj_gap=gap, projector="dct"),
        "q-galore": configs.QGaLore(rank=rank, update_proj_gap=gap),
        "apollo": configs.APOLLO(rank=rank, update_proj_gap=gap),
    }


def run_one(setup: dict[str, Any], label: str, config: Any, steps: int, device: str) -> dict[str, Any]:
    captured: dict[str, torch.optim.Optimizer] = {}
    captured_named: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}

    def factory(named: list[tuple[str, torch.nn.Parameter]], lr: float) -> torch.optim.Optimizer:
        captured_named["named"] = named
        captured["opt"] = config.create(named, lr)
        return captured["opt"]

    lr = setup["adamw_lr"] if label == "adamw" else setup["lowrank_lr"]
    t0 = time.perf_counter()
    r = finetune(setup["model"], setup["task"], "full", optimizer=factory, max_steps=steps, lr=lr, seed=0,
                 device=device, schedule="constant", warmup=0.0, **setup["kw"])  # fmt: skip
    tail = r.loss_history[-max(1, steps // 4) :]
    opt = captured["opt"]
    # projected layers count their refreshes (GaLore: at the top of the state; APOLLO: under "low")
    counts = [s.get("refreshes", s.get("low", {}).get("refreshes")) for s in opt.state.values()]
    refreshes = [x for x in counts if x is not None]
    targets = configs.split_targets(list(captured_named["named"]), configs.DEFAULT_TARGETS)[0]
    target_ids = {id(p) for _, p in targets}
    on_targets = sum(state_bytes(s) for p, s in opt.state.items() if id(p) in target_ids)
    return {
        "optimizer": label,
        "state_bytes_targets": on_targets,  # the projected weights' state (AdamW: the same weights' moments)
        "target_params": sum(p.numel() for _, p in targets),
        "lr": lr,
        "metric_name": r.metric_name,
        "metric": r.metric,
        "final_loss": sum(tail) / len(tail),
        "state_bytes": state_bytes(opt.state_dict()["state"]),
        "refreshes_per_layer": (sum(refreshes) / len(refreshes)) if refreshes else None,
        "train_time_s": r.train_time_s,
        "wall_s": time.perf_counter() - t0,
        "steps": r.steps,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as the markdown table of docs/optim.md."""
    lines = []
    for run in results["runs"].values():
        st, rows = run["setup"], run["rows"]
        shape = f"batch {st['batch_size']} x {st['max_len']} tokens, rank {st['rank']}, gap {st['gap']}"
        lines.append(
            f"**{st['model']} on {st['task']}** ({rows[0]['steps']} steps, {shape}; {results['machine']})"
        )
        lines.append("")
        head = ["optimizer", "lr", rows[0]["metric_name"], "mean loss, last quarter", "state, targets (MiB)",
                "state, all (MiB)", "refreshes / layer", "train time (s)"]  # fmt: skip
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            refreshes = r["refreshes_per_layer"] if r["refreshes_per_layer"] is not None else "-"
            cells = [r["optimizer"], f"{r['lr']:g}", f"{r['metric']:.4g}", f"{r['final_loss']:.4f}",
                     f"{r['state_bytes_targets'] / 2**20:.1f}", f"{r['state_bytes'] / 2**20:.1f}",
                     str(refreshes), f"{r['train_time_s']:.0f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON (with --markdown: the JSON to read)")
    ap.add_argument("--markdown", action="store_true", help="print the table of an existing --out and exit")
    ap.add_argument("--only", choices=sorted(SETUPS), default=None)
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every setup")
    ap.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    ap.add_argument("--max-len", type=int, default=None, help="override the tokens per example")
    ap.add_argument("--max-examples", type=int, default=None, help="override the training examples")
    ap.add_argument("--gap", type=int, default=None, help="override the refresh gap of every setup")
    ap.add_argument("--eval-examples", type=int, default=None, help="override the evaluation size")
    ap.add_argument("--optimizers", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.markdown:
        with open(args.out) as f:
            print(markdown(json.load(f)))
        return
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": f"{args.device}, {args.threads} threads", "runs": {}}
    for name, setup in SETUPS.items():
        if args.only and name != args.only:
            continue
        steps = args.steps or setup["steps"]
        setup = {**setup, "gap": args.gap or setup["gap"], "kw": dict(setup["kw"])}
        for key in ("eval_examples", "batch_size", "max_len", "max_examples"):
            if getattr(args, key):
                setup["kw"][key] = getattr(args, key)
        table = optimizers(setup["rank"], setup["gap"])
        wanted = args.optimizers.split(",") if args.optimizers else list(table)
        rows = []
        for label in wanted:
            row = run_one(setup, label, table[label], steps, args.device)
            print(json.dumps({name: row}), flush=True)
            rows.append(row)
            results["runs"][name] = {"setup": {k: v for k, v in setup.items() if k != "kw"} | setup["kw"],
                                     "rows": rows}  # fmt: skip
            staging.write_text(args.out, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
