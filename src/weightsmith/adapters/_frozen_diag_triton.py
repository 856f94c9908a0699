"""LoLDU's coefficients inside the weight path's own passes (CUDA with Triton, or Triton's interpreter).

LoLDU (Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", 2024) updates ``ΔW = L diag(c) R`` with ``c = σ z + m0`` (``m0 = -σ0 z0`` frozen). The weight
path (:class:`~weightsmith.adapters.frozen_a._FrozenDiagWeight`) scales the narrower factor ``F`` (``L`` by
columns or ``R`` by rows) and takes ``∂c`` as the row or column sums of ``T ⊙ F`` (``T`` the last product
of its backward, the same shape). With torch ops LoLDU pays SVFit's passes plus the small kernels of its
coefficients: ``addcmul`` for ``c``, and ``∂z = σ ∂c``, ``∂σ = z · ∂c`` after the sums. Here

- :func:`scale` writes ``F ⊙ (σ z + m0)`` in the compute dtype in one pass (``c`` formed per tile, never
  stored): one kernel where SVFit launches two (``σ - σ_r``, then the scaling);
- :func:`diag_grad` reads ``T`` and ``F`` once (no ``T ⊙ F`` written), one float32 (float64 for float64
  parameters) partial sum per tile of rows and column, then one single-program kernel adds the partials,
  writes ``∂z = σ s`` and ``∂σ = Σ_i z_i s_i``: two kernels where SVFit launches ``mul_`` and ``sum``.

No atomics (deterministic), no host read, grids from shapes only (capture-safe). Sums take the exact
products (the torch path rounds ``T ⊙ F`` to the parameters' dtype first): equal to rounding.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from ..linalg import on_device

try:  # imported on the first CUDA (or interpreted) call only: importing Triton costs ~0.15 s
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI has no triton
    triton = None

BLOCK = 64  # rows and columns of a tile
PROGRAMS = 512  # partial-sum programs aimed at (an H200 has 132 SMs)
FINISH_BLOCK = 256  # columns the finishing program takes at a time
NUM_WARPS = 4
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _scale_kernel(  # type: ignore[no-untyped-def]
    F,
    Z,
    SIG,
    M0,
    OUT,
    rows,
    cols,
    s_r,
    s_c,
    BY_COL: tl.constexpr,
    ACC: tl.constexpr,
    NARROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mr, mc = r < rows, c < cols
    m = mr[:, None] & mc[None, :]
    r64, c64 = r[:, None].to(tl.int64), c[None, :].to(tl.int64)  # offsets past 2³¹ entries
    f = tl.load(F + r64 * s_r + c64 * s_c, mask=m, other=0.0).to(ACC)
    sig = tl.load(SIG).to(ACC)
    if BY_COL:
        coef = tl.load(Z + c, mask=mc, other=0.0).to(ACC) * sig + tl.load(M0 + c, mask=mc, other=0.0).to(ACC)
        v = f * coef[None, :]
    else:
        coef = tl.load(Z + r, mask=mr, other=0.0).to(ACC) * sig + tl.load(M0 + r, mask=mr, other=0.0).to(ACC)
        v = f * coef[:, None]
    if NARROW:  # a 16-bit output from float32 (as torch rounds a float64 product: through float32)
        v = v.to(tl.float32)
    tl.store(OUT + r64 * cols + c64, v.to(OUT.dtype.element_ty), mask=m)


def _partials_kernel(A, B, P, rows, cols, per, s_ar, s_ac, s_br, s_bc, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mc = c < cols
    c64 = c[None, :].to(tl.int64)
    acc_t = P.dtype.element_ty
    acc = tl.zeros([BLOCK, BLOCK], dtype=acc_t)
    start = tl.program_id(1) * per
    for r0 in range(start, start + per, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        m = (r < rows)[:, None] & mc[None, :]
        r64 = r[:, None].to(tl.int64)
        a = tl.load(A + r64 * s_ar + c64 * s_ac, mask=m, other=0.0).to(acc_t)
        b = tl.load(B + r64 * s_br + c64 * s_bc, mask=m, other=0.0).to(acc_t)
        acc += a * b
    tl.store(P + tl.program_id(1) * cols + c, tl.sum(acc, axis=0), mask=mc)


def _finish_kernel(P, Z, SIG, DZ, DSIG, cols, splits, SPLITS: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    acc_t = P.dtype.element_ty
    sp = tl.arange(0, SPLITS)
    sig = tl.load(SIG).to(acc_t)
    total = tl.zeros([BLOCK], dtype=acc_t)
    for c0 in range(0, cols, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        mc = c < cols
        p = tl.load(P + sp[:, None] * cols + c[None, :], mask=(sp < splits)[:, None] & mc[None, :], other=0.0)
        s = tl.sum(p, axis=0)
        tl.store(DZ + c, (s * sig).to(DZ.dtype.element_ty), mask=mc)
        total += s * tl.load(Z + c, mask=mc, other=0.0).to(acc_t)
    tl.store(DSIG, tl.sum(total, axis=0).to(DSIG.dtype.element_ty))


@functools.cache
def _kernels() -> dict[str, Any]:
    return {
        "scale": triton.jit(_scale_kernel),
        "partials": triton.jit(_partials_kernel, do_not_specialize=["rows", "per"]),
        "finish": triton.jit(_finish_kernel),
    }


def _launch(name: str, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any) -> None:
    """One kernel launch on ``device`` (tests replace this to count launches on fake tensors)."""
    with on_device(device):
        _kernels()[name][grid](*args, num_warps=NUM_WARPS, **meta)


def usable(*tensors: Tensor) -> bool:
    """Whether these run here: Triton present, not inside ``torch.compile`` (it fuses the torch ops itself),
    plain tensors (no fake or functional ones) of the supported dtypes, on CUDA (on the CPU only under
    ``TRITON_INTERPRET=1``)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (
        triton is not None
        and not torch.compiler.is_compiling()
        and all(
            type(t) in (Tensor, torch.nn.Parameter)
            and t.dtype in DTYPES
            and (t.is_cuda or (interpreted and t.device.type == "cpu"))
            for t in tensors
        )
    )


