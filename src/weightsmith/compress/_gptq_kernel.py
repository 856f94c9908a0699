"""One Triton kernel for GPTQ's sequential column steps inside a block of columns.

GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", Frantar,
Ashkboos, Hoefler & Alistarh, ICLR 2023, Algorithm 1) quantises the columns of a block one after another:
for column ``i`` with ``U = chol((H + λI)⁻¹)ᵀ`` (upper),

    q_i = clamp(round(w_i / s + z), 0, 2^b − 1),   e_i = (w_i − s (q_i − z)) / U_ii,
    W[:, i:] ← W[:, i:] − e_i U_{i, i:}                                          (Algorithm 1, lines 5-8)

Every row of ``W`` runs the same steps with the same ``U`` and no row reads another, so one program holds a
tile of ``BLOCK_R`` rows × the block's columns in registers and runs all the steps of a block in one launch
(the eager loop launches about ten small kernels per column). The trailing update of the later columns,
``W[:, i2:] −= E U[i1:i2, i2:]``, stays a matrix product outside.

The arithmetic is the eager loop's, operation for operation, in float32: IEEE division (``div_rn``, not
Triton's approximate ``/``), round half to even, and no fused multiply-add (the caller launches with
``enable_fp_fusion=False``), so the codes equal the eager loop's bit for bit. Group scales and zero points are
given (``scale``/``zero`` [rows, groups], ``gidx``: the group of each of the block's columns); the caller
computes a dynamic group's grid at the group's first column and launches the kernel per segment of columns
that share known grids (``a`` to ``b``), writing the updated tile back between segments.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

# rows per program and warps: an [8, 128] float32 tile in one warp (32 registers a thread); a block's passes
# (a 1.1B Llama's q/k/v, o, gate/up, down) took 5.9 + 5.9 + 8.1 + 24.1 ms on an H200 against 8.0 + 6.8 +
# 17.8 + 27.4 ms at 16 rows and 4 warps (benchmarks/gptq_kernel_tune.py, 2026-12-01); the codes do not depend
# on it (each row's steps are its own)
BLOCK_ROWS = 8
NUM_WARPS = 1


@triton.jit
def _rint(x):  # type: ignore[no-untyped-def]
    """Round half to even, exactly: adding and removing 2^23 leaves the nearest integer (|x| < 2^23)."""
    a = tl.abs(x)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)
    return tl.where(x < 0, -r, r)


# the integer arguments change from layer to layer and block to block: one compilation serves them all
@triton.jit(do_not_specialize=["R", "width", "a", "b", "stride_w", "stride_u", "stride_uc", "stride_s",
                               "stride_q", "stride_e"])  # fmt: skip
def gptq_block_kernel(  # type: ignore[no-untyped-def]
    w_ptr,  # the block's tile [R, width], row stride stride_w; updated in place
    u_ptr,  # U[i1:i2, i1:i2], strides stride_u, stride_uc
    scale_ptr,  # [R, groups], row stride stride_s
    zero_ptr,
    gidx_ptr,  # int32 [width]: the group of each of the block's columns
    q_ptr,  # codes out (float32), [R, width], row stride stride_q
    e_ptr,  # scaled errors out, [R, width], row stride stride_e
    R,
    width,
    a,
    b,
    stride_w,
    stride_u,
    stride_uc,
    stride_s,
    stride_q,
    stride_e,
    qmax,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # R x stride may pass 2^31
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < width
    tile_mask = rmask[:, None] & cmask[None, :]
    tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0.0)
    for i in range(a, b):
        w = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
        g = tl.load(gidx_ptr + i)
        s = tl.load(scale_ptr + rows * stride_s + g, mask=rmask, other=1.0)
        z = tl.load(zero_ptr + rows * stride_s + g, mask=rmask, other=0.0)
        q = _rint(tl.math.div_rn(w, s) + z)
        q = tl.minimum(tl.maximum(q, 0.0), qmax)
        wq = (q - z) * s
        diag = tl.zeros([BLOCK_R], dtype=tl.float32) + tl.load(u_ptr + i * stride_u + i * stride_uc)
        err = tl.math.div_rn(w - wq, diag)  # div_rn does not broadcast
        u = tl.load(u_ptr + i * stride_u + cols * stride_uc, mask=cmask & (cols >= i), other=0.0)
        tile = tl.where(cols[None, :] >= i, tile - err[:, None] * u[None, :], tile)
        tl.store(q_ptr + rows * stride_q + i, q, mask=rmask)
        tl.store(e_ptr + rows * stride_e + i, err, mask=rmask)
    keep = tile_mask & (cols[None, :] >= a)
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], tile, mask=keep)


def run_block(
    W1: Tensor,
    U1: Tensor,
    scale: Tensor,
    zero: Tensor,
    gidx: Tensor,
    Q1: Tensor,
    E1: Tensor,
    cols: tuple[int, int],
    bits: int,
    block_rows: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Run GPTQ's column steps ``cols = (a, b)`` of one block in one launch (see the module docstring).

    ``W1`` [R, width] (updated in place), ``U1`` [width, width], ``scale``/``zero`` [R, groups], ``gidx``
    int32 [width], ``Q1``/``E1`` [R, width] (written for columns ``a`` to ``b``); float32, one device, unit
    column stride except for ``U1`` (contiguous rows read fastest)."""
    R, width = W1.shape
    a, b = cols
    block_rows = block_rows or BLOCK_ROWS
    grid = (triton.cdiv(R, block_rows),)
    gptq_block_kernel[grid](
        W1, U1, scale, zero, gidx, Q1, E1, R, width, a, b,
        W1.stride(0), U1.stride(0), U1.stride(1), scale.stride(0), Q1.stride(0), E1.stride(0),
        float((1 << bits) - 1),
        BLOCK_R=block_rows, BLOCK_C=triton.next_power_of_2(width), num_warps=num_warps or NUM_WARPS,
        enable_fp_fusion=False,
    )  # fmt: skip
