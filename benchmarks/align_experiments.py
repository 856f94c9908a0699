"""Evidence for the alignment and learned-merge methods on packaged data (CPU, one thread).

    python benchmarks/align_experiments.py [--quick] [--only barrier,pleas,atlas,signatures]

Writes benchmarks/results/align.md (tables) and benchmarks/results/align.json (raw curves).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from weightsmith import zoo
from weightsmith.analyze.barrier import barrier, classification_eval, interpolate
from weightsmith.merge.atlas import learn_coefficients, task_arithmetic_state, task_vector
from weightsmith.merge.permute import apply_permutation, chain_spec, mlp_spec, weight_matching
from weightsmith.merge.pleas import pleas_merge, zip_average
from weightsmith.merge.signatures import apply_signature, extract_signature, remove_signature

torch.set_num_threads(1)
OUT = Path(__file__).parent / "results"


def state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def cnn_spec(m: zoo.CNN):
    return chain_spec(
        m.state_dict(), ["conv1", "conv2", "fc1", "fc2"], {"conv1": "bn1", "conv2": "bn2"}, {"fc1": m.spatial}
    )


def run_barrier(quick: bool) -> tuple[list[str], dict]:
    rows, raw = [], {}
    setups = [
        ("digits", "mlp", 256, 40, [(1, 2), (3, 4), (5, 6)]),
        ("mnist1d", "mlp", 256, 40, [(1, 2), (3, 4)]),
        ("digits", "cnn", 64, 15, [(1, 2)]),
    ]
    for task_name, kind, width, epochs, pairs in setups:
        t = zoo.load_task(task_name)
        for sa, sb in pairs[: 1 if quick else None]:
            ma = zoo.train_model(kind, t, sa, width=width, epochs=epochs)
            mb = zoo.train_model(kind, t, sb, width=width, epochs=epochs)
            a, b = state(ma), state(mb)
            spec = cnn_spec(ma) if kind == "cnn" else mlp_spec(a, ma.linear_names())
            prepare = (lambda m, x=t.x_train: zoo.reset_bn_stats(m, x)) if kind == "cnn" else None
            t0 = time.perf_counter()
            perm = weight_matching(spec, a, b)
            wm_s = time.perf_counter() - t0
            template = copy.deepcopy(ma)
            ev = classification_eval(t.x_test, t.y_test)
            naive = barrier(template, a, b, ev, prepare=prepare)["naive"]
            aligned = barrier(template, a, apply_permutation(b, spec, perm), ev, prepare=prepare)["naive"]
            key = f"{task_name}-{kind}-{sa},{sb}"
            raw[key] = {"naive": naive.to_dict(), "aligned": aligned.to_dict(), "wm_seconds": wm_s}
            rows.append(
                f"| {task_name} | {kind} w={width} | {sa},{sb} | {naive.acc[0]:.3f} / {naive.acc[-1]:.3f} | "
                f"{naive.loss_barrier:.3f} / {100 * naive.acc_barrier:.1f} / {naive.midpoint_acc:.3f} | "
                f"{aligned.loss_barrier:.3f} / {100 * aligned.acc_barrier:.1f} / "
                f"{aligned.midpoint_acc:.3f} | "
                f"{aligned.loss_barrier / max(naive.loss_barrier, 1e-12):.2f} | {wm_s:.2f} s |"
            )
            print(rows[-1], flush=True)
    head = [
        "| task | model | seeds | endpoint acc A / B | naive: loss barrier / acc barrier (pp) / midpoint acc "
        "| weight-matched: same | loss-barrier ratio after/before | matching time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return head + rows, raw


def split_classes(t: zoo.TaskData, classes: set[int], share: float, seed: int) -> zoo.TaskData:
    """Training set dominated by ``classes`` (keeps ``share`` of the other classes' examples)."""
    g = torch.Generator().manual_seed(seed)
    own = torch.tensor([int(c) in classes for c in t.y_train])
    keep = own | (torch.rand(len(own), generator=g) < share)
    return zoo.TaskData(
        t.name, t.x_train[keep], t.y_train[keep], t.x_val, t.y_val, t.x_test, t.y_test, t.in_dim, t.n_classes
    )


def run_pleas(quick: bool) -> tuple[list[str], dict]:
    t = zoo.load_task("digits")
    rows, raw = [], {}
    seeds = [(1, 2)] if quick else [(1, 2), (3, 4)]
    widths = (0.5, 0.75, 1.0, 1.25, 1.5)
    for sa, sb in seeds:
        ta, tb = split_classes(t, {0, 1, 2, 3, 4}, 0.1, sa), split_classes(t, {5, 6, 7, 8, 9}, 0.1, sb)
        ma = zoo.train_model("mlp", ta, sa, width=128, depth=2, epochs=40)
        mb = zoo.train_model("mlp", tb, sb, width=128, depth=2, epochs=40)
        x = t.x_train  # inputs of both domains, no labels used by the merge
        acc = lambda m: zoo.evaluate(m, t.x_test, t.y_test)[1]  # noqa: E731
        with torch.no_grad():
            ens = float(
                ((ma(t.x_test).softmax(-1) + mb(t.x_test).softmax(-1)).argmax(-1) == t.y_test).float().mean()
            )
        a, b = state(ma), state(mb)
        spec = mlp_spec(a, ma.linear_names())
        wm = zoo.make_model("mlp", t, 128, 2)
        wm.load_state_dict(interpolate(a, apply_permutation(b, spec, weight_matching(spec, a, b)), 0.5))
        naive = zoo.make_model("mlp", t, 128, 2)
        naive.load_state_dict(interpolate(a, b, 0.5))
        res = {"A": acc(ma), "B": acc(mb), "ensemble": ens, "naive_avg": acc(naive), "wm_avg": acc(wm)}
        for w in widths:
            res[f"zip@{w}"] = acc(zip_average(ma.net, mb.net, x, w))
            res[f"pleas@{w}"] = acc(pleas_merge(ma.net, mb.net, x, w))
        raw[f"{sa},{sb}"] = res
        print(res, flush=True)
    head = [
        "| width (x original) | " + " | ".join(f"{w:.2f}" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    rows = []
    for key, res in raw.items():
        rows.append(
            f"| seeds {key}: activation-matched average (same units, no least squares) | "
            + " | ".join(f"{res[f'zip@{w}']:.3f}" for w in widths)
            + " |"
        )
        rows.append(
            f"| seeds {key}: **PLeaS** (partial matching + least squares) | "
            + " | ".join(f"{res[f'pleas@{w}']:.3f}" for w in widths)
            + " |"
        )
    refs = [
        "",
        "| seeds | A | B | ensemble (2x) | plain average | weight matching + average (1x) |",
        "|---|---|---|---|---|---|",
    ]
    refs += [
        f"| {k} | {r['A']:.3f} | {r['B']:.3f} | {r['ensemble']:.3f} | {r['naive_avg']:.3f} | "
        f"{r['wm_avg']:.3f} |"
        for k, r in raw.items()
    ]
    return head + rows + refs, raw


def fewshot(tasks: list[zoo.TaskData], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for t in tasks:
        for c in range(t.n_classes):
            idx = (t.y_train == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
            xs.append(t.x_train[idx])
            ys.append(t.y_train[idx])
    return torch.cat(xs), torch.cat(ys)


def run_atlas(quick: bool) -> tuple[list[str], dict]:
    base_task = zoo.load_task("digits")
    base_m = zoo.train_model("mlp", base_task, seed=0, width=128, depth=2, epochs=20)
    base = state(base_m)
    tasks = [zoo.load_task("digits", v) for v in ("rot90", "flip", "invert", "perm")]
    tvs = []
    for i, t in enumerate(tasks):
        m = zoo.train(copy.deepcopy(base_m), t, epochs=10, seed=10 + i)
        tvs.append(task_vector(state(m), base))
    model = zoo.make_model("mlp", base_task, 128, 2)

    def score(st: dict, split: str = "test") -> tuple[float, list[float]]:
        model.load_state_dict(st)
        accs = [zoo.evaluate(model, getattr(t, f"x_{split}"), getattr(t, f"y_{split}"))[1] for t in tasks]
        return sum(accs) / len(accs), accs

    results: dict[str, tuple[float, list[float]]] = {"base model (lambda = 0)": score(base)}
    grid = [i / 10 for i in range(16)]
    lam_val = max(grid, key=lambda l: score(task_arithmetic_state(base, tvs, l), "val")[0])
    results[f"task arithmetic, lambda={lam_val} tuned on full labelled val"] = score(
        task_arithmetic_state(base, tvs, lam_val)
    )
    x, y = fewshot(tasks, 16, seed=0)

    def fewshot_acc(lam: float) -> float:
        model.load_state_dict(task_arithmetic_state(base, tvs, lam))
        return zoo.evaluate(model, x, y)[1]

    lam_fs = max(grid, key=fewshot_acc)
    results[f"task arithmetic, lambda={lam_fs} tuned on the 16/class few-shot set"] = score(
        task_arithmetic_state(base, tvs, lam_fs)
    )
    for bw in (False, True):
        r = learn_coefficients(model, base, tvs, x, y, blockwise=bw, steps=300)
        results[f"aTLAS few-shot 16/class, {'per-tensor' if bw else 'per-task'} coefficients"] = score(
            r.state(base, tvs)
        )
    xu = torch.cat([t.x_val for t in tasks])
    for init in (0.0, 0.3):
        r = learn_coefficients(model, base, tvs, xu, None, blockwise=True, steps=100, lr=0.01, init=init)
        results[f"aTLAS unsupervised entropy (val inputs, no labels), per-tensor, init {init}"] = score(
            r.state(base, tvs)
        )
    head = [
        "| method | mean acc | " + " | ".join(t.name for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    rows = [
        f"| {k} | {v[0]:.3f} | " + " | ".join(f"{a:.3f}" for a in v[1]) + " |" for k, v in results.items()
    ]
    print("\n".join(rows), flush=True)
    return head + rows, {k: list(v) for k, v in results.items()}


def run_signatures(quick: bool) -> tuple[list[str], dict]:
    clean_t, noisy_t = zoo.load_task("digits"), zoo.load_task("digits", "noise", seed=0)
    pre = zoo.train_model("cnn", clean_t, seed=0, width=64, epochs=8)
    clean = zoo.train(copy.deepcopy(pre), clean_t, epochs=5, seed=1)
    robust = zoo.train(copy.deepcopy(pre), noisy_t, epochs=5, seed=1)
    c, r = state(clean), state(robust)
    rows = [
        "| signature (layers, rank, bits) | size vs full robust delta of those layers | strength | "
        "clean test acc | noisy test acc | removal bit-exact |",
        "|---|---|---|---|---|---|",
    ]
    raw = {}
    m = copy.deepcopy(clean)
    for layers, rank, bits in [(1, 4, 8), (2, 8, 8), (2, 8, 4)]:
        sig = extract_signature(r, c, layers, rank, bits)
        full = sum(c[n].numel() * 4 for n in sig.shapes)
        for s in (0.0, 0.5, 1.0):
            patched, undo = apply_signature(c, sig, s)
            m.load_state_dict(patched)
            accs = (
                zoo.evaluate(m, clean_t.x_test, clean_t.y_test)[1],
                zoo.evaluate(m, noisy_t.x_test, noisy_t.y_test)[1],
            )
            back = remove_signature(patched, sig, s, undo)
            exact = all(torch.equal(back[k], c[k]) for k in c)
            rows.append(
                f"| {layers} layer(s), r={rank}, {bits}-bit | {sig.nbytes()} B / {full} B "
                f"({full / sig.nbytes():.1f}x smaller) | {s} | {accs[0]:.3f} | {accs[1]:.3f} | {exact} |"
            )
            raw[f"{layers},{rank},{bits},{s}"] = {
                "clean": accs[0],
                "noisy": accs[1],
                "exact": exact,
                "bytes": sig.nbytes(),
                "full_bytes": full,
            }
    ref = [zoo.evaluate(robust, t.x_test, t.y_test)[1] for t in (clean_t, noisy_t)]
    rows.append(f"| (reference) full robust fine-tune | - | - | {ref[0]:.3f} | {ref[1]:.3f} | - |")
    print("\n".join(rows), flush=True)
    return rows, raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="barrier,pleas,atlas,signatures")
    args = ap.parse_args()
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 CPU thread"
    parts = {"barrier": run_barrier, "pleas": run_pleas, "atlas": run_atlas, "signatures": run_signatures}
    md, raw = (
        [
            "# Alignment and learned-merge evidence\n\n"
            f"Machine: {machine}. Script: benchmarks/align_experiments.py"
        ],
        {},
    )
    for name in args.only.split(","):
        t0 = time.perf_counter()
        rows, raw[name] = parts[name](args.quick)
        md += [f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n", *rows]
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.only == ap.get_default("only") else "-" + args.only.replace(",", "-")
    (OUT / f"align{suffix}.md").write_text("\n".join(md) + "\n")
    (OUT / f"align{suffix}.json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
