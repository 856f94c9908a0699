"""Store-level driver for ``compare``: intruder dimensions and drift of every shared 2-D weight."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..execute import resolve_device
from ..progress import track
from ..select import Selector
from ..store import WeightStore
from .compare import compare_matrices
from .run import candidate_matrices, num, shape_batches

KEYS = ("num_intruders", "intruder_energy", "subspace_overlap", "relative_norm", "delta_effective_rank")


@dataclass
class ComparisonResult:
    base: str
    other: str
    k: int
    epsilon: float
    device: str
    matrices: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    seconds: float

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_matrices": len(self.matrices), "num_skipped": len(self.skipped)}
        if self.matrices:
            counts: np.ndarray = np.array([m["num_intruders"] for m in self.matrices])
            out["total_intruders"] = int(counts.sum())
            out["matrices_with_intruders"] = int((counts > 0).sum())
            for key in KEYS[1:]:
                vals = np.array([m[key] for m in self.matrices if m[key] is not None], dtype=np.float64)
                out[f"mean_{key}"] = num(vals.mean()) if vals.size else None
        out.update(
            {"k": self.k, "epsilon": self.epsilon, "device": self.device, "seconds": round(self.seconds, 3)}
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "other": self.other, "matrices": self.matrices, "skipped": self.skipped,
                "summary": self.summary()}  # fmt: skip

    def add_to_report(self, report: Any, title: str | None = None) -> None:
        """Deprecated: results do not know the report; call
        ``weightsmith.analyze.add_comparison(report, result)``."""
        warnings.warn(
            "ComparisonResult.add_to_report is deprecated; use weightsmith.analyze.add_comparison()",
            DeprecationWarning,
            stacklevel=2,
        )
        from .report_sections import add_comparison

        add_comparison(report, self, title=title)


def compare_weights(
    base: WeightStore,
    other: WeightStore,
    k: int = 10,
    epsilon: float = 0.5,
    select: Selector | str | None = None,
    device: str | torch.device | None = None,
    max_batch_bytes: int | None = None,
) -> ComparisonResult:
    """Compare every selected 2-D weight present in both stores; mismatches are listed, not fatal."""
    start = time.perf_counter()
    dev = resolve_device(device)
    if max_batch_bytes is None:
        max_batch_bytes = (1 << 29) if dev.type == "cuda" else (1 << 26)
    names, skipped = candidate_matrices(base, select, min_side=1)
    # WeightStore's ``in`` reads the tensor (Mapping.__contains__ via __getitem__): compare name sets
    base_names, other_names = set(base), set(other)
    pairs = []
    for n in names:
        if n not in other_names:
            skipped.append({"name": n, "reason": f"missing in {other.source}"})
        elif other.meta(n).shape != base.meta(n).shape:
            s0, s1 = list(base.meta(n).shape), list(other.meta(n).shape)
            skipped.append({"name": n, "reason": f"shape mismatch: base {s0} vs other {s1}"})
        else:
            pairs.append(n)
    sel = Selector.of(select)
    skipped.extend(
        {"name": n, "reason": f"missing in {base.source}"}
        for n in other
        if n not in base_names and sel.matches(n)
    )
    records: dict[str, dict[str, Any]] = {}
    batches = list(shape_batches(base, pairs, max_batch_bytes, transposed_alike=False))
    for _, members in track(batches, "compare", total=len(batches)):
        W0s, W1s, kept = [], [], []
        for n in members:
            W0 = base[n].to(device=dev, dtype=torch.float32)
            W1 = other[n].to(device=dev, dtype=torch.float32)
            if not (bool(torch.isfinite(W0).all()) and bool(torch.isfinite(W1).all())):
                skipped.append({"name": n, "reason": "NaN/Inf values in base or other; not compared"})
                continue
            W0s.append(W0)
            W1s.append(W1)
            kept.append(n)
        if not kept:
            continue
        res = compare_matrices(torch.stack(W0s), torch.stack(W1s), k=k, epsilon=epsilon)
        for b, n in enumerate(kept):
            records[n] = {
                "name": n,
                "shape": list(base.meta(n).shape),
                **{key: num(getattr(res, key)[b]) for key in KEYS},
                "max_cos": [round(float(c), 5) for c in res.max_cos[b].tolist()],
            }
    order = {n: i for i, n in enumerate(base)}
    return ComparisonResult(
        base=base.source,
        other=other.source,
        k=k,
        epsilon=epsilon,
        device=str(dev),
        matrices=[records[n] for n in sorted(records, key=order.__getitem__)],
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )
