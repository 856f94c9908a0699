"""Evidence for the issue-15 methods on the zoo's digits task (sklearn digits, 8x8).

    python benchmarks/evidence_adapt_breadth.py salun [--forget class|random] [--lr 0.01] [--fraction 0.5]
    python benchmarks/evidence_adapt_breadth.py compander [--seeds 3] [--device cpu]
    python benchmarks/evidence_adapt_breadth.py growth [--seeds 3] [--device cpu]
    python benchmarks/evidence_adapt_breadth.py growth-bank [--seeds 3] [--templates 2,4] [--coef-scale 1]
        [--banks shared,separate] [--train-examples N] [--out FILE.json]

salun: forget one class of digits. Original = zoo MLP trained on all classes; Retrain = trained from the
same seed without the class (the gold standard); RL = full-weight random labelling; SalUn = random
labelling on the top-50 % salient weights only. Reported as in the paper: forget-set accuracy (train
examples of the class), retain-set accuracy, test accuracy on the other classes, test accuracy on the
forgotten class, and the average absolute gap to Retrain over those four (lower = closer to retraining).

compander: the same zoo MLP trained with and without the weight compander on every Linear weight
(equal epochs / lr, plus plain training at 2.5x the lr as a step-size control), with alpha, beta fixed
and learned per layer (apply_compander(learn=True), started at the fixed values) or per output channel
(per_channel=True), test accuracy, the per-layer power-law alpha of the trained weights and the learned
compander alpha, beta (per-channel: the mean over the layer's rows).

growth: two width-64 zoo MLPs (trained --epochs) grown into one of width --width (128) by MixtureGrowth
(new blocks = convex combinations of the learned layers), by random or zero new blocks, against a fresh
width-128 MLP and the small MLP itself; test accuracy at growth and after 2 / 10 further Adam epochs.

growth-bank: MixtureGrowth with explicit template banks (adapters/mixturegrowth_bank.py): two width-64
MLPs sharing K templates per layer (--templates, one run per K) with their own coefficients, trained
jointly --epochs, grown to width 128 by new coefficient vectors (orthogonal to the learned ones when
K > 2, a convex combination of them, or zero) and trained further in the bank parameterisation; against
random new blocks and the one-hot simplification (grow) from the same small networks baked to plain
MLPs, and from two independently trained plain MLPs (the growth protocol). --banks separate: each small
network has its own K templates and is trained alone (the paper's code); growth concatenates the banks.
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
from weightsmith.adapters.mixturegrowth_bank import (
    COEF_INITS,
    bank_networks,
    grow_bank,
    to_mlp,
    train_jointly,
)
from weightsmith.adapters.salun import saliency_masks, unlearn
from weightsmith.analyze import esd, fit_power_law
from weightsmith.tasks import SentenceClassifier


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
                ("compander a=0.5, learned per channel", (0.5, 0.01), "channel", 1e-3),  # one α, β per row
                ("compander a=0.75, learned per channel", (0.75, 0.01), "channel", 1e-3),
            ):
                torch.manual_seed(seed)
                model = zoo.make_model("mlp", task, args.width, depth=2).to(dev)
                if ab is not None:
                    apply_compander(model, ab[0], ab[1], learn=bool(learn), per_channel=learn == "channel")
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


def growth_bank_rows(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    """Template-bank MixtureGrowth: two width-64 bank MLPs sharing K templates per layer, trained jointly
    (--epochs), grown to width 128 by new coefficient vectors on the learned templates, against random
    new blocks and the one-hot simplification (``grow``) on the same small networks baked to plain MLPs,
    and both of those on independently trained plain MLPs (the ``growth`` protocol)."""
    task = on(zoo.load_task("digits"), dev)
    if args.train_examples is not None:
        everything = torch.ones_like(task.y_test, dtype=torch.bool)
        task = subset(task, torch.arange(args.train_examples, device=dev), everything)
    small_w = args.width // 2
    budgets = (2, 10)
    cols = " | ".join(f"+{e} epochs" for e in budgets)
    print(f"| seed | small networks | grown by | params | small acc | at growth | {cols} |")
    print("|---|---|---|---|---|---|" + "---|" * len(budgets))
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        groups: list[tuple[str, list[nn.Module], dict[str, nn.Module]]] = []
        for K, form in [(K, form) for form in args.banks for K in args.templates]:
            smalls = bank_networks(
                task.in_dim, (small_w, small_w), task.n_classes, 2, K, seed=2 * seed, shared=form == "shared"
            )
            for net in smalls:
                net.to(dev)
            if form == "shared":
                train_jointly(smalls, task.x_train, task.y_train, epochs=args.epochs, seed=2 * seed)
            else:  # the paper's code: one template set per network, trained one after the other
                for k, net in enumerate(smalls):
                    train_jointly([net], task.x_train, task.y_train, epochs=args.epochs, seed=2 * seed + k)
            plain = [to_mlp(m) for m in smalls]
            starts: dict[str, nn.Module] = {}
            for init in COEF_INITS:
                if init == "orthogonal" and K <= 2 and form == "shared":
                    continue  # two learned coefficient vectors span R^2: no orthogonal direction
                starts[f"bank, {init} coefficients"] = grow_bank(smalls, init, args.coef_scale, seed)
            starts["random new blocks"] = grow(plain, "random", seed).to(dev)
            starts["one-hot mixture (grow)"] = grow(plain, "mixture", seed).to(dev)
            groups.append(
                (f"bank K={K}, {'joint' if form == 'shared' else 'separate'}", list(smalls), starts)
            )
        plain_smalls: list[zoo.MLP] = []
        for k in (2 * seed, 2 * seed + 1):
            torch.manual_seed(k)
            m = zoo.MLP(task.in_dim, (small_w, small_w), task.n_classes).to(dev)
            zoo.train(m, task, epochs=args.epochs, seed=k)
            plain_smalls.append(m)
        groups.append(
            (
                "plain, separate",
                list(plain_smalls),
                {
                    "random new blocks": grow(plain_smalls, "random", seed).to(dev),
                    "one-hot mixture (grow)": grow(plain_smalls, "mixture", seed).to(dev),
                },
            )
        )
        for group, smalls_, starts in groups:
            small_acc = [acc(m, task.x_test, task.y_test) for m in smalls_]
            for name, start in starts.items():
                cells = [acc(start, task.x_test, task.y_test)]
                for e in budgets:
                    more = zoo.train(copy.deepcopy(start), task, epochs=e, seed=1000 + seed)
                    cells.append(acc(more, task.x_test, task.y_test))
                params = sum(p.numel() for p in start.parameters())
                rows.append(
                    {"seed": seed, "small": group, "grown by": name, "params": params,
                     "small acc": small_acc, "at growth": cells[0],
                     **{f"+{e}": c for e, c in zip(budgets, cells[1:], strict=True)}}
                )  # fmt: skip
                sa = ", ".join(f"{100 * a:.1f}" for a in small_acc)
                print(
                    f"| {seed} | {group} | {name} | {params} | {sa} | "
                    + " | ".join(f"{100 * c:.1f}" for c in cells)
                    + " |",
                    flush=True,
                )
    print()
    keys = sorted({(r["small"], r["grown by"]) for r in rows}, key=str)
    for key in keys:
        sel = [r for r in rows if (r["small"], r["grown by"]) == key]
        means = ", ".join(
            f"{c} {100 * sum(r[c] for r in sel) / len(sel):.2f}"
            for c in ("at growth", *[f"+{e}" for e in budgets])
        )
        print(f"{key[0]} / {key[1]}: mean test acc over {len(sel)} seeds: {means}")
    return rows


# ---------------------------------------------------------------- MiniLM / Rotten Tomatoes (issue 15)
RT_BATCH = 32
RT_RETAIN_EVAL = 300  # retain accuracy on the first 300 retain examples (CPU time)
RT_SPECTRA = tuple(
    f"encoder.layer.{i}.{w}"
    for i in (0, 5)
    for w in ("attention.self.query", "intermediate.dense", "output.dense")
)


class Packed(nn.Module):
    """A ``SentenceClassifier`` fed one tensor ``x`` (``x[:, 0]`` token ids, ``x[:, 1]`` attention mask),
    the ``model(x)`` form ``salun.unlearn`` / ``saliency_masks`` call; right padding trimmed per batch."""

    def __init__(self, clf: SentenceClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = max(1, int(x[:, 1].sum(1).max()))
        return self.clf(x[:, 0, :width], x[:, 1, :width])


def rt_tensors(
    tok: Any, texts: Any, labels: Any, max_len: int, dev: torch.device
) -> tuple[torch.Tensor, ...]:
    import numpy as np

    enc = tok(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
    return x.to(dev), torch.as_tensor(np.asarray(labels), dtype=torch.long, device=dev)


@torch.no_grad()
def rt_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if not len(y):
        return float("nan")
    model.eval()
    hits = sum(int((model(x[i : i + 128]).argmax(-1) == y[i : i + 128]).sum()) for i in range(0, len(y), 128))
    return hits / len(y)


def rt_train(
    model: Packed, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, lr: float, seed: int
) -> float:
    """AdamW (no weight decay, constant ``lr``; the head at ``--head-lr``), batch 32, ``--epochs`` passes
    in a seeded order; returns the wall seconds."""
    head = set(map(id, model.clf.head.parameters()))
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": list(model.clf.head.parameters()), "lr": args.head_lr}],
        weight_decay=0.0,
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=g).to(y.device)
        for i in range(0, len(y), RT_BATCH):
            idx = order[i : i + RT_BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def rt_setup(args: argparse.Namespace, dev: torch.device) -> tuple[Any, Any, tuple[torch.Tensor, ...]]:
    """The ``rotten_tomatoes`` task (packaged MiniLM) and its first ``--max-examples`` training / first
    ``--eval-examples`` test sentences as packed tensors."""
    from weightsmith.tasks import get_task

    task = get_task("rotten_tomatoes", None, args.max_examples, args.max_len, args.eval_examples)
    _, tok = task.build()
    ds = task.dataset
    n_test = len(ds.test.y) if args.eval_examples is None else args.eval_examples
    train = rt_tensors(
        tok, ds.train.x[: args.max_examples], ds.train.y[: args.max_examples], args.max_len, dev
    )
    test = rt_tensors(tok, ds.test.x[:n_test], ds.test.y[:n_test], args.max_len, dev)
    return task, tok, (*train, *test)


def rt_model(task: Any, seed: int, dev: torch.device) -> Packed:
    torch.manual_seed(seed)  # the head's initialisation
    clf = task.build()[0]
    assert isinstance(clf, SentenceClassifier)
    return Packed(clf).to(dev)


def rt_alphas(model: Packed) -> dict[str, float]:
    """Power-law alpha (weightsmith.analyze) of the ESD of the ``RT_SPECTRA`` encoder weights."""
    mods = dict(model.clf.encoder.named_modules())
    return {n: float(fit_power_law(esd(mods[n].weight.detach().double().cpu())).alpha) for n in RT_SPECTRA}


def compander_minilm_rows(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    task, _, (x, y, xt, yt) = rt_setup(args, dev)
    short = ", ".join(n.replace("encoder.layer.", "L").replace("attention.self.", "") for n in RT_SPECTRA)
    print(f"| seed | model | test acc | mean abs dW | alpha ({short}) | s |")
    print("|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    pre = rt_alphas(rt_model(task, 0, dev))
    print(f"| - | pretrained | - | - | {', '.join(f'{a:.2f}' for a in pre.values())} | - |", flush=True)
    rows.append({"model": "pretrained", "alphas": pre})
    for seed in range(args.seeds):
        for name, a, mult in (
            ("plain", None, 1.0),
            ("plain, lr x2.5", None, 2.5),  # step-size control, as on digits
            (f"compander a={args.compander_alpha}", args.compander_alpha, 1.0),
        ):
            model = rt_model(task, seed, dev)
            w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
            if a is not None:
                apply_compander(model.clf.encoder, a, 0.01)
            secs = rt_train(model, x, y, args, args.ft_lr * mult, seed)
            remove_compander(model)
            dw = [(p.detach() - w0[n]).abs().flatten() for n, p in model.named_parameters() if n in w0]
            row: dict[str, Any] = {
                "seed": seed,
                "model": name,
                "test_acc": rt_acc(model, xt, yt),
                "mean_abs_dW": float(torch.cat(dw).mean()),
                "alphas": rt_alphas(model),
                "s": round(secs, 1),
            }
            rows.append(row)
            al = ", ".join(f"{v:.2f}" for v in row["alphas"].values())
            print(
                f"| {seed} | {name} | {100 * row['test_acc']:.1f} | {row['mean_abs_dW']:.2e} | {al} "
                f"| {secs:.0f} |"
            )
    return rows


def salun_rt_rows(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    """Original / Retrain / RL (full) / SalUn on MiniLM + Rotten Tomatoes, for each ``--forget`` framing
    (``class``: every training example of label 0 or 1; ``random``: a random 10 %)."""
    task, _, (x, y, xt, yt) = rt_setup(args, dev)
    metrics = ("forget acc", "retain acc", "test acc (others)", "test acc (class)")
    print(f"| seed | forget set | model | {' | '.join(metrics)} | avg gap to Retrain | s |")
    print("|---|---|---|" + "---|" * (len(metrics) + 2))
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        original = rt_model(task, seed, dev)
        original.clf.encoder.pooler.requires_grad_(False)  # unused by the mean pooling: no gradient
        t_orig = rt_train(original, x, y, args, args.ft_lr, seed)
        for framing in args.framings.split(","):
            if framing == "class":
                c = seed % 2
                label = f"label {c} ({task.dataset.classes[c]})"
                f, te = y == c, yt == c
            else:
                label = "10 % random"
                g = torch.Generator().manual_seed(100 + seed)
                f = (torch.rand(len(y), generator=g) < 0.1).to(dev)
                te = torch.zeros_like(yt, dtype=torch.bool)
            forget, retain = (x[f], y[f]), (x[~f], y[~f])
            retain_eval = (retain[0][:RT_RETAIN_EVAL], retain[1][:RT_RETAIN_EVAL])
            sets = [forget, retain_eval, (xt[~te], yt[~te]), (xt[te], yt[te])]
            results = {"Original": ([rt_acc(original, *s) for s in sets], t_orig)}
            retrained = rt_model(task, seed, dev)
            secs = rt_train(retrained, *retain, args, args.ft_lr, seed)
            results["Retrain"] = ([rt_acc(retrained, *s) for s in sets], secs)
            del retrained
            for name, frac in (("RL (full)", None), ("SalUn", args.fraction)):
                m = copy.deepcopy(original)
                t0 = time.perf_counter()
                chunks = [
                    (forget[0][i : i + RT_BATCH], forget[1][i : i + RT_BATCH])
                    for i in range(0, len(forget[1]), RT_BATCH)
                ]
                masks = None if frac is None else saliency_masks(m, chunks, fraction=frac)
                unlearn(
                    m,
                    forget,
                    retain,
                    masks=masks,
                    epochs=args.unlearn_epochs,
                    lr=args.lr,
                    batch_size=RT_BATCH,
                    seed=seed,
                )
                results[name] = ([rt_acc(m, *s) for s in sets], time.perf_counter() - t0)
                del m
            gold = results["Retrain"][0]
            for name, (vals, secs) in results.items():
                pairs = [(a, b) for a, b in zip(vals, gold, strict=True) if b == b]  # skip NaN columns
                gap = sum(abs(a - b) for a, b in pairs) / len(pairs)
                rows.append(
                    {
                        "seed": seed,
                        "forget": label,
                        "model": name,
                        **dict(zip(metrics, vals, strict=True)),
                        "gap": gap,
                        "s": round(secs, 1),
                    }
                )
                cells = " | ".join(f"{100 * v:.1f}" for v in vals)
                print(f"| {seed} | {label} | {name} | {cells} | {100 * gap:.2f} | {secs:.0f} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "what", choices=("salun", "compander", "growth", "growth-bank", "compander-minilm", "salun-rt")
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--unlearn-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--forget", choices=("class", "random"), default="class")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    # growth-bank only
    ap.add_argument("--templates", type=lambda s: [int(k) for k in s.split(",")], default=[2, 4])
    ap.add_argument("--banks", type=lambda s: s.split(","), default=["shared"], help="shared,separate")
    ap.add_argument("--coef-scale", type=float, default=1.0, help="new coefficients' norm / learned norm")
    ap.add_argument("--train-examples", type=int, default=None, help="the first N training examples only")
    # compander-minilm / salun-rt only (MiniLM on Rotten Tomatoes)
    ap.add_argument("--max-examples", type=int, default=1000)
    ap.add_argument("--eval-examples", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--compander-alpha", type=float, default=0.5)
    ap.add_argument("--framings", default="class,random")
    ap.add_argument(
        "--out", default=None, help="write the rows as JSON (growth-bank, compander-minilm, salun-rt)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    if args.what in ("compander-minilm", "salun-rt", "growth-bank"):
        runner = {
            "compander-minilm": compander_minilm_rows,
            "salun-rt": salun_rt_rows,
            "growth-bank": growth_bank_rows,
        }[args.what]
        rt_rows = runner(args, dev)
        if args.out:
            import json

            from weightsmith.staging import write_text

            write_text(args.out, json.dumps({"args": vars(args), "rows": rt_rows}, indent=2) + "\n")
    elif args.what == "salun":
        salun_rows(args, dev)
    elif args.what == "compander":
        compander_rows(args, dev)
    else:
        growth_rows(args, dev)


if __name__ == "__main__":
    main()
