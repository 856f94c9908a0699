"""Evidence for the issue-15 methods on the zoo's digits task (sklearn digits, 8x8).

    python benchmarks/evidence_adapt_breadth.py salun [--forget class|random] [--lr 0.01] [--fraction 0.5]
    python benchmarks/evidence_adapt_breadth.py compander [--seeds 3] [--device cpu]
    python benchmarks/evidence_adapt_breadth.py growth [--seeds 3] [--device cpu]

salun: forget one class of digits. Original = zoo MLP trained on all classes; Retrain = trained from the
same seed without the class (the gold standard); RL = full-weight random labelling; SalUn = random
labelling on the top-50 % salient weights only. Reported as in the paper: forget-set accuracy (train
examples of the class), retain-set accuracy, test accuracy on the other classes, test accuracy on the
forgotten class, and the average absolute gap to Retrain over those four (lower = closer to retraining).

compander: the same zoo MLP trained with and without the weight compander on every Linear weight
(equal epochs / lr, plus plain training at 2.5x the lr as a step-size control), with alpha, beta fixed
and learned per layer (apply_compander(learn=True), started at the fixed values), test accuracy, the
per-layer power-law alpha of the trained weights and the learned compander alpha, beta.

growth: two width-64 zoo MLPs (trained --epochs) grown into one of width --width (128) by MixtureGrowth
(new blocks = convex combinations of the learned layers), by random or zero new blocks, against a fresh
width-128 MLP and the small MLP itself; test accuracy at growth and after 2 / 10 further Adam epochs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from weightsmith import zoo
from weightsmith.adapters.compander import apply_compander, compander_values, remove_compander
from weightsmith.adapters.mixturegrowth import NEW_BLOCKS, grow
from weightsmith.adapters.salun import saliency_masks, unlearn
from weightsmith.analyze import esd, fit_power_law


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return zoo.evaluate(model, x, y)[1] if len(y) else float("nan")


def subset(task: zoo.TaskData, keep: torch.Tensor, test_keep: torch.Tensor) -> zoo.TaskData:
    return zoo.TaskData(
        task.name, task.x_train[keep], task.y_train[keep], task.x_val, task.y_val,
        task.x_test[test_keep], task.y_test[test_keep], task.in_dim, task.n_classes,
    )  # fmt: skip


def trained(task: zoo.TaskData, seed: int, args: argparse.Namespace, dev: torch.device) -> nn.Module:
    """``zoo.train_model`` (same seeding) with the model on ``dev``."""
    torch.manual_seed(seed)
    model = zoo.make_model("mlp", task, args.width, depth=2).to(dev)
    return zoo.train(model, task, epochs=args.epochs, seed=seed)


def on(task: zoo.TaskData, dev: torch.device) -> zoo.TaskData:
    moved: dict[str, Any] = {k: v.to(dev) for k, v in vars(task).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(task, **moved)


def salun_rows(args: argparse.Namespace, dev: torch.device) -> None:
    task = on(zoo.load_task("digits"), dev)
    metrics = ("forget acc", "retain acc", "test acc (others)", "test acc (class)")
    print(f"| seed | class | model | {' | '.join(metrics)} | avg gap to Retrain | s |")
    print("|---|---|---|" + "---|" * (len(metrics) + 2))
    gaps: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        if args.forget == "class":
            c = str((3 * seed + 1) % 10)  # classes 1, 4, 7
            f, te = task.y_train == int(c), task.y_test == int(c)
        else:  # a random 10 % of the training set; the test set is all "others"
            c = "10 % random"
            g = torch.Generator().manual_seed(100 + seed)
            f = (torch.rand(len(task.y_train), generator=g) < 0.1).to(dev)
            te = torch.zeros_like(task.y_test, dtype=torch.bool)
        forget, retain = (task.x_train[f], task.y_train[f]), (task.x_train[~f], task.y_train[~f])

        sets = [forget, retain, (task.x_test[~te], task.y_test[~te]), (task.x_test[te], task.y_test[te])]

        def row(m: nn.Module, sets: list[tuple[torch.Tensor, torch.Tensor]] = sets) -> list[float]:
            return [acc(m, x, y) for x, y in sets]

        t0 = time.perf_counter()
        original = trained(task, seed, args, dev)
        t_orig = time.perf_counter() - t0
        t0 = time.perf_counter()
        retrained = trained(subset(task, ~f, ~te), seed, args, dev)
        results = {"Original": (row(original), t_orig), "Retrain": (row(retrained), time.perf_counter() - t0)}
        for name, frac in (("RL (full)", None), ("SalUn", args.fraction)):
            m = copy.deepcopy(original)
            t0 = time.perf_counter()
            masks = None if frac is None else saliency_masks(m, [forget], fraction=frac)
            unlearn(m, forget, retain, masks=masks, epochs=args.unlearn_epochs, lr=args.lr, seed=seed)
            results[name] = (row(m), time.perf_counter() - t0)
        gold = results["Retrain"][0]
        for name, (vals, secs) in results.items():
            pairs = [(a, b) for a, b in zip(vals, gold, strict=True) if b == b]  # skip NaN columns
            gap = sum(abs(a - b) for a, b in pairs) / len(pairs)
            gaps.setdefault(name, []).append(gap)
            cells = " | ".join(f"{100 * v:.1f}" for v in vals)
            print(f"| {seed} | {c} | {name} | {cells} | {100 * gap:.2f} | {secs:.1f} |", flush=True)
    print()
    for name, gs in gaps.items():
        print(f"mean avg gap to Retrain, {name}: {100 * sum(gs) / len(gs):.2f} points over {len(gs)} seeds")


def layer_alphas(model: nn.Module) -> list[float]:
    """Power-law alpha (weightsmith.analyze) of each hidden Linear weight's ESD (the 10-row head skipped)."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    return [float(fit_power_law(esd(m.weight.detach().double().cpu())).alpha) for m in lins]


