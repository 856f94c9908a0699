"""SaRA beside LoRA at equal trainable parameters on SmolLM2-135M (Hamlet), the protocol of the
"SmolLM2-135M on Hamlet" table in benchmarks/RESULTS.md (``adapt_results.py lm``): 20 AdamW steps of 4×128
tokens, warmup 0.1, linear schedule, lr from ``adapt_results.LM_LR``, perplexity on the first 2,048
held-out tokens (15 windows of 128), every linear layer except ``lm_head`` adapted.

    python benchmarks/evidence_sara_smollm2.py --out DIR [--device cpu] [--seeds 0] [--steps 20]
        [--runs lora,sara,sara-l0] [--base]
    python benchmarks/evidence_sara_smollm2.py --penalty-timing [--device cpu|cuda] [--matrices N]

``lora``: LoRA r=8 (alpha 16); ``sara``: SaRA ``rank_budget`` 8 (as many trained entries per matrix as LoRA
r=8 has parameters), λ = 1e-4; ``sara-l0``: the same with λ = 0 (no nuclear-norm penalty);
``sara-e5``: λ = 1e-4 applied every 5th step scaled by 5 (``nuclear_every``). Each finished run is
(re)written to ``DIR/sara_smollm2.json``, so a cut-off sweep keeps what finished.

``--penalty-timing``: one step's nuclear-norm penalty (value and backward) over SmolLM2's 210 adapted matrices
(values set to N(0, 1e-3)), the previous path ``torch.linalg.svdvals(ΔW).sum()`` against ``nuclear_norm``,
with the largest difference of the two penalties' value gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapt_results  # noqa: E402  (sets the offline environment, the protocol and run_job)

SARA = {"method": "sara", "rank_budget": adapt_results.LORA_RANK}
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "rank": adapt_results.LORA_RANK},
    "sara": {**SARA, "nuclear": 1e-4},
    "sara-l0": {**SARA, "nuclear": 0.0},
    "sara-e5": {**SARA, "nuclear": 1e-4, "nuclear_every": 5},
}
EVAL_WINDOWS = 15  # 15 windows of 128 tokens: the table's first 2,048 held-out tokens


def job(label: str, seed: int, steps: int, device: str) -> dict[str, Any]:
    """The ``adapt_results.lm`` job for run ``label`` (the table's protocol)."""
    import weightsmith.adapters  # noqa: F401  (registers every method)
    from weightsmith.config import config_from_dict, to_dict

    spec = RUNS[label]
    return {
        "kind": "lm",
        "label": label,
        "model": "smollm2",
        "task": "hamlet",
        "adapter": to_dict(config_from_dict(spec, "adapter")),
        "max_len": 128,
        "eval_examples": EVAL_WINDOWS,
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "lr": adapt_results.LM_LR[spec["method"]],
            "seed": seed,
            "device": device,
            "warmup": 0.1,
            "schedule": "linear",
        },
    }


def base_perplexity() -> float:
    from weightsmith import models
    from weightsmith.tasks import get_task

    task = get_task("hamlet", max_len=128, eval_examples=EVAL_WINDOWS)
    model, tok = models.load_model("smollm2", task="causal-lm")
    return float(task.evaluate(model, tok, "val"))


def penalty_timing(device: str, matrices: int | None = None, repeat: int = 2) -> dict[str, float]:
    import time

    import torch

    from weightsmith import adapters, models
    from weightsmith.adapters.sara import SaRA, SaRAAdapter, nuclear_norm

    model, _ = models.load_model("smollm2", task="causal-lm")
    adapters.adapt(model, SaRA(rank_budget=adapt_results.LORA_RANK), targets=None)
    saras = [m for m in model.modules() if isinstance(m, SaRAAdapter)][:matrices]
    torch.manual_seed(0)
    for a in saras:
        a.to(device)
        with torch.no_grad():
            a.values.normal_(0, 1e-3)

    def one(norm: Any) -> tuple[float, tuple[Any, ...]]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = sum(norm(a._dense(torch.float32)) for a in saras)
        grads = torch.autograd.grad(total, [a.values for a in saras])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, grads

    norms = {"svdvals_s": lambda A: torch.linalg.svdvals(A).sum(), "nuclear_norm_s": nuclear_norm}
    out: dict[str, float] = {"matrices": len(saras)}
    grads = {}
    for name, norm in norms.items():
        times = []
        for _ in range(repeat):
            t, grads[name] = one(norm)
            times.append(t)
        out[name] = round(min(times), 3)
    out["max_grad_diff"] = max(float((g - h).abs().max()) for g, h in zip(*grads.values(), strict=True))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", default="lora,sara,sara-l0")
    p.add_argument("--base", action="store_true", help="also score the pretrained model")
    p.add_argument("--penalty-timing", action="store_true", help="time the penalty alone, then stop")
    p.add_argument("--matrices", type=int, default=None, help="--penalty-timing: the first N matrices only")
    a = p.parse_args()
    adapt_results._setup()
    from weightsmith.errors import WeightsmithError
    from weightsmith.staging import write_text

    if a.penalty_timing:
        print(json.dumps(penalty_timing(a.device, a.matrices)), flush=True)
        return
    if a.out is None:
        raise WeightsmithError("--out is required (except with --penalty-timing)")

    labels = a.runs.split(",")
    unknown = [x for x in labels if x not in RUNS]
    if unknown:
        raise WeightsmithError(f"--runs: unknown {unknown}; choose from {sorted(RUNS)}")
    path = Path(a.out) / "sara_smollm2.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    if a.base:
        rows.append({"label": "pretrained", "result": {"metric": base_perplexity()}})
        write_text(path, json.dumps(rows, indent=2) + "\n")
    for seed in (int(s) for s in a.seeds.split(",")):
        for label in labels:
            r = adapt_results.run_job(job(label, seed, a.steps, a.device))
            rows.append(r)
            write_text(path, json.dumps(rows, indent=2) + "\n")
            res = r.get("result", {})
            print(label, seed, res.get("metric"), res.get("train_time_s"), r.get("error", ""), flush=True)


if __name__ == "__main__":
    main()