def scale(F: Tensor, z: Tensor, sigma: Tensor, m0: Tensor, by_col: bool, dtype: torch.dtype) -> Tensor:
    """``F ⊙ (σ z + m0)`` in ``dtype``: ``F`` [rows, cols] scaled by columns (``by_col``, ``z`` [cols]) or
    rows (``z`` [rows]); ``σ`` 0-dim, ``z``, ``m0`` contiguous in the parameters' dtype. One kernel."""
    rows, cols = F.shape
    out = torch.empty((rows, cols), dtype=dtype, device=F.device)
    grid = (-(-rows // BLOCK), -(-cols // BLOCK))
    acc = tl.float64 if z.dtype == torch.float64 else tl.float32  # as torch computes a 16/32-bit product
    meta = dict(BY_COL=by_col, ACC=acc, NARROW=out.element_size() < 4, BLOCK=BLOCK)
    _launch("scale", grid, F.device, F, z, sigma, m0, out, rows, cols, *F.stride(), **meta)
    return out


def split_rows(rows: int, cols: int) -> tuple[int, int]:
    """``(per, splits)``: rows a partial-sum program takes (a multiple of :data:`BLOCK`) and how many
    programs split the rows, about :data:`PROGRAMS` in all with the column blocks; from the shapes only."""
    col_blocks, row_blocks = -(-cols // BLOCK), max(-(-rows // BLOCK), 1)
    want = max(1, min(row_blocks, PROGRAMS // col_blocks))
    per = -(-row_blocks // want) * BLOCK
    return per, -(-max(rows, 1) // per)


def diag_grad(A: Tensor, B: Tensor, z: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(∂z, ∂σ) = (σ s, z · s)`` with ``s = Σ_rows A ⊙ B`` (``A``, ``B`` [rows, k] any strides: pass
    transposed views for row sums); in ``z``'s and ``σ``'s dtypes. Two kernels, no ``A ⊙ B`` written."""
    rows, cols = A.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    per, splits = split_rows(rows, cols)
    part = torch.empty((splits, cols), dtype=acc, device=A.device)
    grid = (-(-cols // BLOCK), splits)
    _launch("partials", grid, A.device, A, B, part, rows, cols, per, *A.stride(), *B.stride(), BLOCK=BLOCK)
    dz = torch.empty(cols, dtype=z.dtype, device=z.device)
    dsigma = torch.empty((), dtype=sigma.dtype, device=sigma.device)
    meta = dict(SPLITS=max(triton.next_power_of_2(splits), 1) if triton else 1, BLOCK=FINISH_BLOCK)
    _launch("finish", (1,), A.device, part, z, sigma, dz, dsigma, cols, splits, **meta)
    return dz, dsigma
