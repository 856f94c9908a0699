"""The backward of DoRA's row scale in one pass over the output gradient (CUDA, with Triton installed).

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024) ends each layer with
``y = z ⊙ c``, ``c = m / ‖W0 + s B A‖`` per output feature. Its backward needs

    dz = g ⊙ c                 (the input of LoRA's node's backward, in g's dtype)
    Σ_t g_t ⊙ z_t              (per output feature, for ∂m)

which torch runs as three passes over ``[tokens, out]`` tensors (``g * c``; ``g * z`` written out; its
column sum). One Triton kernel reads ``g`` and ``z`` once, writes ``dz`` and one float32 partial sum per
tile of rows and column; torch adds the ``[tiles, out]`` partials (no atomics: deterministic). ``dz`` is
bit-identical to ``g * c`` (a product of two 16-bit floats is exact in float32, then one rounding to
nearest even); the sums take the exact float32 products, where torch first rounds ``g * z`` to ``g``'s
dtype, so ∂m differs from the torch path by that rounding (about 2⁻⁹ relative for bfloat16 terms).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ..linalg import on_device

try:  # this module is imported on the first CUDA backward only (dora.py): importing Triton costs ~0.15 s
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI has no triton
    triton = None

BLOCK_T = 32  # rows (tokens) a program
BLOCK_O = 256  # output features a program
NUM_WARPS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _row_scale_bwd(G, Z, C, DZ, P, rows, cols, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):  # type: ignore[no-untyped-def]
    pt = tl.program_id(0)
    po = tl.program_id(1)
    t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = o < cols
    m = (t < rows)[:, None] & mo[None, :]
    off = t[:, None].to(tl.int64) * cols + o[None, :]
    g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    c = tl.load(C + o, mask=mo, other=0.0).to(tl.float32)
    tl.store(DZ + off, (g * c[None, :]).to(DZ.dtype.element_ty), mask=m)
    tl.store(P + pt.to(tl.int64) * cols + o, tl.sum(g * z, axis=0), mask=mo)


@functools.cache
def _kernel() -> Any:
    return triton.jit(_row_scale_bwd, do_not_specialize=["rows"])


def usable(g: Tensor, z: Tensor, c: Tensor) -> bool:
    """Whether :func:`row_scale_backward` takes these: not inside ``torch.compile``, Triton present, CUDA
    tensors of one supported dtype, ``g`` and ``z`` contiguous with the same shape, ``c`` one value a
    column."""
    return (
        not torch.compiler.is_compiling()  # the compiler fuses the torch ops itself: no raw launch
        and g.is_cuda
        and g.dtype in DTYPES
        and z.dtype == g.dtype
        and c.dtype == g.dtype
        and g.shape == z.shape
        and g.is_contiguous()
        and z.is_contiguous()
        and c.is_contiguous()
        and c.numel() == g.shape[-1]
        and triton is not None
    )


def row_scale_backward(g: Tensor, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(g ⊙ c, Σ_t g_t ⊙ z_t)`` for ``g``, ``z`` [..., out] and ``c`` [out]: the first in ``g``'s dtype and
    shape, the second float32 [out]. One kernel launch and one small column sum; no host sync."""
    cols = g.shape[-1]
    rows = g.numel() // max(cols, 1)
    dz = torch.empty_like(g)
    tiles = -(-rows // BLOCK_T)
    part = torch.empty((tiles, cols), dtype=torch.float32, device=g.device)
    with on_device(g):
        _kernel()[(tiles, -(-cols // BLOCK_O))](
            g, z, c, dz, part, rows, cols, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, num_warps=NUM_WARPS
        )
    return dz, part.sum(0)
