"""Evidence for docs/analyze-seeds.md: WeightWatcher parity of the TPL / xmin_peak fits, W-PCA, rich vs
lazy learning and Data Diet, each on packaged data. Prints markdown tables.

    python benchmarks/evidence_analyze_seeds.py parity [--layers 6]   # needs powerlaw 1.x on PYTHONPATH
    python benchmarks/evidence_analyze_seeds.py speed [--device cuda]  # ours on every minilm matrix
    python benchmarks/evidence_analyze_seeds.py wpca [--epochs 8]
    python benchmarks/evidence_analyze_seeds.py richlazy [--epochs 20]
    python benchmarks/evidence_analyze_seeds.py datadiet [--epochs 30] [--rotten-tomatoes]

WeightWatcher 0.7.7's TPL and xmin_peak fits call ``powerlaw.Fit(..., distribution=...)``, which
powerlaw 2.0 rejects; the parity run therefore needs powerlaw 1.5 importable first, e.g.
``pip download powerlaw==1.5 --no-deps -d /tmp/pl && unzip /tmp/pl/*.whl -d /tmp/pl15`` and
``PYTHONPATH=/tmp/pl15``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch

from weightsmith import zoo
from weightsmith.analyze import analyze_weights
from weightsmith.analyze.datadiet import el2n_scores, grand_scores, select_subset
from weightsmith.analyze.richlazy import low_rank_init_, model_weight_changes, run_regime, scale_init_
from weightsmith.analyze.wpca import rank_correlation, wpca_score
from weightsmith.store import DictStore

MINILM_LAYER = "encoder.layer.{}."
OPTIONS: dict[str, dict[str, Any]] = {
    "xmin_peak": {"fix_fingers": "xmin_peak"},
    "TPL": {"fit": "TPL"},
    "E_TPL": {"fit": "E_TPL"},
}


def _minilm(layers: int) -> dict[str, torch.Tensor]:
    from weightsmith import models
    from weightsmith.store import open_store

    store = open_store(models.resolve("minilm"))
    keep = tuple(MINILM_LAYER.format(i) for i in range(layers))
    return {
        n: store[n].float()
        for n in store
        if n.endswith(".weight") and n.startswith(keep) and store[n].dim() == 2
    }


def parity(layers: int) -> None:
    """Our fits against WeightWatcher 0.7.7 (+ powerlaw 1.x) on the 2-D weights of minilm's first layers."""
    import powerlaw
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    mats = _minilm(layers)
    names = list(mats)
    lins = [torch.nn.Linear(W.shape[1], W.shape[0], bias=False) for W in mats.values()]
    for lin, W in zip(lins, mats.values(), strict=True):
        lin.weight.data.copy_(W)
    model = torch.nn.Sequential(*lins)
    version = getattr(powerlaw, "__version__", "?")
    print(f"powerlaw {version}, weightwatcher {ww.__version__}, {len(names)} matrices")
    print("| option | WW s | ours s | max rel. diff alpha | Lambda | D | xmin | same xmin |")
    print("|---|---|---|---|---|---|---|---|")
    for label, kw in OPTIONS.items():
        t0 = time.perf_counter()
        ref = ww.WeightWatcher(model=model).analyze(pl_package="powerlaw", **kw)
        t_ww = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = analyze_weights(DictStore(dict(zip(map(str, range(len(names))), mats.values(), strict=True))),
                               device="cpu", farms=False, mp_fit=False, **kw).to_pandas()  # fmt: skip
        t_ours = time.perf_counter() - t0
        cells = []
        for col in ("alpha", "Lambda", "D", "xmin"):
            if col not in ref.columns:
                cells.append("-")
                continue
            a, b = ours[col].to_numpy(float), ref[col].to_numpy(float)
            cells.append(f"{np.max(np.abs(a - b) / np.abs(b)):.1e}")
        a, b = ours["xmin"].to_numpy(float), ref["xmin"].to_numpy(float)
        same = int(np.sum(np.abs(a - b) <= 1e-9 * np.abs(b)))  # the same eigenvalue, to round-off
        print(f"| {label} | {t_ww:.1f} | {t_ours:.1f} | {' | '.join(cells)} | {same}/{len(names)} |")


