"""Evidence for the train job's optimisers on packaged data: equal steps, loss / metric and optimizer state.

Fine-tunes every weight of MiniLM on rotten_tomatoes (accuracy) and of SmolLM2-135M on hamlet (perplexity)
with AdamW, GaLore (SVD, rSVD, DCT projectors), Q-GaLore (INT4 projections, lazy refresh) and APOLLO, all at
the same number of steps, learning-rate schedule and seed, and records the final metric, the mean training
loss of the last quarter of the steps, the optimizer-state bytes and the wall time.

    .venv/bin/python benchmarks/evidence_optim.py --out benchmarks/results/optim.json            # both
    .venv/bin/python benchmarks/evidence_optim.py --only minilm --steps 60 --out /tmp/o.json     # quicker
    .venv/bin/python benchmarks/evidence_optim.py --pretrain --steps 200 --out /tmp/pre.json     # scratch

The paper claims checked (docs/optim.md has the table):
GaLore close to AdamW at a fraction of the state memory (Zhao et al., 2024, Table 2); Q-GaLore close to
GaLore with INT4 projections (Zhang et al., 2024); DCT column selection matching SVD projections without any
SVD (Modoranu et al., 2025). ``--pretrain``: a small Llama pre-trained from scratch on Hamlet with AdamW,
GaLore, SLTrain (Han et al., 2024) and Sparse Spectral Training (Zhao et al., 2024) at equal steps: validation
loss and optimizer-state memory.
"""

from __future__ import annotations

import argparse
import json
import math
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


PRETRAIN = {"hidden": 192, "layers": 4, "heads": 6, "intermediate": 512, "rank": 48, "seq": 64, "batch": 16,
            "gap": 50, "density": 0.03, "sltrain_alpha": 32.0}  # fmt: skip
PRETRAIN_LR = {"adamw": 2e-3, "galore": 8e-3, "sltrain": 2e-3, "sst": 2e-3}  # galore: x scale 0.25 = 2e-3


def pretrain_data(seq: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hamlet (the packaged corpus) in blocks of ``seq`` tokens: MiniLM's WordPiece tokenizer, the vocabulary
    cut to the tokens that occur; the first 90 % of the play (at a line break) trains, the rest validates."""
    from transformers import AutoTokenizer

    from weightsmith import assets, models

    tok = AutoTokenizer.from_pretrained(str(models.resolve("minilm")))
    text = assets.load_text("hamlet")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    train, val = (tok(t, add_special_tokens=False).input_ids for t in (text[:cut], text[cut:]))
    vocab = {t: i for i, t in enumerate(sorted(set(train) | set(val)))}

    def blocks(ids: list[int]) -> torch.Tensor:
        x = torch.tensor([vocab[t] for t in ids])
        return x[: len(x) // seq * seq].view(-1, seq)

    return blocks(train), blocks(val), len(vocab)


def pretrain_one(label: str, steps: int, data: tuple[torch.Tensor, torch.Tensor, int]) -> dict[str, Any]:
    """Pre-train a small Llama from scratch with ``label``'s method; the same init seed and batch order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightsmith.optim import GaLoreAdamW
    from weightsmith.optim.sst import SparseSpectralAdamW, sst_state_bytes, to_spectral
    from weightsmith.train.pretrain import sltrain_from_scratch

    train, val, vocab = data
    c = PRETRAIN
    config = LlamaConfig(vocab_size=vocab, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["heads"], max_position_embeddings=c["seq"])  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    targets = "re:(self_attn|mlp)\\.\\w+_proj"
    lr = PRETRAIN_LR[label]
    if label == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    elif label == "galore":
        named = list(model.named_parameters())
        projected = {"params": [p for n, p in named if "_proj" in n], "rank": c["rank"], "scale": 0.25,
                     "update_proj_gap": c["gap"], "projector": "rsvd"}  # fmt: skip
        groups = [projected, {"params": [p for n, p in named if "_proj" not in n]}]
        opt = GaLoreAdamW(groups, lr=lr)
    elif label == "sltrain":
        sltrain_from_scratch(model, targets, c["rank"], c["sltrain_alpha"], c["density"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    else:
        to_spectral(model, [targets])
        opt = SparseSpectralAdamW(model, lr=lr, rank=c["rank"], update_proj_gap=c["gap"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps // 10 + 1)))
    order = torch.Generator().manual_seed(0)
    losses, t0 = [], time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (c["batch"],), generator=order)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        val_loss = sum(float(model(input_ids=b, labels=b).loss) for b in val.split(32)) / len(val.split(32))
    proj_ids = {id(p) for n, p in model.named_parameters() if "_proj" in n or ".adapters." in n}
    if label == "sst":
        on_targets = sst_state_bytes(opt)  # type: ignore[arg-type]
    else:
        on_targets = sum(state_bytes(s) for p, s in opt.state.items() if id(p) in proj_ids)
    tail = losses[-max(1, steps // 4) :]
    return {"method": label, "lr": lr, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "final_loss": sum(tail) / len(tail), "trainable": sum(p.numel() for p in model.parameters()
                                                                   if p.requires_grad),
            "state_bytes_targets": on_targets, "state_bytes": state_bytes(opt.state_dict()["state"]),
            "train_time_s": time.perf_counter() - t0, "steps": steps}  # fmt: skip


def pretrain_markdown(rows: list[dict[str, Any]], data_info: str) -> str:
    head = ["method", "lr", "val loss", "val ppl", "mean train loss, last quarter", "trainable params",
            "state, projected layers (MiB)", "state, all (MiB)", "time (s)"]  # fmt: skip
    lines = [data_info, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['lr']:g}", f"{r['val_loss']:.4f}", f"{r['val_ppl']:.1f}",
                 f"{r['final_loss']:.4f}", f"{r['trainable']:,}", f"{r['state_bytes_targets'] / 2**20:.2f}",
                 f"{r['state_bytes'] / 2**20:.2f}", f"{r['train_time_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrain(args: argparse.Namespace) -> None:
    """AdamW vs GaLore vs SLTrain vs SST pre-training a small Llama from scratch at equal steps."""
    data = pretrain_data(PRETRAIN["seq"])
    info = (f"{len(data[0])} training blocks x {PRETRAIN['seq']} tokens ({data[0].numel():,} tokens), "
            f"{len(data[1])} validation blocks, vocabulary {data[2]:,}; {args.steps or 200} steps of batch "
            f"{PRETRAIN['batch']}; {args.device}, {args.threads} threads")  # fmt: skip
    rows = []
    for label in (args.optimizers or "adamw,galore,sltrain,sst").split(","):
        rows.append(pretrain_one(label, args.steps or 200, data))
        print(json.dumps(rows[-1]), flush=True)
        staging.write_text(args.out, json.dumps({"setup": PRETRAIN, "info": info, "rows": rows}, indent=2))
    print(pretrain_markdown(rows, info))


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
    ap.add_argument(
        "--pretrain", action="store_true", help="pre-train a small Llama: AdamW/GaLore/SLTrain/SST"
    )
    args = ap.parse_args()
    if args.pretrain:
        torch.set_num_threads(args.threads)
        pretrain(args)
        return
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
