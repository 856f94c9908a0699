"""SCE: Select, Calculate, Erase (mergekit's ``sce``).

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, arXiv:2408.07990, Sec. 3.3. For task
vectors delta_i = theta_i - theta_0 of one weight:

1. Select: keep the entries with the top ``select_topk`` fraction of variance across the models
   (k = floor(select_topk * #nonzero variances)); the others are zeroed in every delta_i.
2. Calculate: a matrix-level weight per model, eta_i = mean(delta_i^2) / sum_j mean(delta_j^2)
   (1/N each when that sum is ~0).
3. Erase: the TIES sign election (Yadav et al. 2023) masks entries against the majority sign m_i, and
   theta = theta_0 + sum_i eta_i m_i delta_i / max(sum_i eta_i m_i, 1e-6).

Model weights from the recipe are not used (as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, OnBaseMethod, sign_agreement, stack_deltas


def variance_mask(deltas: Tensor, fraction: float) -> Tensor:
    """1 at the top ``fraction`` of entries by variance across the models (of the nonzero variances)."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask


def sce(base: Tensor, thetas: Sequence[Tensor], select_topk: float = 1.0) -> Tensor:
    """SCE merge of one tensor (see the module docstring)."""
    b, deltas = stack_deltas(base, thetas)
    if len(thetas) == 0:
        return b
    if select_topk < 1:
        deltas = deltas * variance_mask(deltas, select_topk).unsqueeze(0)
    erase = sign_agreement(deltas).to(deltas.dtype)
    energy = deltas.square().reshape(len(thetas), -1).mean(dim=1)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1 / len(thetas)) if abs(total) < 1e-6 else energy / total
    eta = eta.reshape(-1, *([1] * (deltas.dim() - 1))) * erase
    return b + (deltas * eta).sum(dim=0) / eta.sum(dim=0).clamp(min=1e-6)


@register_config("sce", kind="merge")
class SCE(OnBaseMethod):
    """SCE (Wan et al. 2024) with variance selection keeping ``select_topk`` of the entries."""

    select_topk: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.select_topk <= 1.0:
            raise WeightsmithError(f"sce option select_topk={self.select_topk}: must be in [0, 1]")

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return sce(base, thetas, self.select_topk)
