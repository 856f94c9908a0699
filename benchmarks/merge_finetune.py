"""Make the full fine-tunes of ``minilm`` used by benchmarks/merge_experiments.py (cached).

Each task gets one full fine-tune (encoder + its own linear head) with weightsmith.train.finetune:
2000 training examples at most, 2 epochs, max_len 64, batch 32, seed 0. Output per task:
``.cache/merge-experiments/ft-<task>/{model/, head.safetensors, run.json}``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

from weightsmith.train import finetune  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "merge-experiments"
TASKS = ("rotten_tomatoes", "debates", "speeches")


def finetuned(task: str, epochs: int = 2) -> Path:
    out = CACHE / f"ft-{task}"
    if (out / "run.json").is_file():
        return out
    res = finetune(
        "minilm",
        task,
        "full",
        out=out,
        force=True,
        max_examples=2000,
        max_len=64,
        eval_examples=200,
        epochs=epochs,
        batch_size=32,
        seed=0,
    )
    print(f"{task}: test accuracy {res.metric:.4f} in {res.wall_time_s:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    for t in sys.argv[1:] or TASKS:
        finetuned(t)
