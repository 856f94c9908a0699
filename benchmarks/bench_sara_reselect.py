"""SaRA with and without progressive re-selection at equal trainable parameters (MiniLM, Rotten Tomatoes).

    python benchmarks/bench_sara_reselect.py [--device cpu|cuda] [--max-examples 1600] [--epochs 2]
        [--reselect-every 10] [--seed 0] [--out results.json]

Both runs train the same count (``rank_budget`` 8: as many entries per matrix as LoRA r=8 has parameters)
with the same data, schedule and seed; the re-selecting run moves the support to the currently smallest
|W0 + ΔW| every ``--reselect-every`` optimizer steps during the first half of training. Prints test
accuracy, trainable count, wall time, and how many entries were released (learned, then frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")


def run(reselect_every: int, a: argparse.Namespace) -> dict:
    import torch

    from weightsmith.adapters.sara import SaRA, SaRAAdapter
    from weightsmith.tasks import get_task
    from weightsmith.train import finetune

    task = get_task("rotten_tomatoes", None, a.max_examples, 64, a.eval_examples)
    released: list[int] = []
    orig = SaRAAdapter.reselect

    def counting(self: SaRAAdapter, W0: torch.Tensor) -> torch.Tensor:
        slots = orig(self, W0)
        released.append(int(slots.numel()))
        return slots

    SaRAAdapter.reselect = counting  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        r = finetune(
            task=task,
            adapter=SaRA(rank_budget=8, nuclear=1e-4, reselect_every=reselect_every),
            epochs=a.epochs,
            batch_size=32,
            seed=a.seed,
            device=a.device,
            bf16=False,
        )
    finally:
        SaRAAdapter.reselect = orig  # type: ignore[method-assign]
    return {
        "reselect_every": reselect_every,
        "accuracy": r.metric,
        "trainable": r.trainable_params,
        "steps": r.steps,
        "wall_s": round(time.perf_counter() - t0, 1),
        "reselections": len(released),
        "released_entries": sum(released),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-examples", type=int, default=1600)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reselect-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, default=None, help="run one setting (reselect_every; 0: off)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    settings = [0, a.reselect_every] if a.only is None else [a.only]
    rows = [run(s, a) for s in settings]
    for row in rows:
        print(json.dumps(row))
    if a.out:
        from weightsmith.staging import write_text

        write_text(a.out, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
