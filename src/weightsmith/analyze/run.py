"""Store-level drivers: analyze every 2-D weight of a model, batched by shape on one device."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import WeightsmithError
from ..execute import ReadAhead, resolve_device
from ..linalg import warm_up_cuda
from ..progress import track
from ..select import Selector
from ..store import WeightStore
from .batches import (
    MIN_EVALS,
    candidate_matrices,
    read_device,
    read_host,
    shape_batches,
    short_side_first,
    to_device_batch,
)
from .conv import LayerShape, layer_esd, layer_shape
from .farms import FarmsConfig, farms_alpha
from .fingers import clip_xmax_fit, xmin_peak_fit
from .mp import marchenko_pastur_fit
from .powerlaw import PowerLawFit, fit_power_law
from .randomize import randomized_metrics
from .spectrum import esd, norm_metrics
from .tpl import fit_truncated_power_law

__all__ = ["MIN_EVALS", "AnalysisResult", "analyze_weights", "candidate_matrices", "num", "shape_batches"]
METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "effective_rank",
           "mp_softrank", "num_spikes", "farms_alpha")  # fmt: skip
# per-matrix numbers, in the order of a batch's result rows
COLUMNS = ("alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "effective_rank",
           "log_alpha_norm", "alpha", "mp_softrank", "num_spikes", "farms_alpha", "xmin", "ks_distance",
           "num_pl_spikes", "sigma", "sigma_mp", "lambda_max", "xmax", "num_fingers", "raw_alpha",
           "Lambda", "nonfinite")  # fmt: skip
OVER_TRAINED_THRESH = 2.0  # WeightWatcher's warning labels: alpha below this is "over-trained"
UNDER_TRAINED_THRESH = 6.0  # and alpha above this "under-trained"
FIX_FINGERS = (None, "clip_xmax", "xmin_peak")
FITS = ("PL", "TPL", "E_TPL")  # WeightWatcher's fit=: power law, truncated power law, TPL with xmin_peak
PRECISIONS = ("auto", "float64", "float32")


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


def eig_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The eigensolver dtype: ``auto`` is float64 on CPU and float32 on CUDA (see ``linalg``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.float32 if device.type == "cuda" else torch.float64
    return torch.float64 if precision == "float64" else torch.float32


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

    def to_pandas(self) -> Any:
        """One row per analysed matrix under WeightWatcher 0.7.x's column names (``frame.to_frame``)."""
        from .frame import to_frame

        return to_frame(self.matrices)

    def add_to_report(self, report: Any, title: str | None = None, esd_examples: int = 6) -> None:
        """Deprecated: results do not know the report; call
        ``weightsmith.analyze.report_sections.add_analysis(report, result)``."""
        warnings.warn(
            "AnalysisResult.add_to_report is deprecated; use weightsmith.analyze.add_analysis(report, res)",
            DeprecationWarning,
            stacklevel=2,
        )
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
    mp_fit: bool = True,
    precision: str = "auto",
    streams: int | None = None,
    kernels: bool = True,
    randomize: bool = False,
    seed: int = 0,
    fix_fingers: str | None = None,
    fit: str = "PL",
) -> AnalysisResult:
    """Spectral metrics of every selected 2-D weight of ``store``, computed batch by batch on ``device``.

    Same-shaped matrices (a transposed shape counts as the same) are stacked and go through one
    eigendecomposition, one vectorised power-law fit and one MP fit (unless ``mp_fit=False``) per
    batch. ``precision`` picks the eigensolver dtype (``eig_dtype``); ``streams`` the number of CUDA
    streams the eigensolver is spread over (default 4 on CUDA). With ``kernels`` Conv1d and Conv2d
    kernels are analysed one by one as WeightWatcher does (``conv.layer_esd``; no FARMS alpha).
    Each record also carries WeightWatcher's per-layer fields (``N``, ``M``, ``Q``, ``rf``,
    ``layer_type``, ``layer_id``, ``sigma``, ``warning``, ...; see ``AnalysisResult.to_pandas``).
    ``randomize`` adds WeightWatcher's randomised-ESD columns (``rand_num_spikes``, ``num_traps``,
    ``rand_sigma_mp``, ...; ``randomize.randomized_metrics``), the shuffles drawn from
    ``numpy.random.RandomState(seed)`` layer by layer: the same shuffles as ``np.random.seed(seed)``
    before WeightWatcher's ``analyze(randomize=True)`` on the same layers. ``fix_fingers="clip_xmax"``
    refits each tail with its largest eigenvalues clipped off (``fingers.clip_xmax_fit``) and adds
    ``num_fingers`` and ``raw_alpha``; ``fix_fingers="xmin_peak"`` bounds xmin near the ESD's peak
    (``fingers.xmin_peak_fit``). ``fit="TPL"`` fits a truncated power law (``tpl.
    fit_truncated_power_law``) and adds its ``Lambda``; ``fit="E_TPL"`` is the TPL with xmin_peak. As in
    WeightWatcher (with the ``powerlaw`` package), these fits report ``xmax`` as undefined and TPL fits
    no ``sigma``.
    """
    fix_fingers, tpl = _fit_options(fix_fingers, fit)
    start = time.perf_counter()
    dev = resolve_device(device)
    device_label = str(dev)
    dtype = eig_dtype(precision, dev)
    cuda = dev.type == "cuda"
    streams = streams if streams is not None else (4 if cuda else 1)
    if cuda:
        # an explicit index (the reader thread's current device need not be the caller's), found
        # without creating the CUDA context here: the context and the solver libraries are loaded on
        # a background thread while the first batch is read
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        warm_up_cuda(dev, streams)
    if max_batch_bytes is None:
        max_batch_bytes = (1 << 30) if cuda else (1 << 27)
    names, skipped = candidate_matrices(store, select, kernels=kernels)
    order = {n: i for i, n in enumerate(store)}
    views = {n: layer_shape(store.meta(n).shape) for n in names}
    kernel_names = [n for n in names if len(store.meta(n).shape) != 2]
    names = [n for n in names if len(store.meta(n).shape) == 2]
    batches = list(shape_batches(store, names, max_batch_bytes))
    pending: list[tuple[list[str], int, torch.Tensor, torch.Tensor | None]] = []
    with torch.no_grad():
        if cuda:
            reader = ReadAhead(batches, lambda b: read_device(store, b[1], dev), budget=1 << 62, depth=2)
        else:
            reader = ReadAhead(batches, lambda b: read_host(store, b[1]), background=False)
        with reader:
            for ((M, N), members), host in track(reader, "analyze", total=len(batches)):
                rows, evals = _analyze_batch(
                    host, dev, dtype, streams, N, M, mp_fit, farms, farms_config, fix_fingers, tpl
                )
                pending.append((members, M, rows, evals if keep_esd else None))
                del host
        for n in kernel_names:
            view = views[n]
            assert view is not None
            rows, evals = _analyze_kernel(store[n], dev, dtype, view, mp_fit, fix_fingers, tpl)
            pending.append(([n], view.num_evals, rows, evals if keep_esd else None))
    records: dict[str, dict[str, Any]] = {}
    esds: dict[str, np.ndarray] = {}
    for members, M, rows, kept_evals in pending:  # the only host-device synchronisation of the run
        table = rows.cpu().tolist()
        ev = kept_evals.float().cpu().numpy() if kept_evals is not None else None
        for b, n in enumerate(members):
            rec: dict[str, Any] = {"name": n, "shape": list(store.meta(n).shape)}
            rec.update({k: num(table[i][b]) for i, k in enumerate(COLUMNS)})
            rec.update(_ww_fields(views[n], rec))
            bad = int(rec.pop("nonfinite") or 0)
            if bad:
                what = (
                    f"{bad} NaN/Inf value(s) of {math.prod(rec['shape'])}"
                    if bad > 0
                    else "values overflow the Gram matrix"
                )
                skipped.append({"name": n, "reason": f"{what}; not analysed"})
                continue
            for k in ("num_spikes", "num_pl_spikes", "num_fingers"):
                rec[k] = None if rec[k] is None else int(rec[k])
            if fix_fingers != "clip_xmax":
                del rec["num_fingers"], rec["raw_alpha"]
            if not tpl:
                del rec["Lambda"]
            if not farms:
                rec["farms_alpha"] = None
            rec["num_evals"] = M
            records[n] = rec
            if ev is not None:
                esds[n] = ev[b]
    matrices = [records[n] for n in sorted(records, key=order.__getitem__)]
    for i, rec in enumerate(matrices):
        rec["layer_id"] = i + 1  # WeightWatcher numbers a state dict's layers from 1
    if randomize:
        rng = np.random.RandomState(seed)
        for rec in track(matrices, "randomize", total=len(matrices)):
            with torch.no_grad():
                rec.update(randomized_metrics(store[rec["name"]].to(dev), rec["N"], rec["M"], rng))
    skipped.sort(key=lambda s: order.get(s["name"], 0))
    return AnalysisResult(
        model=name or store.source,
        device=device_label,
        matrices=matrices,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        farms=farms,
        esds=esds,
    )


