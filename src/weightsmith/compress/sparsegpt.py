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

Speed. Everything above depends on ``W`` only row by row (the unstructured mask is chosen over each layer's
rows of a block, the N:M mask row by row), and on ``H`` alone otherwise, so (1) layers with the same Hessian
(q/k/v, gate/up) are pruned in one pass over their stacked rows, with each layer's own mask selection: the
same weights as layer by layer, with one inverse factor for the set; (2) on CUDA each block's column steps
run as one Triton kernel (:mod:`._sparsegpt_kernel`, the eager loop's arithmetic) instead of about eight
small kernels per column; the lazy update of the later columns stays one matrix product per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ..linalg import on_device
from ._core import Compressed
from ._sparse import PruneConfig, SparseWeight, check_nm, nm_mask, unstructured_mask
from .gptq import inverse_hessian_factor, stacked_passes, triton_available, use_fused

# one block's column steps: (W1, U1, keep1, Err1, n, m), W1 / keep1 updated in place, Err1 written
Steps = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], None]


def _eager_steps(W1: Tensor, U1: Tensor, keep1: Tensor, Err1: Tensor, n: int, m: int) -> None:
    """The block's columns one after another (Algorithm 1): the reference. It runs on a transposed copy of
    the block (each weight column a contiguous row; the same elementwise operations in the same order, so
    the same bits) and copies back at the end."""
    d = U1.diagonal()
    WT, ET = W1.T.contiguous(), torch.empty_like(Err1.T)
    for i in range(WT.shape[0]):
        if m and i % m == 0:
            keep1[:, i : i + m] = nm_mask(WT[i : i + m].T.square() / d[i : i + m].square(), n, m)
        w = WT[i]
        q = torch.where(keep1[:, i], w, torch.zeros_like(w))
        err = torch.sub(w, q, out=ET[i]).div_(d[i])
        WT[i:].sub_(U1[i, i:].unsqueeze(1) * err.unsqueeze(0))
        WT[i] = q
    W1.copy_(WT.T)
    Err1.copy_(ET.T)


def _fused_steps(W1: Tensor, U1: Tensor, keep1: Tensor, Err1: Tensor, n: int, m: int) -> None:
    """The same columns in one Triton launch (:func:`._sparsegpt_kernel.run_block`)."""
    from ._sparsegpt_kernel import run_block

    with on_device(W1):
        run_block(W1, U1.contiguous(), keep1.view(torch.uint8), Err1, n, m)


def _block_steps(W: Tensor, fused: bool | None) -> Steps:
    return _fused_steps if use_fused(W, fused, "sparsegpt", triton_available) else _eager_steps


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    damp: float = 0.01,
    block_size: int = 128,
    rows: Sequence[int] | None = None,
    fused: bool | None = False,
) -> SparseWeight:
    """SparseGPT on one ``[out, in]`` weight with Hessian ``H`` [in, in] (N:M when ``m`` > 0).

    ``rows``: the weight is several layers' rows stacked (sizes in order): the unstructured mask of a block
    is chosen within each layer's rows, as if each were pruned alone. ``fused``: run each block's column
    steps as one Triton kernel (:mod:`._sparsegpt_kernel`) instead of the eager loop; None picks it for a
    CUDA weight when Triton is installed."""
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    check_nm(n, m, "sparsegpt", in_f)
    sizes = list(rows) if rows else [out_f]
    if sum(sizes) != out_f:
        raise WeightsmithError(f"sparsegpt: row sizes {sizes} do not add up to the weight's {out_f} rows")
    if m:
        block_size = max(m, block_size - block_size % m)
    steps = _block_steps(W, fused)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        if not m:
            score = W1.square() / U1.diagonal().square()
            keep[:, i1:i2] = torch.cat([unstructured_mask(s, sparsity, "layer") for s in score.split(sizes)])
        steps(W1, U1, keep[:, i1:i2], Err1, n, m)
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return SparseWeight(W * keep, keep, n, m)


@register_config("sparsegpt", kind="compress")
class SparseGPT(PruneConfig):
    """SparseGPT (``sparsity`` or ``n:m``; ``damp``: fraction of mean diag H added; ``block_size``;
    ``fused``: on CUDA with Triton installed, each block's column steps in one kernel; false: the eager loop).

    The layers of a block that read the same input (q/k/v, gate/up) have the same Hessian and so the same
    inverse factor; their rows are stacked and pruned in one pass (each layer's mask chosen among its own
    rows): the same weights as layer by layer, with a third fewer passes on a Llama block."""

    calibrated = True
    damp: float = 0.01
    block_size: int = 128
    fused: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise WeightsmithError(f"sparsegpt option damp={self.damp}: must be > 0")
        if self.block_size < 1:
            raise WeightsmithError(f"sparsegpt option block_size={self.block_size}: must be >= 1")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=True, channels=False)

    def _prune_rows(self, W: Tensor, stats: InputStats | None, rows: Sequence[int] | None) -> SparseWeight:
        if stats is None:
            raise WeightsmithError("sparsegpt needs calibration statistics (pass calib=)")
        H = stats.hessian().to(W.device)
        fused = None if self.fused else False
        return sparsegpt_prune(W, H, self.sparsity, self.n, self.m, self.damp, self.block_size, rows, fused)

    def prune(self, W: Tensor, stats: InputStats | None) -> SparseWeight:
        return self._prune_rows(W, stats, None)

    def compress_block(
        self, block: nn.Module | None, layers: Sequence[Layer], stats: dict[str, InputStats] | None
    ) -> dict[str, Compressed]:
        """Prune each set of layers with one Hessian in one pass over their stacked rows."""
        if stats is None:
            raise WeightsmithError("sparsegpt needs calibration statistics (pass calib=)")

        def run(W: Tensor, st: InputStats, sizes: list[int]) -> list[SparseWeight]:
            sw = self._prune_rows(W, st, sizes)
            parts = zip(sw.W.split(sizes), sw.mask.split(sizes), strict=True)
            return [SparseWeight(w.clone(), keep.clone(), self.n, self.m) for w, keep in parts]

        return stacked_passes("sparsegpt", layers, stats, run)
