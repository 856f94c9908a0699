"""Activation-aware SVD: truncate ``W`` in the norm of its outputs on calibration data.

The layer's output error on inputs ``X`` [n, in] is ``‖(W − Ŵ) Xᵀ‖_F² = ‖(W − Ŵ) S‖_F²`` for any ``S`` with
``S Sᵀ = XᵀX``. Two choices of ``S``:

- ``whiten="cholesky"`` (SVD-LLM: "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression", Wang et al., ICLR 2025, Sec. 3.1): ``S`` = the Cholesky factor of the (damped) Gram
  ``XᵀX + λI``; truncating the SVD of ``W S`` and multiplying back by ``S⁻¹`` is then optimal for the output
  error, and the loss of dropping ``σ_k(WS)`` is exactly ``σ_k²`` (Theorem 3.2).
- ``whiten="scale"`` (ASVD: "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
  Language Models", Yuan et al., 2023, eq. 4): the diagonal ``S_jj = (mean_t |x_tj|)^α``, which only
  approximates the output error but needs no Gram matrix.

Then ``Ŵ = trunc_r(W S) S⁻¹`` (``B = V_rᵀ S⁻¹`` by a triangular solve).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, StatsSpec
from ._lowrank import LowRankConfig, Weighting

WHITEN = ("cholesky", "scale")


def cholesky_whitening(gram: Tensor, damp: float = 1e-2) -> Tensor:
    """Lower ``S`` with ``S Sᵀ = G + λI``, ``λ = damp · mean diag G`` (grown until ``G + λI`` factors)."""
    G = gram.double()
    lam = damp * float(G.diagonal().mean().clamp_min(1e-12))
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
        if int(info) == 0:
            return L.float()
        lam *= 10
    raise WeightsmithError("asvd: the input Gram matrix is not positive definite even after damping")


@register_config("asvd", kind="compress")
class ASVD(LowRankConfig):
    """Activation-aware SVD (``whiten``: cholesky (SVD-LLM) or scale (ASVD, exponent ``alpha``); ``damp``)."""

    calibrated = True
    whiten: str = "cholesky"
    alpha: float = 0.5
    damp: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.whiten not in WHITEN:
            raise WeightsmithError(f"asvd option whiten={self.whiten!r}: use one of {', '.join(WHITEN)}")
        if not self.damp > 0:
            raise WeightsmithError(f"asvd option damp={self.damp}: must be > 0")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=self.whiten == "cholesky", channels=self.whiten == "scale")

    def weighting(self, W: Tensor, ctx: Any) -> Weighting:
        stats: InputStats | None = ctx
        if stats is None:
            raise WeightsmithError("asvd needs calibration statistics (pass calib=)")
        if self.whiten == "scale":
            return Weighting(right=stats.mean_abs().to(W.device).clamp_min(1e-6).pow(self.alpha))
        return Weighting(right=cholesky_whitening(stats.hessian().to(W.device) / 2, self.damp))
