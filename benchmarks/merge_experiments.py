"""Merging real fine-tunes of ``minilm`` (Rotten Tomatoes, debates, speeches): the tables of docs/merging.md.

1. All-at-once merges (average, task arithmetic, TIES, DARE, DARE-TIES) against the individual
   fine-tunes and the zero-shot base (base encoder + each task's own head). Each task keeps its own
   head; only the shared encoder is merged. The scaling lambda of each method is picked on the
   validation splits (100 examples per task) from {0.5, 1.0} (the task-arithmetic protocol), then
   test accuracy (at most 300 examples per task) is reported.
2. Continual merging over 3 arrival orders (the cyclic shifts): OPCM (alpha 0.5) against continual
   task arithmetic and continual TIES (lambda 0.3, density 0.2), final model after the third task.

Run: ``.venv/bin/python benchmarks/merge_experiments.py`` (fine-tunes come from merge_finetune.py and
are cached). Writes benchmarks/results/merge_experiments.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_finetune import TASKS, finetuned  # noqa: E402

from weightsmith import models  # noqa: E402
from weightsmith.merge import merge_state_dicts  # noqa: E402
from weightsmith.merge.opcm import OPCM, opcm  # noqa: E402
from weightsmith.merge.task_arithmetic import DARE, DARETIES, TIES, Average, TaskArithmetic, merge_tensors  # noqa: E402
from weightsmith.store import open_store  # noqa: E402
from weightsmith.tasks import SentenceClassifier, get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "merge_experiments.md"
GRID = (0.5, 1.0)
VAL_EXAMPLES = 100
TEST_EXAMPLES = 300  # per task (debates and speeches have fewer: all of theirs are used)
ORDERS = [TASKS, TASKS[1:] + TASKS[:1], TASKS[2:] + TASKS[:2]]
SHORT = {"rotten_tomatoes": "RT", "debates": "debates", "speeches": "speeches"}


class Evaluator:
    def __init__(self) -> None:
        self.base = {k: v for k, v in open_store(models.resolve("minilm")).items() if v.is_floating_point()}
        self.fts = {t: dict(open_store(finetuned(t) / "model").items()) for t in TASKS}
        self.heads = {t: load_file(str(finetuned(t) / "head.safetensors")) for t in TASKS}
        self.tasks = {t: get_task(t, "minilm", max_len=64) for t in TASKS}
        encoder, self.tok = models.load_model("minilm", task="encoder")
        self.model = SentenceClassifier(encoder, 2)

    def accuracy(
        self, encoder_state: dict[str, torch.Tensor], task: str, split: str, n: int | None = None
    ) -> float:
        self.model.encoder.load_state_dict(encoder_state, strict=False)
        head = self.heads[task]
        self.model.head = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        self.model.head.load_state_dict(head)
        t = self.tasks[task]
        t.eval_examples = n
        return t.evaluate(self.model, self.tok, split)

    def all_tasks(
        self, state: dict[str, torch.Tensor], split: str, n: int | None = TEST_EXAMPLES
    ) -> dict[str, float]:
        return {t: self.accuracy(state, t, split, n) for t in TASKS}

    def merge(self, method: object, order: tuple[str, ...] = TASKS) -> dict[str, torch.Tensor]:
        return merge_state_dicts(self.base, [self.fts[t] for t in order], method, names=list(self.base))


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def row(name: str, acc: dict[str, float], extra: str = "") -> str:
    cells = " | ".join(f"{100 * acc[t]:.1f}" for t in TASKS)
    return f"| {name} | {cells} | **{100 * mean(acc):.1f}** | {extra} |"


def all_at_once(ev: Evaluator, only: str | None = None) -> list[str]:
    lines = [
        "| model | " + " | ".join(SHORT[t] for t in TASKS) + " | mean | chosen on val |",
        "|---" * 6 + "|",
    ]
    if only is None:
        lines.append(row("zero-shot (base encoder + task head)", ev.all_tasks(ev.base, "test")))
        individual = {t: ev.accuracy(ev.fts[t], t, "test", TEST_EXAMPLES) for t in TASKS}
        lines.append(row("individual fine-tunes (upper bound)", individual))
        lines.append(row("weighted average", ev.all_tasks(ev.merge(Average()), "test")))
    methods = {
        "task arithmetic": lambda lam: TaskArithmetic(scaling=lam),
        "TIES (k=20%, global trim)": lambda lam: TIES(density=0.2, scaling=lam),
        "TIES (k=20%, per-tensor trim)": lambda lam: TIES(density=0.2, scaling=lam, trim="tensor"),
        "DARE (p=0.9) + task arithmetic": lambda lam: DARE(p=0.9, scaling=lam),
        "DARE-TIES (p=0.9)": lambda lam: DARETIES(p=0.9, scaling=lam),
    }
    for name, make in methods.items():
        if only is not None and only not in name:
            continue
        val = {lam: mean(ev.all_tasks(ev.merge(make(lam)), "val", VAL_EXAMPLES)) for lam in GRID}
        best = max(val, key=lambda lam: val[lam])
        lines.append(row(name, ev.all_tasks(ev.merge(make(best)), "test"), f"lambda={best}"))
        print(lines[-1], flush=True)
    return lines


def continual(ev: Evaluator) -> list[str]:
    lines = [
        "| arrival order | OPCM (alpha 0.5) | continual TA (lambda 0.3) "
        "| continual TIES (lambda 0.3, k=20%) |",
        "|---|---|---|---|",
    ]
    agg: dict[str, list[float]] = {"opcm": [], "ta": [], "ties": []}
    ta_mean: float | None = None
    for order in ORDERS:
        fts = [ev.fts[t] for t in order]
        state = opcm(ev.base, fts, OPCM(alpha=0.5), names=list(ev.base))
        opcm_w = {k: ev.base[k] + state.merged[k] for k in ev.base}
        merged = {k: v.clone() for k, v in fts[0].items() if k in ev.base}  # continual TIES: fold pairwise
        for ft in fts[1:]:
            merged = {
                k: merge_tensors(b, [merged[k], ft[k]], TIES(density=0.2, trim="tensor"))
                for k, b in ev.base.items()
            }
        ties_w = {k: b + 0.3 * (merged[k] - b) for k, b in ev.base.items()}
        if ta_mean is None:  # continual task arithmetic is a sum: the same model for every order
            ta_mean = mean(ev.all_tasks(ev.merge(TaskArithmetic(scaling=0.3), order), "test"))
        res = {
            "opcm": mean(ev.all_tasks(opcm_w, "test")),
            "ta": ta_mean,
            "ties": mean(ev.all_tasks(ties_w, "test")),
        }
        for n, v in res.items():
            agg[n].append(v)
        lines.append(
            f"| {' → '.join(SHORT[t] for t in order)} | {100 * res['opcm']:.1f} | {100 * res['ta']:.1f} | "
            f"{100 * res['ties']:.1f} |"
        )
        print(lines[-1], flush=True)
    stats = []
    for n in ("opcm", "ta", "ties"):
        v = torch.tensor(agg[n]) * 100
        stats.append(f"{float(v.mean()):.1f} ± {float(v.std()):.1f}")
    lines.append(f"| **mean ± std over orders** | **{stats[0]}** | **{stats[1]}** | **{stats[2]}** |")
    return lines


def main() -> None:
    t0 = time.perf_counter()
    ev = Evaluator()
    if "--only" in sys.argv:  # recompute the all-at-once rows whose name contains this text
        all_at_once(ev, sys.argv[sys.argv.index("--only") + 1])
        return
    a = all_at_once(ev)
    c = continual(ev)
    text = (
        "## All-at-once merges (test accuracy, %)\n\n" + "\n".join(a) + "\n\n"
        "## Continual merging, final model after 3 tasks (mean test accuracy over the 3 tasks, %)\n\n"
        + "\n".join(c)
        + f"\n\nwall time {time.perf_counter() - t0:.0f} s (2-core CPU, 1 thread)\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
