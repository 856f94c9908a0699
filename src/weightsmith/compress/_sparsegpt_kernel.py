"""One Triton kernel for SparseGPT's sequential column steps inside a block of columns.

SparseGPT ("SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", Frantar & Alistarh,
ICML 2023, Algorithm 1) prunes the columns of a block one after another: for column ``i`` with
``U = chol((H + λI)⁻¹)ᵀ`` (upper) and the keep-mask ``M``,

    q_i = M_i ⊙ w_i,   e_i = (w_i − q_i) / U_ii,   W[:, i:] ← W[:, i:] − e_i U_{i, i:},   w_i ← q_i

For N:M the mask of each run of ``M`` columns is chosen when the run comes up, from the updated weights:
the ``N`` highest ``w² / U_jj²`` of the run in each row. Every row runs the same steps with the same ``U``
and no row reads another, so one program holds a tile of ``BLOCK_R`` rows × the block's columns in
registers and runs all the steps of a block in one launch (the eager loop launches about eight small
kernels per column). The update of the later columns, ``W[:, i2:] −= E U[i1:i2, i2:]``, stays a matrix
product outside.

The arithmetic is the eager loop's, operation for operation, in float32: IEEE division (``div_rn``) and no
fused multiply-add (the caller launches with ``enable_fp_fusion=False``). The N:M choice ranks the ``M``
scores of a run, ties going to the lower column (``torch.topk``, used by the eager loop, leaves ties
unspecified: the two agree wherever scores differ).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 16
NUM_WARPS = 4


@triton.jit(do_not_specialize=["R", "width", "n", "m", "stride_w", "stride_u", "stride_uc", "stride_k",
                               "stride_e"])  # fmt: skip
def sparsegpt_block_kernel(  # type: ignore[no-untyped-def]
    w_ptr,  # the block's tile [R, width], row stride stride_w; updated in place
    u_ptr,  # U[i1:i2, i1:i2], strides stride_u, stride_uc
    k_ptr,  # uint8 keep-mask [R, width], row stride stride_k: read (unstructured) or written (N:M)
    e_ptr,  # scaled errors out, [R, width], row stride stride_e
    R,
    width,
    n,
    m,
    stride_w,
    stride_u,
    stride_uc,
    stride_k,
    stride_e,
    NM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < width
    tile_mask = rmask[:, None] & cmask[None, :]
    tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0.0)
    keep = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=tile_mask, other=0).to(tl.int32)
    d = tl.load(u_ptr + cols * stride_u + cols * stride_uc, mask=cmask, other=1.0)
    dd = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32) + (d * d)[None, :]
    for i in range(0, width):
        if NM:  # noqa: SIM102 (a constexpr branch; the inner test runs on the device)
            if i % m == 0:
                score = tl.math.div_rn(tile * tile, dd)
                rank = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
                for k in range(0, m):
                    sk = tl.sum(tl.where(cols[None, :] == i + k, score, 0.0), axis=1)
                    ahead = (sk[:, None] > score) | ((sk[:, None] == score) & (cols[None, :] > i + k))
                    rank += ahead.to(tl.int32)
                run = (cols >= i) & (cols < i + m)
                keep = tl.where(run[None, :], (rank < n).to(tl.int32), keep)
        w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
        kept = tl.sum(tl.where(cols[None, :] == i, keep, 0), axis=1)
        q = tl.where(kept > 0, w, 0.0)
        diag = tl.zeros([BLOCK_R], dtype=tl.float32) + tl.load(u_ptr + i * stride_u + i * stride_uc)
        err = tl.math.div_rn(w - q, diag)
        u = tl.load(u_ptr + i * stride_u + cols * stride_uc, mask=cmask & (cols >= i), other=0.0)
        tile = tl.where(cols[None, :] >= i, tile - err[:, None] * u[None, :], tile)
        tile = tl.where(cols[None, :] == i, q[:, None], tile)
        tl.store(e_ptr + rows * stride_e + i, err, mask=rmask)
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], tile, mask=tile_mask)
    if NM:
        tl.store(k_ptr + rows[:, None] * stride_k + cols[None, :], keep.to(tl.uint8), mask=tile_mask)


def run_block(W1: Tensor, U1: Tensor, keep1: Tensor, E1: Tensor, n: int, m: int) -> None:
    """Run SparseGPT's column steps of one block in one launch (see the module docstring).

    ``W1`` [R, width] float32 (updated in place), ``U1`` [width, width], ``keep1`` [R, width] uint8 (the
    block's mask; written when ``m`` > 0), ``E1`` [R, width] (the scaled errors, written); one device, unit
    column stride except for ``U1``."""
    R, width = W1.shape
    grid = (triton.cdiv(R, BLOCK_ROWS),)
    sparsegpt_block_kernel[grid](
        W1, U1, keep1, E1, R, width, n, max(m, 1),
        W1.stride(0), U1.stride(0), U1.stride(1), keep1.stride(0), E1.stride(0),
        NM=m > 0, BLOCK_R=BLOCK_ROWS, BLOCK_C=triton.next_power_of_2(width), num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )  # fmt: skip
