"""The numerics policy, in one place.

SVDs, eigendecompositions and projections run in float32 (float64 where asked) on the tensor's device
and results are cast back by the caller. Economy SVD is used wherever exact results allow it;
randomized SVD only where an approximation is acceptable and says so.

Singular values without vectors come from the eigenvalues of the smaller Gram matrix
(``gram_eigvalsh``), several times faster than an SVD on both CPU and GPU. Precision policy: float64
wherever the small eigenvalues matter or the device is a CPU (a float64 Gram of float32 weights is
exact to round-off against a float64 SVD, and on the CPU it costs little more than float32);
float32 (IEEE, TF32 off) is an opt-in for GPU spectra whose tail is what counts: its absolute error
is ~1e-7 x lambda_max, negligible for eigenvalues far above that, and float32 cuSOLVER is faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

COMPUTE_DTYPE = torch.float32


def as_compute(W: Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> Tensor:
    """Upcast to the compute dtype (never downcast float64)."""
    if W.dtype == torch.float64 and dtype == torch.float32:
        return W
    return W.to(dtype)


def svd(W: Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD ``W = U diag(S) Vh`` in float32 (batched over leading dims)."""
    return torch.linalg.svd(as_compute(W, dtype), full_matrices=False)


def svdvals(W: Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> Tensor:
    """Singular values, descending, batched over leading dims.

    On CPU ``torch.linalg.svdvals`` is used directly. On CUDA the eigenvalues of the smaller Gram
    matrix are faster than cuSOLVER's gesvd by an order of magnitude at these sizes; they are
    computed in float64 so the small singular values keep their precision.
    """
    W = as_compute(W, dtype)
    if W.is_cuda:
        return gram_eigvalsh(W, torch.float64).sqrt().to(W.dtype)
    return torch.linalg.svdvals(W)


def gram_eigvalsh(W: Tensor, dtype: torch.dtype = torch.float64, streams: int = 1) -> Tensor:
    """Eigenvalues of the smaller Gram matrix (``W W^T`` or ``W^T W``), i.e. squared singular values.

    ``W`` is ``(..., m, n)``; the result is ``(..., min(m, n))`` in ``dtype``, descending, clamped at 0.
    A matrix whose Gram diagonal is not finite (NaN/Inf entries, or overflow in ``dtype``) gets a row
    of NaN instead of an error. CPU: BLAS ``syrk`` (one triangle, half a GEMM's flops) and LAPACK
    ``syev`` on that triangle, one matrix at a time, any strides. CUDA: one batched GEMM at full
    float32 precision and cuSOLVER ``syevd``; ``streams > 1`` splits the batch over that many CUDA
    streams driven by host threads (cuSOLVER's large symmetric solver leaves an H100 mostly idle).
    """
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    if not W.is_cuda:
        A = W.reshape(-1, m, n)
        out = torch.stack([_gram_eigvalsh_cpu(A[b], dtype) for b in range(A.shape[0])]) if len(A) else None
        return (
            out.reshape(*batch, min(m, n)) if out is not None else W.new_empty(*batch, min(m, n), dtype=dtype)
        )
    A = W.to(dtype)
    with _ieee_matmul():
        G = A @ A.mT if m <= n else A.mT @ A
    ok = torch.isfinite(G.diagonal(dim1=-2, dim2=-1)).all(-1)
    G = torch.where(ok[..., None, None], G, torch.eye(G.shape[-1], dtype=dtype, device=G.device))
    ev = _eigvalsh_streams(G, streams) if streams > 1 and G.dim() == 3 and len(G) > 1 else None
    ev = torch.linalg.eigvalsh(G) if ev is None else ev
    ev = torch.where(ok[..., None], ev.clamp_min(0), torch.full_like(ev, math.nan))
    return ev.flip(-1)


def _gram_eigvalsh_cpu(W: Tensor, dtype: torch.dtype) -> Tensor:
    from scipy.linalg import blas, eigh

    a = W.to(dtype).numpy()
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = a.copy()
    syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
    # syrk(a, trans=0) = a a^T, trans=1: a^T a, on a Fortran-ordered a; a C-ordered a is passed as a.T
    want_aat = a.shape[0] <= a.shape[1]
    G = (
        syrk(1.0, a, trans=0 if want_aat else 1)
        if a.flags.f_contiguous
        else syrk(1.0, a.T, trans=1 if want_aat else 0)
    )
    k = G.shape[0]
    if k == 0 or not bool(torch.isfinite(torch.from_numpy(G.diagonal().copy())).all()):
        return torch.full((k,), math.nan, dtype=dtype)
    ev = eigh(G, lower=False, eigvals_only=True, overwrite_a=True, check_finite=False, driver="ev")
    return torch.from_numpy(ev[::-1].copy()).clamp_min(0)


@contextmanager
def _ieee_matmul() -> Iterator[None]:
    """Full float32 GEMMs (no TF32) for the duration, whatever the caller's global setting."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


_POOL: dict[int, tuple[ThreadPoolExecutor, list[torch.cuda.Stream]]] = {}


def _eigvalsh_streams(G: Tensor, streams: int) -> Tensor:
    """``torch.linalg.eigvalsh`` of a (B, k, k) CUDA batch, chunks on ``streams`` streams at once."""
    key = (G.device.index or 0) * 1000 + streams
    if key not in _POOL:
        # torch loads its CUDA linear-algebra library lazily, and that first call is not thread-safe
        torch.linalg.eigvalsh(torch.eye(2, dtype=G.dtype, device=G.device))
        _POOL[key] = (ThreadPoolExecutor(streams), [torch.cuda.Stream(G.device) for _ in range(streams)])
    pool, pool_streams = _POOL[key]
    main = torch.cuda.current_stream(G.device)
    ready = torch.cuda.Event()
    ready.record(main)

    def work(i: int, chunk: Tensor) -> Tensor:
        s = pool_streams[i]
        with torch.cuda.device(G.device), torch.cuda.stream(s):
            s.wait_event(ready)
            return torch.linalg.eigvalsh(chunk)

    chunks = G.chunk(streams)
    outs = [f.result() for f in [pool.submit(work, i, c) for i, c in enumerate(chunks)]]
    for i, out in enumerate(outs):
        main.wait_stream(pool_streams[i])
        out.record_stream(main)
    return torch.cat(outs)


def rsvd(
    W: Tensor, rank: int, oversample: int = 10, n_iter: int = 2, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD (Halko, Martinsson & Tropp, 2011), float32: ``U[:, :r], S[:r], Vh[:r]``."""
    A = as_compute(W)
    m, n = A.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, device=A.device, dtype=A.dtype, generator=generator)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(n_iter):
        Q, _ = torch.linalg.qr(A.mT @ Q)
        Q, _ = torch.linalg.qr(A @ Q)
    B = Q.mT @ A
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def truncated_svd(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``rank`` SVD factors (economy SVD, then slicing)."""
    U, S, Vh = svd(W)
    return U[:, :rank], S[:rank], Vh[:rank]


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
