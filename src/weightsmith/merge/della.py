"""DELLA-Merging (mergekit's ``della`` and ``della_linear``).

Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024, arXiv:2406.11617, Sec. 3 (MagPrune): within each row of a task vector delta_i, rank the
entries by magnitude (r = 0 for the smallest, 1 for the largest after min-max normalisation) and keep
each entry with probability

    p_keep = (density - epsilon) + 2 * epsilon * r,

so larger entries are dropped less often. Survivors are rescaled (the paper divides by p_keep; mergekit,
and so this module, rescales the kept vector to the L1 norm of delta_i when ``rescale`` is on). Then the
generalised task-arithmetic frame: theta_0 + lambda * sum_i w_i m_i delta_i / D, with the TIES sign
election m_i for ``della`` and none for ``della_linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, OnBaseMethod, combine, l1_rescale, stack_deltas


def magprune(
    delta: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None = None
) -> Tensor:
    """DELLA's magnitude-ranked random drop of one task vector (rows of a matrix; a vector is one row).
    The mask is one ``torch.bernoulli`` draw over the keep probabilities, from ``generator``."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    shape = delta.shape
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    # rank of each entry within its row (0 = smallest |x|): the inverse of the sorting permutation,
    # scattered in O(n) rather than a second argsort; min-max normalised to [0, 1]
    order = rows.abs().argsort(dim=1)
    steps = torch.arange(rows.shape[1], device=rows.device, dtype=delta.dtype).expand_as(rows)
    ranks = torch.empty_like(rows).scatter_(1, order, steps)
    r = (ranks / (rows.shape[1] - 1)).clamp(0, 1) if rows.shape[1] > 1 else torch.zeros_like(rows)
    keep = (density - epsilon) + r * 2 * epsilon
    mask = torch.bernoulli(keep, generator=generator).to(delta.dtype)
    out = l1_rescale(rows, mask) if rescale else rows * mask
    return out.reshape(shape)


def check_della(density: float, epsilon: float, where: str = "della") -> None:
    if not 0.0 < density <= 1.0:
        raise WeightsmithError(f"{where} option density={density}: the kept fraction must be in (0, 1]")
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise WeightsmithError(
            f"{where} options density={density}, epsilon={epsilon}: density +/- epsilon must lie in (0, 1)"
        )


def della(
    base: Tensor,
    thetas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    rescale: bool,
    scaling: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA of one tensor; the masks of the models are drawn in order from one ``generator``."""
    b, deltas = stack_deltas(base, thetas)
    if len(thetas) == 0:
        return b
    pruned = torch.stack(
        [magprune(d, p, e, rescale, generator) for d, p, e in zip(deltas, densities, epsilons, strict=True)]
    )
    return combine(b, pruned, weights, elect=elect, normalize=normalize, scaling=scaling)


@dataclass(frozen=True)
class _DellaBase(OnBaseMethod):
    density: float = 1.0
    epsilon: float = 0.15
    scaling: float = 1.0
    seed: int = 0

    random = True
    elect = True

    def __post_init__(self) -> None:
        check_della(self.density, self.epsilon, self.name)

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        n = len(thetas)
        return della(
            base,
            thetas,
            weights,
            [self.density] * n,
            [self.epsilon] * n,
            elect=self.elect,
            normalize=self.normalize,  # type: ignore[attr-defined]
            rescale=self.rescale,  # type: ignore[attr-defined]
            scaling=self.scaling,
            generator=gen,
        )


@register_config("della", kind="merge")
class DELLA(_DellaBase):
    """DELLA with TIES sign election; mergekit defaults: normalize and rescale on."""

    normalize: bool = True
    rescale: bool = True


@register_config("della_linear", kind="merge")
class DELLALinear(_DellaBase):
    """DELLA without sign election (a weighted task-vector sum); mergekit defaults: rescale on."""

    normalize: bool = False
    rescale: bool = True

    elect = False
