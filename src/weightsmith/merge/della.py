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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, PiecewiseOnBaseMethod, combine, match_l1, task_vectors, work_dtype

PRUNE_BLOCK = 1 << 20  # elements per block of MagPrune on CPU


def magnitude_ranks(rows: Tensor) -> Tensor:
    """The rank of each entry's magnitude within its row of ``rows`` ([rows, n, ...], ranked along dim
    1): ``order[:, k]`` is the index of the entry of rank k (0 = smallest ``|x|``). Equal magnitudes are
    ranked by position (a stable order), so the ranks are well defined whatever sort runs them.

    On the CPU (2-D float32 rows) the key of entry j is the int64 ``bits(|x_j|) << 32 | j``: the bit
    pattern of a non-negative float orders like its value, and the position makes every key distinct, so
    sorting the keys alone (numpy's vectorised sort, in place: several times faster than an argsort that
    carries the indices along) gives the stable order, and the low 32 bits of each sorted key are its
    entry's index."""
    mags = rows.abs()
    if rows.device.type != "cpu" or rows.dim() != 2 or rows.dtype != torch.float32:
        return mags.argsort(dim=1, stable=True)
    key = mags.view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    key.bitwise_or_(torch.arange(rows.shape[1], dtype=torch.int64))
    key.numpy().sort(axis=1)  # in place: the keys are a fresh buffer
    return key.bitwise_and_(0xFFFFFFFF)


def magprune(
    delta: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None = None
) -> Tensor:
    """DELLA's magnitude-ranked random drop of one task vector (rows of a matrix; a vector is one row),
    **in place**: ``delta`` is overwritten with the pruned (and rescaled) vector and returned, so a merge
    holds no second copy of its task vectors (pass a copy to keep one). The mask is drawn from
    ``generator`` as one ``torch.bernoulli`` draw over the keep probabilities would draw it (on the CPU
    as ``torch.rand(...) < p``: the same uniforms in the same order, which is how the CPU bernoulli
    draws, without its per-element checks)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    before = rows.abs().sum() if rescale else None  # the L1 norm the survivors are rescaled to
    # rank of each entry within its row (0 = smallest |x|), min-max normalised to [0, 1]: the keep
    # probability of rank k is computed once per row length and scattered through the sorting
    # permutation (its inverse, in O(n), rather than a second argsort)
    n = rows.shape[1]
    steps = torch.arange(n, device=rows.device, dtype=delta.dtype)
    r = (steps / (n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(steps)
    by_rank = ((density - epsilon) + r * 2 * epsilon).reshape(1, n, *([1] * (rows.dim() - 2)))
    # blocks of rows in memory order: the sort's int64 indices, the probabilities and the mask are the
    # size of a block, and one generator draws the block masks in the order of one whole-tensor draw
    row = math.prod(rows.shape[1:])
    cpu = rows.device.type == "cpu"
    per = max(1, PRUNE_BLOCK // max(1, row)) if cpu else rows.shape[0]
    for i in range(0, rows.shape[0], per):
        block = rows[i : i + per]
        keep = torch.empty_like(block).scatter_(1, magnitude_ranks(block), by_rank.expand_as(block))
        if cpu and block.is_contiguous():  # uniforms in memory order, as bernoulli's
            block.mul_(
                torch.lt(torch.rand(block.shape, generator=generator, dtype=keep.dtype), keep, out=keep)
            )
        else:
            block.mul_(torch.bernoulli(keep, generator=generator).to(delta.dtype))
    if before is not None:
        match_l1(rows, before)
    return delta


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
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DELLA of one tensor; the masks of the models are drawn in order from one ``generator``. In
    float32 (float64 for float64 inputs), or rounded to ``out_dtype`` piece by piece; the base is never
    widened whole (each piece is, exactly), so a bf16 merge holds no float32 copy of the base or result."""
    if len(thetas) == 0:
        return base.to(out_dtype or work_dtype(base))
    deltas = task_vectors(base, thetas)
    for d, p, e in zip(deltas, densities, epsilons, strict=True):
        magprune(d, p, e, rescale, generator)  # in place: the stack becomes the pruned task vectors
    out = combine(
        base, deltas, weights, elect=elect, normalize=normalize, scaling=scaling, out_dtype=out_dtype
    )
    return out if out_dtype is not None else out.to(work_dtype(base))


@dataclass(frozen=True)
class _DellaBase(PiecewiseOnBaseMethod):
    density: float = 1.0
    epsilon: float = 0.15
    scaling: float = 1.0
    seed: int = 0

    random = True
    elect = True

    def __post_init__(self) -> None:
        check_della(self.density, self.epsilon, self.name)

    def merge_on_as(
        self,
        base: Tensor,
        thetas: Sequence[Tensor],
        weights: list[float],
        gen: Gen,
        dtype: torch.dtype | None,
    ) -> Tensor:
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
            out_dtype=dtype,
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