def speed(device: str) -> None:
    """Our fits on every 2-D weight of minilm (one analyze call each)."""
    from weightsmith import models

    store = models.open_weights("minilm")
    print("| option | matrices | seconds | mean alpha | median Lambda |")
    print("|---|---|---|---|---|")
    for label, kw in {"PL": {}, **OPTIONS}.items():
        t0 = time.perf_counter()
        res = analyze_weights(store, device=device, farms=False, mp_fit=False, **kw)
        dt = time.perf_counter() - t0
        alphas = [m["alpha"] for m in res.matrices if m["alpha"] is not None]
        lams = [m["Lambda"] for m in res.matrices if m.get("Lambda") is not None]
        med = f"{np.median(lams):.3g}" if lams else "-"
        print(f"| {label} | {len(res.matrices)} | {dt:.1f} | {np.mean(alphas):.3f} | {med} |")


def wpca(epochs: int, seeds: int) -> None:
    """W-PCA at initialisation vs test accuracy after brief training, over MLP widths and depths."""
    task = zoo.load_task("digits")
    batch = task.x_train[:256]
    rows = []
    for depth in (1, 2, 3):
        for width in (8, 16, 32, 64, 128, 256):
            scores, accs = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = zoo.make_model("mlp", task, width, depth)
                scores.append(wpca_score(model, batch))
                zoo.train(model, task, epochs=epochs, seed=seed)
                accs.append(zoo.evaluate(model, task.x_test, task.y_test)[1])
            rows.append((depth, width, scores[0].params, np.mean([s.pca for s in scores]),
                         np.mean([s.score for s in scores]), float(np.mean(accs))))  # fmt: skip
    print("| depth | width | params | sum PCA_dim (eta 0.99) | W-PCA | test accuracy |")
    print("|---|---|---|---|---|---|")
    for d, w, p, k, s, a in rows:
        print(f"| {d} | {w} | {p} | {k:.1f} | {s:.3g} | {a:.3f} |")
    acc = [r[5] for r in rows]
    print("\n| proxy | Spearman | Kendall |\n|---|---|---|")
    for name, i in (("W-PCA (params x PCA)", 4), ("params only", 2), ("PCA only", 3)):
        rc = rank_correlation([float(r[i]) for r in rows], acc)
        print(f"| {name} | {rc['spearman']:.3f} | {rc['kendall']:.3f} |")


