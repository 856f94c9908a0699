"""Store-level drivers: analyze every 2-D weight of a model, batched by shape on one device."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..execute import resolve_device
from ..progress import track
from ..select import Selector
from ..store import WeightStore
from .farms import FarmsConfig, farms_alpha
from .mp import marchenko_pastur_fit
from .powerlaw import fit_power_law
from .spectrum import esd, norm_metrics

MIN_EVALS = 10  # a matrix whose smaller side is below this has too few eigenvalues for an ESD
METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "effective_rank",
           "mp_softrank", "num_spikes", "farms_alpha")  # fmt: skip


def num(x: Any) -> float | int | None:
    """A JSON-safe number: NaN and infinities become None."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, (bool, np.bool_)):
        return bool(x)  # type: ignore[return-value]
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def candidate_matrices(
    store: WeightStore, select: Selector | str | None, min_side: int = MIN_EVALS
) -> tuple[list[str], list[dict[str, str]]]:
    """Names of analysable 2-D floating weights and ``{"name", "reason"}`` for every other tensor."""
    sel = Selector.of(select)
    names = sel.require(list(store), "tensors") if sel.include else sel.filter(store)
    keep, skipped = [], []
    for name in names:
        meta = store.meta(name)
        if len(meta.shape) != 2:
            what = "conv/N-D tensor (not reshaped)" if len(meta.shape) > 2 else f"{len(meta.shape)}-D tensor"
            skipped.append({"name": name, "reason": f"{what} of shape {list(meta.shape)}; only 2-D weights"})
        elif not meta.dtype.is_floating_point:
            skipped.append(
                {"name": name, "reason": f"non-floating dtype {str(meta.dtype).removeprefix('torch.')}"}
            )
        elif min(meta.shape) < min_side:
            skipped.append(
                {"name": name, "reason": f"smaller side {min(meta.shape)} < {min_side}: too few eigenvalues"}
            )
        else:
            keep.append(name)
    return keep, skipped


def shape_batches(
    store: WeightStore, names: list[str], max_bytes: int, transposed_alike: bool = True
) -> Iterator[tuple[tuple[int, int], list[str]]]:
    """Group names by shape and split groups into batches of at most ``max_bytes`` (as float32).

    With ``transposed_alike`` the key is (short side, long side), so W and W^T shapes batch together.
    """
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n in names:
        s = store.meta(n).shape
        groups[(min(s), max(s)) if transposed_alike else (s[0], s[1])].append(n)
    for shape, members in groups.items():
        per = max(1, max_bytes // (shape[0] * shape[1] * 4))
        for i in range(0, len(members), per):
            yield shape, members[i : i + per]


def load_batch(
    store: WeightStore, names: list[str], device: torch.device
) -> tuple[torch.Tensor, list[str], list[dict[str, str]]]:
    """Stack weights as float32 ``(B, short, long)`` on ``device``; non-finite ones are set aside."""
    mats, kept, bad = [], [], []
    for n in names:
        W = store[n].to(device=device, dtype=torch.float32)
        if W.shape[0] > W.shape[1]:
            W = W.T
        finite = torch.isfinite(W)
        if not bool(finite.all()):
            nonfinite = int((~finite).sum())
            bad.append({"name": n, "reason": f"{nonfinite} NaN/Inf value(s) of {W.numel()}; not analysed"})
            continue
        mats.append(W)
        kept.append(n)
    stacked = torch.stack(mats) if mats else torch.empty(0, device=device)
    return stacked, kept, bad


@dataclass
class AnalysisResult:
    """Per-matrix spectral metrics of one model, plus what was skipped and why."""

    model: str
    device: str
    matrices: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    seconds: float
    farms: bool
    esds: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_matrices": len(self.matrices), "num_skipped": len(self.skipped)}
        for key in METRICS:
            vals = np.array([m[key] for m in self.matrices if m.get(key) is not None], dtype=np.float64)
            out[f"mean_{key}"] = num(vals.mean()) if vals.size else None
            if key == "alpha" and vals.size:
                out["median_alpha"] = num(np.median(vals))
                out["num_alpha_below_2"] = int((vals < 2).sum())
                out["num_alpha_above_6"] = int((vals > 6).sum())
                out["num_alpha_undefined"] = len(self.matrices) - int(vals.size)
        out["device"] = self.device
        out["seconds"] = round(self.seconds, 3)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "matrices": self.matrices,
            "skipped": self.skipped,
            "summary": self.summary(),
        }

    def add_to_report(self, report: Any, title: str | None = None, esd_examples: int = 6) -> None:
        from .report_sections import add_analysis

        add_analysis(report, self, title=title, esd_examples=esd_examples)


def analyze_weights(
    store: WeightStore,
    select: Selector | str | None = None,
    device: str | torch.device | None = None,
    farms: bool = True,
    farms_config: FarmsConfig | None = None,
    max_batch_bytes: int | None = None,
    keep_esd: bool = True,
    name: str | None = None,
) -> AnalysisResult:
    """Spectral metrics of every selected 2-D weight of ``store``, computed batch by batch on ``device``.

    Same-shaped matrices (a transposed shape counts as the same) are stacked and go through one
    eigendecomposition, one vectorised power-law fit and one MP fit per batch.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    if max_batch_bytes is None:
        max_batch_bytes = (1 << 30) if dev.type == "cuda" else (1 << 27)
    names, skipped = candidate_matrices(store, select)
    order = {n: i for i, n in enumerate(store)}
    records: dict[str, dict[str, Any]] = {}
    esds: dict[str, np.ndarray] = {}
    batches = list(shape_batches(store, names, max_batch_bytes))
    for (M, N), members in track(batches, "analyze", total=len(batches)):
        W, kept, bad = load_batch(store, members, dev)
        skipped.extend(bad)
        if not kept:
            continue
        evals = esd(W)
        fit = fit_power_law(evals)
        metrics = norm_metrics(evals, fit.alpha)
        mpf = marchenko_pastur_fit(evals, N, M)
        fa = farms_alpha(W, farms_config) if farms else None
        for b, n in enumerate(kept):
            rec: dict[str, Any] = {"name": n, "shape": list(store.meta(n).shape)}
            rec.update(
                {
                    k: num(metrics[k][b])
                    for k in (
                        "alpha_weighted",
                        "log_norm",
                        "log_spectral_norm",
                        "stable_rank",
                        "effective_rank",
                        "log_alpha_norm",
                    )
                }
            )
            rec["alpha"] = num(fit.alpha[b])
            rec["mp_softrank"] = num(mpf.mp_softrank[b])
            rec["num_spikes"] = num(mpf.num_spikes[b])
            rec["farms_alpha"] = num(fa[b]) if fa is not None else None
            rec.update(
                {
                    "xmin": num(fit.xmin[b]),
                    "ks_distance": num(fit.D[b]),
                    "num_pl_spikes": num(fit.num_pl_spikes[b]),
                    "num_evals": M,
                }
            )
            records[n] = rec
            if keep_esd:
                esds[n] = evals[b].float().cpu().numpy()
        del W, evals
    matrices = [records[n] for n in sorted(records, key=order.__getitem__)]
    skipped.sort(key=lambda s: order.get(s["name"], 0))
    return AnalysisResult(
        model=name or store.source,
        device=str(dev),
        matrices=matrices,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        farms=farms,
        esds=esds,
    )
