"""EVA: LoRA whose ``A`` is initialised with the principal components of the layer's inputs.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", 2024, arXiv:2410.07170.

For each adapted layer the calibration inputs ``X`` [n, in] are centred and decomposed,
``X - mean = U S Vᵀ``; ``A = V_rᵀ`` (divided by ``sqrt(S_r)`` with ``whiten``) and ``B = 0``.
Ranks are redistributed across layers: every layer may take up to ``round(rho · r)`` components,
and the ``r · L`` components with the largest explained-variance ratios over all ``L`` layers win.
With ``adjust_scaling`` the per-layer ``alpha`` follows the rank so that ``alpha / r`` is unchanged.
Unlike PEFT (incremental PCA with early stopping), this uses one exact SVD of up to 4096 input
rows per layer (``_attach.CALIBRATION_ROWS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import register_config
from ..layers import InputStats
from ..linalg import svd
from ._core import AdapterConfig, AdapterContext, check_rank
from .lora import LoRAAdapter, lora_scaling


def input_components(X: Tensor | InputStats, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` principal directions of the rows of ``X`` (captured rows, or the layer walker's statistics).

    Returns (components [k, in], singular values of the centred rows, explained-variance ratios). From
    :class:`~weightsmith.layers.InputStats` (Gram matrix and channel sums, so every calibration token counts,
    not only the captured rows) the same quantities come from the eigenvectors of the covariance
    ``C = XᵀX/n − μμᵀ``: ``C = V (S²/n) Vᵀ``.
    """
    if isinstance(X, InputStats):
        evals, evecs = torch.linalg.eigh(X.covariance().double())
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        ratio = evals / evals.sum().clamp_min(1e-30)
        return evecs.T[:k].float(), (evals * X.n).sqrt()[:k].float(), ratio[:k].float()
    Xc = X.float() - X.float().mean(0, keepdim=True)
    _, S, Vh = svd(Xc)
    ratio = S.square() / S.square().sum().clamp_min(1e-30)
    return Vh[:k], S[:k], ratio[:k]


def redistribute(ratios: Mapping[str, Tensor], budget: int) -> dict[str, int]:
    """Give the ``budget`` largest explained-variance ratios (over all layers) to their layers."""
    owners = [name for name, r in ratios.items() for _ in range(len(r))]
    values = torch.cat([r.float().cpu() for r in ratios.values()])
    order = values.argsort(descending=True, stable=True)[:budget]
    counts = dict.fromkeys(ratios, 0)
    for i in order.tolist():
        counts[owners[i]] += 1
    return counts


@register_config("eva", kind="adapter")
class EVA(AdapterConfig):
    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, alpha=8.0)
    rank: int = 8
    alpha: float = 16.0
    rho: float = 2.0
    whiten: bool = False
    adjust_scaling: bool = True
    rslora: bool = False
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EVA rho must be >= 1, got {self.rho}")

    def needs_calibration(self) -> bool:
        return True

    def layer_configs(
        self, names: list[str], inputs: Mapping[str, Tensor] | None
    ) -> dict[str, AdapterConfig]:
        if inputs is None:
            return {n: self for n in names}
        ratios = {}
        for n in names:
            X = inputs[n]
            k = min(round(self.rho * self.rank), *X.shape)
            ratios[n] = input_components(X, k)[2]
        counts = redistribute(ratios, self.rank * len(names))
        out: dict[str, AdapterConfig] = {}
        for n in names:
            r = counts[n]
            if r > 0:
                alpha = self.alpha * r / self.rank if self.adjust_scaling else self.alpha
                out[n] = replace(self, rank=r, alpha=alpha)
        return out

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoRAAdapter:
        check_rank(self.rank, W0, ctx)
        out_f, in_f = W0.shape
        B = torch.zeros(out_f, self.rank, device=W0.device)
        s = lora_scaling(self.alpha, self.rank, self.rslora)
        if ctx.inputs is None:
            if not ctx.restoring:
                raise ctx.error("EVA needs calibration inputs for this layer")
            return LoRAAdapter(torch.zeros(self.rank, in_f, device=W0.device), B, s, self.dropout)
        V, S, _ = input_components(ctx.inputs, self.rank)
        if V.shape[0] < self.rank:
            raise ctx.error(
                f"only {V.shape[0]} calibration rows for rank {self.rank}; pass more calibration data"
            )
        A = V / S.sqrt().clamp_min(1e-12).unsqueeze(1) if self.whiten else V
        return LoRAAdapter(A.to(W0.device).contiguous(), B, s, self.dropout)