def _fit_options(fix_fingers: str | None, fit: str) -> tuple[str | None, bool]:
    """Checked ``(fix_fingers, tpl)``: ``E_TPL`` is the TPL fit with ``xmin_peak``, as in WeightWatcher."""
    if fix_fingers not in FIX_FINGERS:
        raise WeightsmithError(
            f"fix_fingers must be one of {[f for f in FIX_FINGERS if f]} or None, got {fix_fingers!r}"
        )
    if fit not in FITS:
        raise WeightsmithError(f"fit must be one of {list(FITS)}, got {fit!r}")
    if fit != "PL" and fix_fingers == "clip_xmax":
        raise WeightsmithError(
            f"fit={fit!r} with fix_fingers='clip_xmax': the clipped refit is a power-law fit only "
            "(WeightWatcher refuses E_TPL with clip_xmax too); use fix_fingers='xmin_peak' or None"
        )
    return ("xmin_peak" if fit == "E_TPL" else fix_fingers), fit != "PL"


def warning_label(alpha: float | None) -> str:
    """WeightWatcher's ``warning`` column: ``over-trained`` below alpha 2, ``under-trained`` above 6.

    Martin, Peng & Mahoney, Nature Communications 2021: well-trained layers have 2 <= alpha <= 6.
    An undefined alpha gets no label (WeightWatcher's failed fit reports alpha = -1, hence
    ``over-trained``).
    """
    if alpha is None:
        return ""
    if alpha < OVER_TRAINED_THRESH:
        return "over-trained"
    return "under-trained" if alpha > UNDER_TRAINED_THRESH else ""


