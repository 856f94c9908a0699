"""Measured evidence for docs/analyze.md: analyze summaries, WeightWatcher agreement, FARMS bias, intruders.

    python benchmarks/evidence_analyze.py > /tmp/evidence.md
    python benchmarks/evidence_analyze.py parity   # only the WeightWatcher parity table

Everything runs on the CPU from the packaged minilm and SmolLM2 (and seeded random matrices).
"""

from __future__ import annotations

import logging
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")

import torch  # noqa: E402

from weightsmith import models  # noqa: E402
from weightsmith.analyze import (  # noqa: E402
    FarmsConfig,
    alpha_at_quantile,
    analyze_weights,
    compare_weights,
    esd,
    farms_alpha,
    fit_power_law,
)
from weightsmith.store import DictStore  # noqa: E402

torch.set_num_threads(1)
KEYS = ("alpha", "log_norm", "log_spectral_norm", "stable_rank", "alpha_weighted", "mp_softrank")


def summaries() -> None:
    print("## analyze summaries\n")
    print("| model | matrices | skipped | mean alpha | median alpha | alpha<2 | alpha>6 | mean FARMS alpha |"
          " mean stable rank | mean eff. rank | mean MP soft rank | mean spikes | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("minilm", "smollm2"):
        s = analyze_weights(models.open_weights(name), device="cpu").summary()
        print(f"| {name} | {s['num_matrices']} | {s['num_skipped']} | {s['mean_alpha']:.3f} | "
              f"{s['median_alpha']:.3f} | {s['num_alpha_below_2']} | {s['num_alpha_above_6']} | "
              f"{s['mean_farms_alpha']:.3f} | {s['mean_stable_rank']:.2f} | {s['mean_effective_rank']:.1f} | "
              f"{s['mean_mp_softrank']:.3f} | {s['mean_num_spikes']:.1f} | {s['seconds']:.1f} |")  # fmt: skip


def ww_agreement() -> None:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    print("\n## agreement with WeightWatcher 0.7.7 (all 2-D weights of minilm encoder layers 0-5)\n")
    store = models.open_weights("minilm")
    names = [n for n in store if n.startswith("encoder.layer.") and len(store.meta(n).shape) == 2]
    state = {n: store[n].float() for n in names}
    ref = ww.WeightWatcher(model=state).analyze(mp_fit=True)
    ref = {f"{r.name}.weight": r for r in ref.itertuples()}
    ours = {m["name"]: m for m in analyze_weights(DictStore(state), device="cpu", farms=False).matrices}
    print("| metric | matrices | max relative difference | median relative difference |")
    print("|---|---|---|---|")
    for key in KEYS:
        rel = sorted(abs(ours[n][key] - getattr(ref[n], key)) / abs(getattr(ref[n], key)) for n in names)
        print(f"| {key} | {len(rel)} | {rel[-1]:.2e} | {rel[len(rel) // 2]:.2e} |")
    spikes = [abs(ours[n]["num_spikes"] - ref[n].num_spikes) for n in names]
    print(f"| num_spikes (absolute) | {len(spikes)} | {max(spikes)} | {sorted(spikes)[len(spikes) // 2]} |")


PARITY = ("alpha", "alpha_weighted", "D", "sigma", "xmin", "xmax", "num_pl_spikes", "log_norm",
          "log_spectral_norm", "stable_rank", "log_alpha_norm", "mp_softrank", "sigma_mp")  # fmt: skip


def _max_rel(ours: Any, ref: Any, key: str) -> float:
    import numpy as np

    a = np.asarray(ours[key], dtype=np.float64)
    b = np.asarray(ref[key], dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def ww_parity() -> None:
    """Our DataFrame against WeightWatcher's on whole models: same rows, same columns, wall time."""
    import time

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    print("\n## WeightWatcher parity: `to_pandas()` against `WeightWatcher.analyze()` (CPU, 1 thread)\n")
    print("| model | options | layers (ours / WW) | WW seconds | weightsmith seconds | "
          + " | ".join(f"max rel. diff {k}" for k in PARITY) + " | warning labels equal |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(PARITY) + "---|")
    runs = (("minilm", {"mp_fit": True}), ("minilm", {"mp_fit": True, "fix_fingers": "clip_xmax"}),
            ("smollm2", {"mp_fit": False}))  # fmt: skip
    for model, opts in runs:
        store = models.open_weights(model)
        state = {n: store[n].float() for n in store if len(store.meta(n).shape) == 2}
        t = time.perf_counter()
        ref = ww.WeightWatcher(model=state).analyze(**opts)
        t_ww = time.perf_counter() - t
        t = time.perf_counter()
        ours = analyze_weights(DictStore(state), device="cpu", farms=False, **opts).to_pandas()  # type: ignore[arg-type]
        t_us = time.perf_counter() - t
        ours = ours.set_index("name").loc[[str(n) for n in ref["name"]]].reset_index()
        keys = [k for k in PARITY if opts.get("mp_fit") or k not in ("mp_softrank", "sigma_mp")]
        diffs = [f"{_max_rel(ours, ref, k):.1e}" if k in keys else "-" for k in PARITY]
        same = list(ours["warning"]) == list(ref["warning"])
        label = ", ".join(f"{k}={v}" for k, v in opts.items())
        print(f"| {model} | {label} | {len(ours)} / {len(ref)} | {t_ww:.1f} | {t_us:.1f} | "
              + " | ".join(diffs) + f" | {same} |")  # fmt: skip


def farms_bias() -> None:
    print("\n## FARMS and the aspect-ratio bias (random matrices, 128 rows, mean of 4 seeds)\n")
    print("| shape | Q | Gaussian: plain alpha (median xmin) | Gaussian: FARMS alpha (median xmin) |"
          " Student-t(3): plain alpha (KS) | Student-t(3): FARMS alpha (KS) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t3 = torch.distributions.StudentT(3.0)
    for shape in [(128, 128), (128, 256), (128, 512), (128, 1024), (128, 2048)]:
        W = torch.randn(4, *shape, generator=g)
        H = t3.sample((4, *shape))
        row = [
            float(alpha_at_quantile(esd(W)).mean()),
            float(farms_alpha(W, FarmsConfig(rows=64, xmin="median")).mean()),
            float(fit_power_law(esd(H)).alpha.mean()),
            float(farms_alpha(H, FarmsConfig(rows=64)).mean()),
        ]
        print(
            f"| {shape[0]}x{shape[1]} | {shape[1] // shape[0]} | "
            + " | ".join(f"{v:.2f}" for v in row)
            + " |"
        )


def intruders() -> None:
    print("\n## intruder dimensions: minilm vs minilm + an update of 50% relative norm, k=10, epsilon=0.5\n")
    print("| update | matrices | matrices with intruders | total intruders | mean intruder energy |"
          " mean subspace overlap | mean delta eff. rank |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    base = models.open_weights("minilm")
    names = [n for n in base if n.startswith("encoder.layer.") and len(base.meta(n).shape) == 2]
    state = {n: base[n].float() for n in names}
    g = torch.Generator().manual_seed(0)
    for label, rank in (("rank 1", 1), ("rank 8", 8), ("full rank (Gaussian)", None)):
        tuned = {}
        for n, W in state.items():
            m, k = W.shape
            D = torch.randn(m, k, generator=g) if rank is None else (
                torch.randn(m, rank, generator=g) @ torch.randn(rank, k, generator=g))  # fmt: skip
            tuned[n] = W + D * (0.5 * W.norm() / D.norm())
        s = compare_weights(DictStore(state, "minilm"), DictStore(tuned, label), device="cpu").summary()
        print(f"| {label} | {s['num_matrices']} | {s['matrices_with_intruders']} | {s['total_intruders']} | "
              f"{s['mean_intruder_energy']:.3f} | {s['mean_subspace_overlap']:.3f} | "
              f"{s['mean_delta_effective_rank']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["parity"]:
        ww_parity()
        raise SystemExit(0)
    summaries()
    ww_agreement()
    ww_parity()
    farms_bias()
    intruders()