def richlazy(epochs: int) -> None:
    """The same MLP on digits from differently scaled / balanced / low-rank initialisations."""
    task = zoo.load_task("digits")
    hidden = ["net.0", "net.2"]
    every = [*hidden, "net.4"]
    g = torch.Generator().manual_seed(0)
    runs: dict[str, Any] = {
        "default (PyTorch init)": lambda m: m,
        "all layers x0.1": lambda m: scale_init_(m, dict.fromkeys(every, 0.1)),
        "all layers x4": lambda m: scale_init_(m, dict.fromkeys(every, 4.0)),
        "all layers x10": lambda m: scale_init_(m, dict.fromkeys(every, 10.0)),
        "first layer x0.1 (upstream light)": lambda m: scale_init_(m, {"net.0": 0.1}),
        "first layer x4 (upstream heavy)": lambda m: scale_init_(m, {"net.0": 4.0}),
        "hidden layers rank 2": lambda m: low_rank_init_(m, 2, hidden, g),
        "hidden layers rank 8": lambda m: low_rank_init_(m, 8, hidden, g),
    }
    print("| init | test acc | rel. change net.0 / net.2 / net.4 | eff. rank of dW net.0 / net.2 | "
          "align(dW, W0) net.0 / net.2 | align(dW, W_T) net.0 / net.2 | regime |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, prep in runs.items():
        torch.manual_seed(0)
        model = prep(zoo.make_model("mlp", task, 256, 2))
        init = {k: v.clone() for k, v in model.state_dict().items()}
        zoo.train(model, task, epochs=epochs, seed=0)
        acc = zoo.evaluate(model, task.x_test, task.y_test)[1]
        ch = model_weight_changes(init, model.state_dict())
        run = run_regime(ch)
        rel = " / ".join(f"{c.relative_change:.3g}" for c in ch)
        er = " / ".join(f"{c.delta_effective_rank:.1f}" for c in ch[:2])
        a0 = " / ".join(f"{c.init_alignment:.2f}" for c in ch[:2])
        a1 = " / ".join(f"{c.final_alignment:.2f}" for c in ch[:2])
        print(f"| {label} | {acc:.3f} | {rel} | {er} | {a0} | {a1} | {run['regime']} |")


def _subset_accuracy(task: zoo.TaskData, make: Any, idx: torch.Tensor, seed: int, epochs: int) -> float:
    sub = dataclasses.replace(task, x_train=task.x_train[idx], y_train=task.y_train[idx])
    model = zoo.train(make(seed), sub, epochs=epochs, seed=seed)
    return zoo.evaluate(model, task.x_test, task.y_test)[1]


def datadiet(task: zoo.TaskData, make: Any, epochs: int, early_epochs: int, seeds: int) -> None:
    """Train on the top-EL2N / top-GraNd / a random share of the training set; test accuracy."""
    early = [zoo.train(make(100 + s), task, epochs=early_epochs, seed=100 + s) for s in range(4)]
    fresh = [make(200 + s) for s in range(4)]
    scores = {
        "EL2N": el2n_scores(early, task.x_train, task.y_train),
        "GraNd (init)": grand_scores(fresh, task.x_train, task.y_train),
    }
    n = len(task.y_train)
    full = np.mean([_subset_accuracy(task, make, torch.arange(n), s, epochs) for s in range(seeds)])
    print(f"{task.name}: {n} training examples, full data test accuracy {full:.3f} (mean of {seeds} seeds)\n")
    print("| pruned | kept | top EL2N | top GraNd | random |\n|---|---|---|---|---|")
    for pruned in (0.3, 0.5, 0.7):
        keep = 1 - pruned
        cells = []
        for sc in (scores["EL2N"], scores["GraNd (init)"], None):
            accs = [_subset_accuracy(task, make, select_subset(scores["EL2N"] if sc is None else sc, keep,
                                                                "random" if sc is None else "top", seed=s),
                                     s, epochs) for s in range(seeds)]  # fmt: skip
            cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f}")
        print(f"| {pruned:.0%} | {round(keep * n)} | {' | '.join(cells)} |")


def _digits(width: int) -> tuple[zoo.TaskData, Any]:
    task = zoo.load_task("digits")

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return zoo.make_model("mlp", task, width, 2)

    return task, make


def _rotten_tomatoes(device: str) -> tuple[zoo.TaskData, Any]:
    """Rotten Tomatoes as frozen mean-pooled minilm sentence embeddings and a linear classifier."""
    from weightsmith import models
    from weightsmith.tasks import get_task

    rt = get_task("rotten_tomatoes")
    encoder, tok = models.load_model("minilm", task="encoder")
    encoder.to(device).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 256):
            enc = tok(texts[i : i + 256], truncation=True, max_length=64, padding=True, return_tensors="pt")
            enc = enc.to(device)
            h = encoder(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).cpu())
        return torch.cat(out)

    d = rt.dataset
    xs = [embed(list(s.x)) for s in (d.train, d.val, d.test)]
    ys = [torch.as_tensor(np.asarray(s.y)).long() for s in (d.train, d.val, d.test)]
    task = zoo.TaskData("rotten_tomatoes", xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], xs[0].shape[1], 2)

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return zoo.MLP(task.in_dim, (), 2)

    return task, make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("parity", "speed", "wpca", "richlazy", "datadiet"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=6, help="parity: minilm encoder layers compared")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="wpca: 2, datadiet: 3 by default")
    ap.add_argument("--rotten-tomatoes", action="store_true", help="datadiet: also on Rotten Tomatoes")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the documented numbers: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "parity":
        parity(args.layers)
    elif args.what == "speed":
        speed(args.device)
    elif args.what == "wpca":
        wpca(args.epochs or 8, args.seeds or 2)
    elif args.what == "richlazy":
        richlazy(args.epochs or 20)
    else:
        task, make = _digits(128)
        datadiet(task, make, args.epochs or 30, 3, args.seeds or 3)
        if args.rotten_tomatoes:
            task, make = _rotten_tomatoes(args.device)
            print()
            datadiet(task, make, args.epochs or 30, 2, args.seeds or 3)


if __name__ == "__main__":
    main()
