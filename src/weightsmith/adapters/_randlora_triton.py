"""RandLoRA's two elementwise steps fused into one Triton kernel each (issue 14).

RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025)
scales its shared bases per layer, ``Af = Λ (s A) Γ`` stacked over the ``n`` bases (row ``i r + k`` of
``Af`` is ``λ_ik (s A)_k ⊙ γ_i``), and reduces ``∂Af`` to the scalings' gradients:

    P_i = ∂Af_i ⊙ (s A),   ∂λ_i = P_i γ_i,   ∂γ_i = λ_iᵀ P_i

In torch that is two passes over the [n r, d] rows for ``Af`` (a float32 ``λ ⊙ s A``, then ``⊙ γ`` into
the compute dtype) and three for the gradients (a float32 ``P``, read again by two batched products): 10
and 14 bytes an element of ``Af`` at bf16. :func:`scaled_rows` writes ``Af`` once (2 bytes an element at
bf16) with the same float32 products in the same order and one rounding, so it is bit for bit the torch
result on a GPU (Triton's float32 → bf16 conversion rounds to nearest even; the interpreter truncates, so
the CPU tests compare float32 bit for bit and bf16 to one step); :func:`scalings_grad` reads ``∂Af``
once and sums each tile of ``P`` two ways: ``∂γ`` directly, ``∂λ`` as per-tile partial sums added by one
small torch reduction (deterministic; equal to the torch path up to the summation order, float32
rounding). The parameters, ``s A`` and the accumulation are float32; ``∂Af`` is read in its own dtype.

Grid: one program a basis and block of :data:`BLOCK_D` columns (512 programs for ``n = 64``,
``d = 2048``), each holding a [r, BLOCK_D] tile. Imported only where Triton is (``randlora.kernel_ok``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..linalg import on_device

BLOCK_D = 256  # columns a program; with r = 32: an 8192-element tile, 16 KB of bf16


@triton.jit
def _rows_kernel(lam, a, gam, out, r, d, stride_a, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr) -> None:
    i, jb = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    cols = jb * BLOCK_C + tl.arange(0, BLOCK_C)
    rm, cm = rows < r, cols < d
    m = rm[:, None] & cm[None, :]
    lam_i = tl.load(lam + i * r + rows, mask=rm, other=0.0)
    a_t = tl.load(a + rows[:, None] * stride_a + cols[None, :], mask=m, other=0.0)
    gam_i = tl.load(gam + i * d + cols, mask=cm, other=0.0)
    v = (lam_i[:, None] * a_t) * gam_i[None, :]  # the torch order: (λ ⊙ s A) ⊙ γ
    tl.store(out + (i * r + rows[:, None]) * d + cols[None, :], v.to(out.dtype.element_ty), mask=m)


@triton.jit
def _grad_kernel(
    daf, a, lam, gam, dlam_part, dgam, r, d, stride_a, n_blocks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
) -> None:
    i, jb = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    cols = jb * BLOCK_C + tl.arange(0, BLOCK_C)
    rm, cm = rows < r, cols < d
    m = rm[:, None] & cm[None, :]
    p = tl.load(daf + (i * r + rows[:, None]) * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
    p = p * tl.load(a + rows[:, None] * stride_a + cols[None, :], mask=m, other=0.0)  # P = ∂Af ⊙ s A
    lam_i = tl.load(lam + i * r + rows, mask=rm, other=0.0)
    gam_i = tl.load(gam + i * d + cols, mask=cm, other=0.0)
    tl.store(dgam + i * d + cols, tl.sum(p * lam_i[:, None], axis=0), mask=cm)
    tl.store(dlam_part + (i * n_blocks + jb) * r + rows, tl.sum(p * gam_i[None, :], axis=1), mask=rm)


def _launch(r: int, d: int, n: int) -> tuple[tuple[int, int], dict[str, Any]]:
    blocks = triton.cdiv(d, BLOCK_D)
    return (n, blocks), {"BLOCK_R": max(2, triton.next_power_of_2(r)), "BLOCK_C": BLOCK_D}


def scaled_rows(lam: Tensor, gamma: Tensor, sA: Tensor, dtype: torch.dtype) -> Tensor:
    """``Af`` [n r, d] in ``dtype``: row ``i r + k`` = ``λ_ik sA[k] ⊙ γ_i``, one kernel."""
    n, r = lam.shape
    d = sA.shape[1]
    out = torch.empty((n * r, d), dtype=dtype, device=lam.device)
    grid, meta = _launch(r, d, n)
    with on_device(lam):
        _rows_kernel[grid](lam, sA, gamma, out, r, d, sA.stride(0), **meta)
    return out


def scalings_grad(dAf: Tensor, sA: Tensor, lam: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(∂λ, ∂γ)`` from ``∂Af`` [n r, d] (contiguous), reading it once."""
    n, r = lam.shape
    d = sA.shape[1]
    grid, meta = _launch(r, d, n)
    part = torch.empty((n, grid[1], r), dtype=lam.dtype, device=lam.device)
    d_gamma = torch.empty((n, d), dtype=lam.dtype, device=lam.device)
    with on_device(lam):
        _grad_kernel[grid](dAf, sA, lam, gamma, part, d_gamma, r, d, sA.stride(0), grid[1], **meta)
    return part.sum(1), d_gamma
