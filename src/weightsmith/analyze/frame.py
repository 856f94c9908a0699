"""Analysis results as WeightWatcher's ``details`` DataFrame, and ``describe`` (shapes only, no SVD).

Code written for WeightWatcher 0.7.x (Martin & Mahoney, "Implicit self-regularization in deep neural
networks", JMLR 2021) reads ``watcher.analyze()``'s DataFrame by column name; ``to_frame`` gives the same
names for the same metrics so it runs unchanged on ``AnalysisResult.to_pandas()``. As in WeightWatcher's
state-dict reader, ``name`` and ``longname`` are the tensor name without its ``.weight`` suffix and
``layer_id`` counts the analysed layers from 1. ``D`` is the KS distance of the power-law fit (not a
dimension), ``xmax`` and ``spectral_norm`` are lambda_max, ``norm`` is ``||W||_F^2``. Columns that are
ours only (``effective_rank``, ``farms_alpha``, ``tensor``, ``shape``) come last; an analysis run with
``randomize`` adds WeightWatcher's randomised-ESD columns (``randomize.RANDOM_COLUMNS``) before them, one
with ``fit="TPL"``/``"E_TPL"`` its ``Lambda`` and one with ``fix_fingers="clip_xmax"`` its
``num_fingers`` and ``raw_alpha``.
"""

from __future__ import annotations

from typing import Any

from ..select import Selector
from ..store import WeightStore
from .batches import MIN_EVALS, candidate_matrices
from .conv import layer_shape
from .randomize import RANDOM_COLUMNS

# WeightWatcher's column <- our record key (None: computed here)
WW_COLUMNS: dict[str, str | None] = {
    "layer_id": "layer_id", "name": None, "D": "ks_distance", "M": "M", "N": "N", "Q": "Q",
    "alpha": "alpha", "alpha_weighted": "alpha_weighted", "has_esd": None, "lambda_max": "lambda_max",
    "layer_type": "layer_type", "log_alpha_norm": "log_alpha_norm", "log_norm": "log_norm",
    "log_spectral_norm": "log_spectral_norm", "longname": None, "mp_softrank": "mp_softrank",
    "norm": None, "num_evals": "num_evals", "num_pl_spikes": "num_pl_spikes", "num_spikes": "num_spikes",
    "rf": "rf", "sigma": "sigma", "sigma_mp": "sigma_mp", "spectral_norm": "lambda_max",
    "stable_rank": "stable_rank", "status": None, "warning": "warning", "xmax": "xmax",
    "xmin": "xmin",
}  # fmt: skip
OWN_COLUMNS = ("effective_rank", "farms_alpha")
DESCRIBE_COLUMNS = ("layer_id", "name", "M", "N", "Q", "layer_type", "longname", "num_evals", "rf")


def layer_name(tensor: str) -> str:
    """WeightWatcher's layer name for a state-dict tensor: the name without ``.weight``."""
    return tensor.removesuffix(".weight")


def _value(rec: dict[str, Any], column: str, key: str | None) -> Any:
    if key is not None:
        v = rec.get(key)
        return float("nan") if v is None else v
    if column in ("name", "longname"):
        return layer_name(rec["name"])
    if column == "has_esd":
        return True
    if column == "norm":
        return float("nan") if rec.get("log_norm") is None else 10.0 ** rec["log_norm"]
    return "success" if rec.get("alpha") is not None else "failed"  # status


def to_frame(matrices: list[dict[str, Any]]) -> Any:
    """A ``pandas.DataFrame`` of analysis records with WeightWatcher's columns (NaN where undefined)."""
    import pandas as pd

    randomized = any("num_traps" in rec for rec in matrices)
    fingers = ("num_fingers", "raw_alpha") if any("num_fingers" in rec for rec in matrices) else ()
    tpl = ("Lambda",) if any("Lambda" in rec for rec in matrices) else ()
    extra = (*tpl, *fingers, *(RANDOM_COLUMNS if randomized else ()), *OWN_COLUMNS)
    rows = []
    for rec in matrices:
        row = {c: _value(rec, c, k) for c, k in WW_COLUMNS.items()}
        row.update({c: float("nan") if rec.get(c) is None else rec[c] for c in extra})
        row["tensor"] = rec["name"]
        row["shape"] = "x".join(map(str, rec["shape"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*WW_COLUMNS, *extra, "tensor", "shape"])


def describe(
    store: WeightStore, select: Selector | str | None = None, min_evals: int = MIN_EVALS, kernels: bool = True
) -> Any:
    """WeightWatcher's ``describe()``: the layers ``analyze`` would read and their shapes, without an SVD.

    Columns ``layer_id, name, M, N, Q, layer_type, longname, num_evals, rf`` (``num_evals = M * rf``).
    """
    import pandas as pd

    names, _ = candidate_matrices(store, select, min_side=min_evals, kernels=kernels)
    rows = []
    for i, n in enumerate(names):
        view = layer_shape(store.meta(n).shape)
        assert view is not None
        rows.append({"layer_id": i + 1, "name": layer_name(n), "M": view.M, "N": view.N, "Q": view.Q,
                     "layer_type": view.layer_type, "longname": layer_name(n), "num_evals": view.num_evals,
                     "rf": view.rf})  # fmt: skip
    return pd.DataFrame(rows, columns=list(DESCRIBE_COLUMNS))
