"""SparseGPT: one-shot pruning with second-order reconstruction of the kept weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023.
For the layer-wise loss ``‖WX − ŴX‖²`` with Hessian ``H = 2XXᵀ``, removing weight ``w_c`` of a row and
updating the row's not-yet-processed weights optimally (Optimal Brain Surgeon) costs and moves

    ε_c = w_c² / [H⁻¹]_cc²      (with the Cholesky-form rows of H⁻¹, Sec. 3.2)
    δ = − w_c / [H⁻¹]_cc · H⁻¹_{c,:}                                          (Alg. 1)

The columns are processed left to right with the rows of ``H⁻¹`` read from the upper Cholesky factor of the
damped inverse (the same factor GPTQ uses, :func:`~weightsmith.compress.gptq.inverse_hessian_factor`); the
mask of each block of ``block_size`` columns is chosen adaptively when the block starts, by the lowest
``ε`` over the block (unstructured), or by the lowest ``M − N`` of each run of ``M`` columns (N:M); updates
to columns after the block are applied once per block (lazy batch updates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, StatsSpec
from ._sparse import PruneConfig, SparseWeight, check_nm, nm_mask, unstructured_mask
from .gptq import inverse_hessian_factor


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    damp: float = 0.01,
    block_size: int = 128,
) -> SparseWeight:
    """SparseGPT on one ``[out, in]`` weight with Hessian ``H`` [in, in] (N:M when ``m`` > 0)."""
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    check_nm(n, m, "sparsegpt", in_f)
    if m:
        block_size = max(m, block_size - block_size % m)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.empty_like(W1)
        if not m:
            keep[:, i1:i2] = unstructured_mask(W1.square() / d.square(), sparsity, "layer")
        for i in range(i2 - i1):
            if m and i % m == 0:
                keep[:, i1 + i : i1 + i + m] = nm_mask(
                    W1[:, i : i + m].square() / d[i : i + m].square(), n, m
                )
            w = W1[:, i]
            q = torch.where(keep[:, i1 + i], w, torch.zeros_like(w))
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return SparseWeight(W * keep, keep, n, m)


@register_config("sparsegpt", kind="compress")
class SparseGPT(PruneConfig):
    """SparseGPT (``sparsity`` or ``n:m``; ``damp``: fraction of mean diag H added; ``block_size``)."""

    calibrated = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise WeightsmithError(f"sparsegpt option damp={self.damp}: must be > 0")
        if self.block_size < 1:
            raise WeightsmithError(f"sparsegpt option block_size={self.block_size}: must be >= 1")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=True, channels=False)

    def prune(self, W: Tensor, stats: InputStats | None) -> SparseWeight:
        if stats is None:
            raise WeightsmithError("sparsegpt needs calibration statistics (pass calib=)")
        H = stats.hessian().to(W.device)
        return sparsegpt_prune(W, H, self.sparsity, self.n, self.m, self.damp, self.block_size)
