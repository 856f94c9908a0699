"""DSnoT: training-free prune-and-grow on top of another pruner's mask.

Zhang, Zhao, Lin, Lu, Yang, Ji & Liu, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs", ICLR 2024. Pruning row ``i`` of a layer moves its expected output by the reconstruction error

    e_i = Σ_j (W_ij − Ŵ_ij) · E[x_j]                                          (eq. 3)

DSnoT then repeats, per row, one swap that keeps the row's sparsity: **grow** the pruned weight ``j`` whose
contribution ``W_ij E[x_j]`` has the sign of ``e_i`` (reviving it cancels part of the error), ranked by
``sign(e_i) W_ij E[x_j] / Var(x_j)^γ`` (eq. 5; a high-variance input makes the expectation a poor proxy),
and **prune** the kept weight with the smallest Wanda score ``|Ŵ_ik| ‖X_k‖₂`` among those whose removal
does not push the error further out (eq. 6); for N:M it is taken from the grown weight's group of M. A
swap is accepted only if it lowers ``|e_i|``; a row stops when ``|e_i|`` is below ``threshold``, when the
sign of ``e_i`` flips, or after ``max_cycles`` swaps. No gradient and no weight update beyond the swaps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats
from ._sparse import Refiner, SparseWeight


def dsnot(
    W: Tensor,
    init: SparseWeight,
    mean: Tensor,
    var: Tensor,
    norms: Tensor,
    max_cycles: int = 50,
    threshold: float = 0.1,
    pow_var: float = 1.0,
) -> tuple[SparseWeight, int]:
    """Prune-and-grow on ``init`` (a pruning of the dense ``W`` [out, in]); returns it and the swap count.

    ``mean``, ``var``, ``norms``: per-input-channel E[x], Var(x) and ‖X_j‖₂ of the layer's inputs.
    """
    W = W.float()
    keep, What = init.mask.clone(), init.W.float().clone()
    mu, nrm = mean.to(W).unsqueeze(0), norms.to(W).unsqueeze(0)
    grow_rank = 1.0 / var.to(W).clamp_min(1e-12).pow(pow_var).unsqueeze(0)
    out_f, in_f = W.shape
    rows = torch.arange(out_f, device=W.device)
    group = torch.arange(in_f, device=W.device) // (init.m or in_f)
    contrib = W * mu  # W_ij E[x_j]
    e = ((W - What) * mu).sum(1)
    active = e.abs() > threshold
    swaps = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        s = torch.sign(e).unsqueeze(1)
        gm = torch.where(~keep & (contrib * s > 0), contrib * s * grow_rank, -torch.inf)
        gval, j = gm.max(1)
        same = group.unsqueeze(0) == group[j].unsqueeze(1)
        pm = torch.where(keep & same & (What * mu * s <= 0), What.abs() * nrm, torch.inf)
        pval, k = pm.min(1)
        e_new = e - contrib[rows, j] + What[rows, k] * mu[0, k]
        ok = active & torch.isfinite(gval) & torch.isfinite(pval) & (e_new.abs() < e.abs())
        r = rows[ok]
        keep[r, j[ok]], What[r, j[ok]] = True, W[r, j[ok]]
        keep[r, k[ok]], What[r, k[ok]] = False, 0.0
        flipped = torch.sign(e_new) != torch.sign(e)
        e = torch.where(ok, e_new, e)
        swaps += int(ok.sum())
        active = ok & ~flipped & (e.abs() > threshold)
    return SparseWeight(What, keep, init.n, init.m), swaps


@register_config("dsnot", kind="compress")
class DSnoT(Refiner):
    """DSnoT on an ``init`` mask (wanda, magnitude, sparsegpt); ``max_cycles``, ``threshold``, ``pow_var``."""

    max_cycles: int = 50
    threshold: float = 0.1
    pow_var: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_cycles < 0 or self.threshold < 0:
            raise WeightsmithError("dsnot options max_cycles and threshold must be >= 0")

    def prune(self, W: Tensor, stats: InputStats | None) -> SparseWeight:
        if stats is None:
            raise WeightsmithError("dsnot needs calibration statistics (pass calib=)")
        init = self.base().prune(W, stats)
        mean = stats.mean()
        var = stats.norms().square() / stats.n - mean.square()
        out, _ = dsnot(W, init, mean, var, stats.norms(), self.max_cycles, self.threshold, self.pow_var)
        return out
