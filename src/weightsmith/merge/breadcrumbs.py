"""Model Breadcrumbs (mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``).

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024,
arXiv:2312.06795, Sec. 3: in each task vector delta_i drop the largest ``gamma`` fraction of |delta_i|
(outliers) and the smallest entries, keeping ``density`` of them: with n entries, sorted by magnitude
ascending, keep positions [n_bot, n_bot + floor(density n)) where n_top = floor(gamma n) and
n_bot = max(0, n - floor(density n) - n_top). Then theta_0 + lambda * sum_i w_i m_i delta_i / D, with
the TIES sign election m_i for ``breadcrumbs_ties`` (Yadav et al. 2023) and none for ``breadcrumbs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, OnBaseMethod, combine, l1_rescale, stack_deltas


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """The 0/1 mask of the entries Model Breadcrumbs keeps (see the module docstring)."""
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot : n_bot + keep]] = 1
    return mask.reshape(delta.shape)


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """One task vector with Model Breadcrumbs' mask applied (L1-rescaled with ``rescale``); kept whole
    when ``density`` >= 1."""
    if density >= 1:
        return delta
    m = breadcrumbs_mask(delta, density, gamma)
    return l1_rescale(delta, m) if rescale else delta * m


def breadcrumbs(
    base: Tensor,
    thetas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    elect: bool,
    normalize: bool = False,
    rescale: bool = False,
    scaling: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs of one tensor (``rescale``: L1-rescale each sparsified task vector)."""
    b, deltas = stack_deltas(base, thetas)
    if len(thetas) == 0:
        return b
    kept = [breadcrumbs_prune(d, p, g, rescale) for d, p, g in zip(deltas, densities, gammas, strict=True)]
    return combine(b, torch.stack(kept), weights, elect=elect, normalize=normalize, scaling=scaling)


@dataclass(frozen=True)
class _BreadcrumbsBase(OnBaseMethod):
    density: float = 1.0
    gamma: float = 0.01
    normalize: bool = False
    rescale: bool = False
    scaling: float = 1.0

    elect = False

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise WeightsmithError(f"{self.name} option density={self.density}: must be in (0, 1]")
        if not 0.0 <= self.gamma < 1.0:
            raise WeightsmithError(
                f"{self.name} option gamma={self.gamma}: the outlier fraction must be in [0, 1)"
            )

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        n = len(thetas)
        return breadcrumbs(
            base,
            thetas,
            weights,
            [self.density] * n,
            [self.gamma] * n,
            elect=self.elect,
            normalize=self.normalize,
            rescale=self.rescale,
            scaling=self.scaling,
        )


@register_config("breadcrumbs", kind="merge")
class Breadcrumbs(_BreadcrumbsBase):
    """Model Breadcrumbs followed by a weighted task-vector sum."""


@register_config("breadcrumbs_ties", kind="merge")
class BreadcrumbsTIES(_BreadcrumbsBase):
    """Model Breadcrumbs followed by the TIES sign election."""

    elect = True
