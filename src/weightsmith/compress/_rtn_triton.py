"""RTN fused into one Triton kernel a run of same-shaped weights: read each ``W`` once, write its scales,
zeros and ``Ŵ`` once, and its codes only where they cannot be recovered from ``Ŵ`` later (``CODES``: see
compress/_grid.py, "Codes recovered from the written weight"; otherwise no codes tensor exists at all).

The arithmetic is RTN on the min-max grid of :mod:`._grid` ("Quantizing deep convolutional networks for
efficient inference: A whitepaper", Krishnamoorthi, 2018, eq. 2-4), step for step as
:func:`._grid.minmax_params` and :func:`._grid.codes` do it in float32, per group of ``g`` weights of a row::

    lo = min(min_j w_j, 0),  hi = max(max_j w_j, 0)
    symmetric:  s = max(hi, −lo) / ((2^b − 1) / 2),  z = 2^(b−1)
    asymmetric: s = (hi − lo) / (2^b − 1),           z = clamp(rint(−lo / s), 0, 2^b − 1)
    s = s if s > 0 else 1
    q = clamp(rint(w / s + z), 0, 2^b − 1),  ŵ = (q − z) · s

so the codes, scales, zeros and ``Ŵ`` are bit-identical to :func:`._grid.rtn_with_dequant` on the same
device: every division is correctly rounded (``div_rn``, as torch's tensor ``/``), rounding is half to even
(as ``torch.round``; the exact addition form of :data:`_RINT`), no multiply-add is fused (the kernel is
launched with ``enable_fp_fusion=False``), and the division of the range by the constant follows torch: on
CUDA a division by a Python number is a multiplication by its float32 reciprocal (ATen's
``div_true_kernel_cuda``), on the CPU (Triton's interpreter, for tests) a true division. ``Ŵ`` is cast to the
weight's dtype (round to nearest even, as ``Tensor.to``; by hand for bfloat16, whose cast the interpreter
truncates) and written over ``W``.

The error ``‖W − Ŵ‖_F / ‖W‖_F`` (``Ŵ`` in float32, before the cast, as the torch path takes it) comes from
per-program float32 partial sums of ``w²`` and ``(w − ŵ)²``, added in float64 by torch once a run:
deterministic, equal to the torch path's value up to summation order (about 1e-7 relative).

A weight ``[out, in]`` split into groups of ``g`` (``g = in`` per channel) is, contiguous, a matrix
``[out · in / g, g]`` of group rows; each program takes :data:`TILE` elements' worth of group rows and runs
over them twice in chunks of at most :data:`MAX_CHUNK` columns (min/max, then codes and ``Ŵ``; the second
read comes from cache), so a per-channel group of any length fits. The weights of a run are separate
parameters: the grid is (programs a weight, weights), and each program reads its weight's address (and those
of the weight's scales and zeros) from an int64 table and turns it into a pointer, as Triton's grouped-GEMM
tutorial does; so a run of ``L`` weights is one launch, one table copied to the device and a few
allocations (partial sums, table, codes where kept; scales and zeros are one small allocation each a
weight), with no host sync.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..linalg import on_device
from ._datafree import MAX_RUN
from ._grid import QuantizedWeight, WrittenAt, check_bits, exact_dtype, grouped, qmax

# rint(x) = (x + 1.5·2^23) − 1.5·2^23 for |x| < 2^22 in float32 round-to-nearest-even arithmetic: the sum lies
# in [2^23, 2^24), where the spacing is 1, so the addition itself rounds x half to even (1.5·2^23 is even).
# Triton has no rint of its own (libdevice's does not run in the interpreter the tests use); both operations
# are plain IEEE additions, which no compiler pass reassociates without fast-math flags.
_RINT = 12582912.0

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI has no triton
    triton = None
else:
    RINT = tl.constexpr(_RINT)
    _ELT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 4096  # elements a program quantises (group rows x columns of one chunk)
MAX_CHUNK = 2048  # columns a program holds at once (a longer group is run over in chunks)
NUM_WARPS = 4
# Devices where torch divides a tensor by a Python number as a product with the number's float32 reciprocal
# (ATen's div_true_kernel_cuda: "optimization for floating-point types"); elsewhere (the CPU) it divides
RECIPROCAL_DEVICES = ("cuda",)


def available() -> bool:
    """Whether Triton imports (the fused path's only requirement beyond a CUDA tensor)."""
    return triton is not None


def _rtn_kernel(  # type: ignore[no-untyped-def]
    T,  # [L, 3] int64 addresses of each weight's W [rows, g] (read, then overwritten with Ŵ), scales, zeros
    Q,  # [L, rows, g] uint8 codes (unused without CODES)
    P,  # [L, programs, 2] float32 partial sums of w² and (w − ŵ)²
    rows,
    g,
    div,  # the range's divisor, or its float32 reciprocal when RCP
    top,  # 2^b − 1
    zsym,  # 2^(b−1), the symmetric zero
    ELT: tl.constexpr,  # the weights' dtype
    CODES: tl.constexpr,  # write the codes (else they are recovered from Ŵ when saved: none are kept)
    SYM: tl.constexpr,
    RCP: tl.constexpr,
    ALIGNED: tl.constexpr,  # every weight starts on 16 bytes (so its rows' loads vectorise)
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    j = tl.program_id(1)  # the weight
    W = tl.load(T + 3 * j).to(tl.pointer_type(ELT))
    S = tl.load(T + 3 * j + 1).to(tl.pointer_type(tl.float32))
    Z = tl.load(T + 3 * j + 2).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        W = tl.multiple_of(W, 16)
    if CODES:
        Q += j.to(tl.int64) * rows * g
    P += (j.to(tl.int64) * tl.num_programs(0) + pid) * 2
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    base = r.to(tl.int64) * g
    cols = tl.arange(0, CHUNK)
    # Every loop-carried accumulator (lo, hi, sw, se) has exactly one use after its loop: Triton 3.6's
    # TritonGPUOptimizeThreadLocality asserts it (loopResult.hasOneUse) when it rewrites a reduction in a loop
    lo = tl.zeros([BLOCK_R], tl.float32)  # starting at 0 is the clamp of the range to include 0
    hi = tl.zeros([BLOCK_R], tl.float32)
    for c in range(0, g, CHUNK):
        m = rmask[:, None] & ((c + cols) < g)[None, :]
        w = tl.load(W + base[:, None] + (c + cols)[None, :], mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(w, axis=1))
        hi = tl.maximum(hi, tl.max(w, axis=1))
    nlo = -lo  # the one use of lo (exact)
    if SYM:
        span = tl.maximum(hi, nlo)
    else:
        span = hi + nlo  # = hi − lo, the same IEEE operation
    if RCP:
        scale = span * div
    else:
        scale = tl.math.div_rn(span, tl.full([BLOCK_R], div, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    if SYM:
        zero = tl.full([BLOCK_R], zsym, tl.float32)
    else:
        zero = tl.math.div_rn(nlo, scale)  # in [0, 2^b − 1]: −lo ≤ hi − lo
        zero = tl.minimum(tl.maximum((zero + RINT) - RINT, 0.0), top)
    tl.store(S + r, scale, mask=rmask)
    if not SYM:  # a symmetric grid's zero is one constant: the caller keeps it as such
        tl.store(Z + r, zero, mask=rmask)
    sw = tl.zeros([BLOCK_R], tl.float32)
    se = tl.zeros([BLOCK_R], tl.float32)
    for c in range(0, g, CHUNK):
        m = rmask[:, None] & ((c + cols) < g)[None, :]
        off = base[:, None] + (c + cols)[None, :]
        w = tl.load(W + off, mask=m, other=0.0).to(tl.float32)
        q = tl.math.div_rn(w, scale[:, None]) + zero[:, None]  # |q| < 2^9 (w / s is within the grid)
        q = tl.minimum(tl.maximum((q + RINT) - RINT, 0.0), top)
        if CODES:
            tl.store(Q + off, q.to(tl.uint8), mask=m)
        w_hat = (q - zero[:, None]) * scale[:, None]
        if ELT == tl.bfloat16:  # noqa: SIM300 (ELT is the argument) round to nearest even by hand
            b = w_hat.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(W + off, b.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=m)
        else:
            tl.store(W + off, w_hat.to(ELT), mask=m)
        e = tl.where(m, w - w_hat, 0.0)
        sw += tl.sum(w * w, axis=1)
        se += tl.sum(e * e, axis=1)
    tl.store(P, tl.sum(sw, axis=0))
    tl.store(P + 1, tl.sum(se, axis=0))


@functools.cache
def _kernel() -> Any:
    """The kernel, jitted on first use (Triton's interpreter, for tests on the CPU, needs
    ``TRITON_INTERPRET=1`` before Triton is imported: its own library functions are jitted then). One
    compilation serves every number of weights and of group rows: ``rows`` is not specialised, the number of
    weights is a grid dimension, and the addresses come in a tensor; the group size stays specialised (a
    multiple of 16 lets the loads vectorise), as are the dtype, the grid type and the tile shape."""
    return triton.jit(_rtn_kernel, do_not_specialize=["rows"])


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read as Triton reads it; older Triton has no
    ``triton.knobs``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _divisor(bits: int, symmetric: bool, reciprocal: bool) -> float:
    """What the range is divided by (``(2^b − 1) / 2`` or ``2^b − 1``), or its float32 reciprocal
    ``fl(1 / d)`` computed as ATen does (float32 on the host) when ``reciprocal``."""
    d = qmax(bits) / 2 if symmetric else float(qmax(bits))
    if not reciprocal:
        return d
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32))


def launch_shape(rows: int, g: int) -> tuple[int, int, int]:
    """(group rows a program, chunk columns, programs a weight) for ``rows`` groups of ``g``."""
    chunk = min(triton.next_power_of_2(g), MAX_CHUNK)
    block_r = min(max(1, TILE // chunk), triton.next_power_of_2(rows))
    return block_r, chunk, triton.cdiv(rows, block_r)


def _check(Ws: Sequence[Tensor]) -> None:
    """Refuse what the kernel cannot take in place: a weight that is not a contiguous [out, in] float32,
    bfloat16 or float16 tensor, or weights of different shapes, dtypes or devices."""
    if not 0 < len(Ws) <= MAX_RUN:
        raise WeightsmithError(f"fused RTN takes 1 to {MAX_RUN} weights at once, got {len(Ws)}")
    W0 = Ws[0]
    for W in Ws:
        if W.dim() != 2 or W.dtype not in DTYPES or not W.is_contiguous():
            raise WeightsmithError(
                f"fused RTN takes a contiguous [out, in] float32/bfloat16/float16 weight, got {W.dtype} "
                f"{tuple(W.shape)} (contiguous: {W.is_contiguous()})"
            )
        if W.shape != W0.shape or W.dtype != W0.dtype or W.device != W0.device:
            raise WeightsmithError(
                f"fused RTN quantises weights of one shape, dtype and device at once, got {W.dtype} "
                f"{tuple(W.shape)} on {W.device} with {W0.dtype} {tuple(W0.shape)} on {W0.device}"
            )


def _addresses(rows: list[list[int]], dev: torch.device) -> Tensor:
    """The int64 table on ``dev`` without a host sync (pinned memory, copied asynchronously; the caching
    host allocator keeps the pinned block until the copy is done)."""
    if dev.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(dev, non_blocking=True)


def rtn_fused(
    Ws: Sequence[Tensor], bits: int, group_size: int, symmetric: bool, codes: bool | None = None
) -> tuple[list[QuantizedWeight], Tensor]:
    """RTN of the same-shaped weights ``Ws`` (each [out, in], float32, bfloat16 or float16, contiguous) in
    one launch: returns one quantised weight each and ``‖W − Ŵ‖_F / ‖W‖_F`` of each as a float32 tensor [L]
    on their device (no host sync), and overwrites every ``W`` with its ``Ŵ`` in its dtype. Each weight's
    scales (and an asymmetric grid's zeros) are its own (a checkpoint writer refuses tensors that share
    storage); a symmetric grid's zeros are the constant ``2^(b−1)``, one element seen as [out, groups] by
    every result (no writer stores them as they are: compressed-tensors has none for a symmetric grid, the
    weightsmith format copies them). ``group_size = 0``: per channel.

    ``codes``: whether the kernel writes the codes (one allocation [L, out, in], each result holding a
    view). Default: only where they cannot be recovered from ``Ŵ`` in the weights' dtype
    (:func:`~._grid.exact_dtype`: bfloat16 at 8 bits asymmetric); otherwise no codes tensor is allocated
    and each result recovers its codes from its ``W`` when they are read (:class:`~._grid.WrittenAt`; the
    scales' range, :func:`~._grid.exact_scales`, is checked then: here it would cost a host sync)."""
    if triton is None:
        raise WeightsmithError("the fused RTN kernel needs triton (pip install triton)")
    check_bits(bits)
    _check(Ws)
    if codes is None:
        codes = not exact_dtype(bits, symmetric, Ws[0].dtype)
    elif not codes and not exact_dtype(bits, symmetric, Ws[0].dtype):
        raise WeightsmithError(
            f"fused RTN codes=False: {bits}-bit {'symmetric' if symmetric else 'asymmetric'} codes cannot be "
            f"recovered exactly from {Ws[0].dtype} weights; keep them (codes=True or None)"
        )
    W0 = Ws[0]
    out_f, in_f = W0.shape
    g = grouped(W0, group_size).shape[-1]  # checks that the group size divides the input size
    rows = W0.numel() // g
    block_r, chunk, programs = launch_shape(rows, g)
    dev, n = W0.device, len(Ws)
    q = torch.empty((n, out_f, in_f) if codes else (1,), dtype=torch.uint8, device=dev)
    grid = (out_f, in_f // g)
    scales = [torch.empty(grid, dtype=torch.float32, device=dev) for _ in range(n)]
    if symmetric:  # 2^(b−1) everywhere: one element, seen as [out, groups] by every result
        zeros = [torch.full((1, 1), float(1 << (bits - 1)), device=dev).expand(grid)] * n
    else:
        zeros = [torch.empty(grid, dtype=torch.float32, device=dev) for _ in range(n)]
    part = torch.empty((n, programs, 2), dtype=torch.float32, device=dev)
    table = [[W.data_ptr(), s.data_ptr(), z.data_ptr()] for W, s, z in zip(Ws, scales, zeros, strict=True)]
    aligned = all(a % 16 == 0 for a, _, _ in table)
    rcp = dev.type in RECIPROCAL_DEVICES
    with on_device(dev):
        _kernel()[(programs, n)](
            _addresses(table, dev), q, part, rows, g,
            _divisor(bits, symmetric, rcp), float(qmax(bits)), float(1 << (bits - 1)),
            ELT=_ELT[W0.dtype], CODES=codes, SYM=symmetric, RCP=rcp, ALIGNED=aligned, BLOCK_R=block_r,
            CHUNK=chunk, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    sums = part.double().sum(1)  # [L, 2]: Σ w², Σ (w − ŵ)² in float64
    rel = sums[:, 1].div_(sums[:, 0].clamp_min(1e-60)).sqrt_().float()
    keep = (bits, group_size, symmetric)
    if codes:
        return [QuantizedWeight(c, s, z, *keep) for c, s, z in zip(q, scales, zeros, strict=True)], rel
    at = [WrittenAt(W, W.dtype, f"weight {j} of a fused RTN run") for j, W in enumerate(Ws)]
    return [QuantizedWeight(None, s, z, *keep, a) for s, z, a in zip(scales, zeros, at, strict=True)], rel


def fusable(W: Tensor, dev: torch.device) -> bool:
    """Whether :func:`rtn_fused` can quantise ``W`` in place on ``dev``: Triton present, ``W`` already on
    ``dev`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``), contiguous [out, in] in a supported dtype."""
    here = W.device.type == dev.type and dev.index in (None, W.device.index)
    if triton is None or not here or W.dim() != 2 or W.dtype not in DTYPES or not W.is_contiguous():
        return False
    return dev.type == "cuda" or _interpreting()