def _ww_fields(view: LayerShape | None, rec: dict[str, Any]) -> dict[str, Any]:
    assert view is not None
    return {
        "layer_type": view.layer_type,
        "N": view.N,
        "M": view.M,
        "Q": view.Q,
        "rf": view.rf,
        "warning": warning_label(rec["alpha"]),
    }


def _analyze_kernel(
    W: torch.Tensor,
    dev: torch.device,
    dtype: torch.dtype,
    view: LayerShape,
    mp_fit: bool,
    fix_fingers: str | None = None,
    tpl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(len(COLUMNS), 1)`` result rows and the ``(1, M * rf)`` pooled ESD of one Conv1d/Conv2d kernel."""
    W = W.to(dev)
    evals = layer_esd(W, dtype)[None, :]
    bad = 0
    if bool(evals.isnan().any()):  # NaN/Inf weights, or finite ones whose Gram matrix overflows
        bad = int((~torch.isfinite(W)).sum()) or -1
    nonfinite = torch.tensor([float(bad)], dtype=torch.float64)
    evals = evals.to(torch.float64)
    nan = torch.full((1,), math.nan, dtype=torch.float64, device=evals.device)
    rows = _metric_rows(evals, view.N, view.M, mp_fit, nan, nonfinite.to(evals.device), fix_fingers, tpl)
    return rows, evals


def _analyze_batch(
    host: list[torch.Tensor],
    dev: torch.device,
    dtype: torch.dtype,
    streams: int,
    N: int,
    M: int,
    mp_fit: bool,
    farms: bool,
    farms_config: FarmsConfig | None,
    fix_fingers: str | None = None,
    tpl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(len(COLUMNS), B)`` result rows and the ``(B, M)`` ESDs of one same-shaped batch, on ``dev``.

    A matrix with NaN/Inf gets a NaN spectrum (``linalg.gram_eigvalsh``); its ``nonfinite`` entry is
    the count of bad values (-1 when the values are finite but the Gram matrix overflows).
    """
    W: torch.Tensor | None
    if dev.type == "cuda":
        W = to_device_batch(host, dev)
        evals = esd(W, dtype, streams)
        nonfinite = (~torch.isfinite(W)).flatten(1).sum(-1).to(evals.dtype)
    else:  # no stacked copy of the weights on CPU: the eigensolver reads each matrix in place
        mats = [short_side_first(t) for t in host]
        evals = torch.stack([esd(w, dtype) for w in mats])
        bad = evals[:, 0].isnan().tolist()
        counts = [int((~torch.isfinite(w)).sum()) if b else 0 for w, b in zip(mats, bad, strict=True)]
        nonfinite = torch.tensor(counts, dtype=evals.dtype)
        W = torch.stack([w.float() for w in mats]) if farms else None
    nonfinite = torch.where(evals[:, 0].isnan() & (nonfinite == 0), -1.0, nonfinite)
    evals = evals.to(torch.float64)  # the fits and metrics run in float64 whatever the solver's dtype
    nan = torch.full_like(evals[:, 0], math.nan)
    fa = farms_alpha(W, farms_config, dtype, streams) if farms and W is not None else nan
    return _metric_rows(evals, N, M, mp_fit, fa, nonfinite, fix_fingers, tpl), evals


def _metric_rows(
    evals: torch.Tensor,
    N: int,
    M: int,
    mp_fit: bool,
    fa: torch.Tensor,
    nonfinite: torch.Tensor,
    fix_fingers: str | None = None,
    tpl: bool = False,
) -> torch.Tensor:
    """The ``(len(COLUMNS), B)`` rows of float64 descending spectra ``evals`` of ``N x M`` layers."""
    nan = torch.full_like(evals[:, 0], math.nan)
    xmax, fingers, raw, lam = evals[:, 0], nan, nan, nan
    if tpl:
        tf = fit_truncated_power_law(evals, xmin_peak=fix_fingers == "xmin_peak")
        fit = PowerLawFit(tf.alpha, tf.xmin, tf.D, nan, tf.num_pl_spikes)
        xmax, lam = nan, tf.Lambda
    elif fix_fingers == "clip_xmax":
        ff = clip_xmax_fit(evals)
        fit, xmax, fingers, raw = ff.fit, ff.xmax, ff.num_fingers, ff.raw_alpha
    elif fix_fingers == "xmin_peak":
        fit, xmax = xmin_peak_fit(evals), nan
    else:
        fit = fit_power_law(evals)
    metrics = norm_metrics(evals, fit.alpha)
    mpf = marchenko_pastur_fit(evals, N, M) if mp_fit else None
    cols = {
        **metrics,
        "alpha": fit.alpha,
        "mp_softrank": mpf.mp_softrank if mpf is not None else nan,
        "num_spikes": mpf.num_spikes if mpf is not None else nan,
        "farms_alpha": fa,
        "xmin": fit.xmin,
        "ks_distance": fit.D,
        "num_pl_spikes": fit.num_pl_spikes,
        "sigma": fit.sigma,
        "sigma_mp": mpf.sigma if mpf is not None else nan,
        "lambda_max": evals[:, 0],
        "xmax": xmax,
        "num_fingers": fingers,
        "raw_alpha": raw,
        "Lambda": lam,
        "nonfinite": nonfinite,
    }
    return torch.stack([cols[k].to(torch.float64) for k in COLUMNS])