def compander_rows(args: argparse.Namespace, dev: torch.device) -> None:
    full = on(zoo.load_task("digits"), dev)
    cols = "test acc | mean |w| | alpha per hidden layer | learned α, β per layer | s"
    print(f"| train examples | seed | model | {cols} |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[int, str], list[float]] = {}
    for n_train in (200, len(full.y_train)):
        task = subset(full, torch.arange(n_train, device=dev), torch.ones_like(full.y_test, dtype=torch.bool))
        for seed in range(args.seeds):
            for name, ab, learn, lr in (
                ("plain", None, False, 1e-3),
                ("plain, lr x2.5", None, False, 2.5e-3),  # control: f'(v) ~ 2.5 at typical |v| for a=0.5
                ("compander a=0.5", (0.5, 0.01), False, 1e-3),
                ("compander a=0.75", (0.75, 0.01), False, 1e-3),
                ("compander a=0.5, learned", (0.5, 0.01), True, 1e-3),  # alpha, beta start at these values
                ("compander a=0.75, learned", (0.75, 0.01), True, 1e-3),
            ):
                torch.manual_seed(seed)
                model = zoo.make_model("mlp", task, args.width, depth=2).to(dev)
                if ab is not None:
                    apply_compander(model, ab[0], ab[1], learn=learn)
                t0 = time.perf_counter()
                zoo.train(model, task, epochs=args.epochs, lr=lr, seed=seed)
                secs = time.perf_counter() - t0
                values = compander_values(model) if learn else {}
                learned = "; ".join(f"{a:.3f}, {b:.4f}" for a, b in values.values()) or "-"
                remove_compander(model)
                a = acc(model, task.x_test, task.y_test)
                summary.setdefault((n_train, name), []).append(a)
                weights = [p.detach().abs().flatten() for n, p in model.named_parameters() if "weight" in n]
                mean_w = float(torch.cat(weights).mean())
                alphas = ", ".join(f"{x:.2f}" for x in layer_alphas(model))
                cells = f"{100 * a:.1f} | {mean_w:.4f} | {alphas} | {learned} | {secs:.1f}"
                print(f"| {n_train} | {seed} | {name} | {cells} |", flush=True)
    print()
    for (n_train, name), accs in summary.items():
        print(f"{n_train} train examples, {name}: mean test acc {100 * sum(accs) / len(accs):.2f} %")


def growth_rows(args: argparse.Namespace, dev: torch.device) -> None:
    task = on(zoo.load_task("digits"), dev)
    small_w = args.width // 2
    budgets = (2, 10)
    cols = " | ".join(f"after {e} more epochs" for e in budgets)
    print(f"| seed | model (width {args.width}) | at growth | {cols} |")
    print("|---|---|---|" + "---|" * len(budgets))
    summary: dict[tuple[str, int], list[float]] = {}
    for seed in range(args.seeds):
        smalls: list[zoo.MLP] = []
        for k in (2 * seed, 2 * seed + 1):
            torch.manual_seed(k)
            m = zoo.MLP(task.in_dim, (small_w, small_w), task.n_classes).to(dev)  # = make_model("mlp")
            zoo.train(m, task, epochs=args.epochs, seed=k)
            smalls.append(m)
        starts: dict[str, nn.Module] = {
            f"grown, {new} new blocks": grow(smalls, new, seed).to(dev) for new in NEW_BLOCKS
        }
        torch.manual_seed(100 + seed)
        starts["from scratch"] = zoo.make_model("mlp", task, args.width, depth=2).to(dev)
        starts[f"small (width {small_w}), not grown"] = smalls[0]
        for name, start in starts.items():
            cells = [acc(start, task.x_test, task.y_test)]
            for e in budgets:
                more = zoo.train(copy.deepcopy(start), task, epochs=e, seed=1000 + seed)
                cells.append(acc(more, task.x_test, task.y_test))
                summary.setdefault((name, e), []).append(cells[-1])
            print(f"| {seed} | {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |", flush=True)
    print()
    for (name, e), accs in summary.items():
        print(f"{name}, {e} more epochs: mean test acc {100 * sum(accs) / len(accs):.2f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("salun", "compander", "growth"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--unlearn-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--forget", choices=("class", "random"), default="class")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    if args.what == "salun":
        salun_rows(args, dev)
    elif args.what == "compander":
        compander_rows(args, dev)
    else:
        growth_rows(args, dev)


if __name__ == "__main__":
    main()
