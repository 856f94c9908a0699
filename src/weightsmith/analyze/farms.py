"""FARMS: power-law alpha of a weight matrix without aspect-ratio bias.

Hu, Liu, Qiao, Yang, Mahoney et al., "Eigenspectrum Analysis of Neural Networks without Aspect Ratio
Bias" (FARMS: Fixed-Aspect-Ratio Matrix Subsampling), ICML 2025, arXiv:2506.06280.

The ESD of an N x M matrix depends on its aspect ratio Q = N / M even when the entries are pure noise,
so the heavy-tail exponent alpha of a 576 x 1536 MLP matrix and of a 576 x 576 attention matrix are
not directly comparable. FARMS samples sub-matrices of one fixed aspect ratio ``q`` (rows r, columns
``int(r * q)``) at evenly spaced windows over the matrix, takes the eigenvalues ``sigma^2`` of every
window, pools them into one ESD and fits alpha to the pooled ESD (here with the same CSN/KS power-law
fit as the plain alpha). Every window of a batch of same-shaped matrices is decomposed in one batched
call. Defaults: q = 1 (the paper's LLM setting), r = half the shorter side (the paper uses 2000 rows
for LLaMA-7B's 4096), ``windows`` evenly spaced starts per dimension.

Cost: the windows of an m x n matrix (m <= n) are ``windows^2`` eigenproblems of size m/2, about
``windows^2 / 8`` of the plain ESD's size-m problem in flops, but small eigenproblems run less
efficiently, so in float64 on a CPU FARMS took 1.6x the plain eigensolve (1024 x 2816, 9 windows of
512). The windows' spectra are therefore decomposed in float32 by default unless the weights
themselves are float64 (``precision="weights"``): FARMS is our own metric (no WeightWatcher parity to
keep), and the float32 alpha differs from the float64 one by about 1e-5 relative
(tests/analyze/test_farms_precision.py; docs/analyze-landscape.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WeightsmithError
from .powerlaw import alpha_at_quantile, fit_power_law
from .spectrum import esd

MAX_CANDIDATES = 256  # xmin candidates scored on a pooled ESD (evenly spaced ranks)
PRECISIONS = ("weights", "float32", "float64", "auto")


@dataclass(frozen=True)
class FarmsConfig:
    q: float = 1.0  # aspect ratio (columns / rows) of every sampled window
    rows: int | None = None  # window rows; None: half the shorter side
    windows: int = 3  # evenly spaced window starts per dimension (up to windows^2 windows)
    xmin: str = "ks"  # "ks": KS-optimal xmin as for alpha; "median": FARMS's xmin_mid (median eigenvalue)
    # windows' eigensolver dtype: "weights": float64 for float64 weights, else float32; "auto": the
    # dtype the caller passes (the plain analysis's); or "float32" / "float64"
    precision: str = "weights"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise WeightsmithError(
                f"FarmsConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )


def window_grid(m: int, n: int, cfg: FarmsConfig) -> tuple[int, int, list[int], list[int]]:
    """Window size ``(r, c)`` and start offsets along rows and columns for an ``m x n`` matrix."""
    short = min(m, n)
    r = cfg.rows if cfg.rows is not None else max(1, short // 2)
    r = min(r, m)
    c = int(r * cfg.q)
    if c > n:  # the window does not fit: shrink it, keeping the aspect ratio
        r = max(1, int(n / cfg.q))
        c = min(n, int(r * cfg.q))
    return r, c, _starts(m, r, cfg.windows), _starts(n, c, cfg.windows)


def _starts(extent: int, size: int, count: int) -> list[int]:
    if size >= extent or count <= 1:
        return [0]
    span = extent - size
    return sorted({round(i * span / (count - 1)) for i in range(count)})


def farms_esd(
    W: Tensor, cfg: FarmsConfig | None = None, dtype: torch.dtype = torch.float64, streams: int = 1
) -> Tensor:
    """Pooled eigenvalues of all windows of each matrix in ``W`` (B, m, n): shape (B, windows * r).

    Matrices are oriented so that rows are the shorter side, as the sampling is defined on them. The
    eigensolver runs in ``cfg.precision`` (``dtype`` when that is ``auto``).
    """
    cfg = cfg or FarmsConfig()
    if cfg.precision == "weights":
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    elif cfg.precision != "auto":
        dtype = torch.float64 if cfg.precision == "float64" else torch.float32
    if W.shape[-2] > W.shape[-1]:
        W = W.mT
    m, n = W.shape[-2:]
    r, c, rs, cs = window_grid(m, n, cfg)
    blocks = torch.stack([W[..., i : i + r, j : j + c] for i in rs for j in cs], dim=-3)
    return esd(blocks.flatten(0, -3), dtype, streams).reshape(*blocks.shape[:-2], -1).flatten(-2).double()


def farms_alpha(
    W: Tensor, cfg: FarmsConfig | None = None, dtype: torch.dtype = torch.float64, streams: int = 1
) -> Tensor:
    """FARMS alpha for each matrix of the batch ``W`` (B, m, n) (NaN where the fit is not defined)."""
    cfg = cfg or FarmsConfig()
    pooled = farms_esd(W, cfg, dtype, streams)
    if cfg.xmin == "median":
        return alpha_at_quantile(pooled, 0.5)
    if cfg.xmin != "ks":
        raise ValueError(f"FarmsConfig.xmin must be 'ks' or 'median', got {cfg.xmin!r}")
    return fit_power_law(pooled, max_candidates=MAX_CANDIDATES).alpha
