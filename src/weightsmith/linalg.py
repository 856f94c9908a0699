"""The numerics policy, in one place.

SVDs, eigendecompositions and projections run in float32 (float64 where asked) on the tensor's device
and results are cast back by the caller. Economy SVD is used wherever exact results allow it;
randomized SVD only where an approximation is acceptable and says so.

Also here: the exact top-k by magnitude (``magnitude_threshold``, ``top_k_mask``), which TIES' trim and
any magnitude pruning share, and ``economy_svd`` (the Gram-eigendecomposition route on CUDA).

Singular values without vectors come from the eigenvalues of the smaller Gram matrix
(``gram_eigvalsh``), several times faster than an SVD on both CPU and GPU. Precision policy: float64
wherever the small eigenvalues matter or the device is a CPU (a float64 Gram of float32 weights is
exact to round-off against a float64 SVD, and on the CPU it costs little more than float32);
float32 (IEEE, TF32 off) is an opt-in for GPU spectra whose tail is what counts: its absolute error
is ~1e-7 x lambda_max, negligible for eigenvalues far above that, and float32 cuSOLVER is faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
    _wait_warm_up(_device_index(W.device))
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


@contextlib.contextmanager
def _ieee_matmul() -> Iterator[None]:
    """Full float32 GEMMs (no TF32) for the duration, whatever the caller's global setting."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


_POOL: dict[tuple[int, int], tuple[ThreadPoolExecutor, list[torch.cuda.Stream]]] = {}
_POOL_LOCK = threading.Lock()
_WARMING: dict[tuple[int, int], threading.Thread] = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _solver_pool(index: int, streams: int) -> tuple[ThreadPoolExecutor, list[torch.cuda.Stream]]:
    """The host threads and CUDA streams of ``_eigvalsh_streams`` on device ``index``, made once."""
    with _POOL_LOCK:
        if (index, streams) not in _POOL:
            dev = torch.device("cuda", index)
            # torch loads its CUDA linear-algebra library lazily, and that first call is not thread-safe
            a = torch.eye(2, device=dev)
            torch.linalg.eigvalsh(torch.mm(a, a))  # loads cuBLAS and cuSOLVER
            _POOL[(index, streams)] = (
                ThreadPoolExecutor(streams),
                [torch.cuda.Stream(dev) for _ in range(streams)],
            )
        return _POOL[(index, streams)]


def warm_up_cuda(device: torch.device | str, streams: int = 4) -> None:
    """Start creating ``device``'s CUDA context, loading cuBLAS and cuSOLVER and making the eigensolver's
    stream pool on a background thread, so that they overlap the caller's reading (~0.5 s of a fresh
    process on an H200). CUDA eigensolves here wait for it; a no-op for a CPU device, when CUDA is not
    available or when it is done. The thread is not a daemon: an exiting interpreter joins it.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return
    index = dev.index
    if index is None:  # asking torch for the current device would create the context here and now
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    key = (index, streams)
    with _POOL_LOCK:
        if key in _POOL or key in _WARMING:
            return
        thread = threading.Thread(target=_warm, args=key, name="weightsmith-cuda-warm-up")
        _WARMING[key] = thread
        thread.start()  # under the lock: no one can join it before it has started


def _warm(index: int, streams: int) -> None:
    with contextlib.suppress(Exception):  # a failure shows again, and is reported, at the first eigensolve
        _solver_pool(index, streams)


def _wait_warm_up(index: int) -> None:
    for key in [k for k in list(_WARMING) if k[0] == index]:
        thread = _WARMING.get(key)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            _WARMING.pop(key, None)


def _eigvalsh_streams(G: Tensor, streams: int) -> Tensor:
    """``torch.linalg.eigvalsh`` of a (B, k, k) CUDA batch, chunks on ``streams`` streams at once."""
    pool, pool_streams = _solver_pool(_device_index(G.device), streams)
    main = torch.cuda.current_stream(G.device)
    # allocated on the caller's stream, which waits for the solvers below: no record_stream, no cat
    out = torch.empty(G.shape[:-1], dtype=G.dtype, device=G.device)
    ready = torch.cuda.Event()
    ready.record(main)

    def work(i: int, chunk: Tensor, dst: Tensor) -> None:
        s = pool_streams[i]
        with torch.cuda.device(G.device), torch.cuda.stream(s):
            s.wait_event(ready)
            torch.linalg.eigvalsh(chunk, out=dst)

    chunks = list(zip(G.chunk(streams), out.chunk(streams), strict=True))
    for f in [pool.submit(work, i, c, d) for i, (c, d) in enumerate(chunks)]:
        f.result()
    for i in range(len(chunks)):
        main.wait_stream(pool_streams[i])
    return out


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


def stable_seed(text: str, algorithm: str = "blake2b") -> int:
    """A 63-bit seed from ``text`` that is the same on every machine and Python run (``hash()`` is not):
    the first 8 bytes of its digest, little-endian. Saved adapters regenerate their random bases from these
    seeds (sha256), merges their random masks (blake2b), so neither may change."""
    raw = text.encode()
    digest = (
        hashlib.sha256(raw).digest()
        if algorithm == "sha256"
        else hashlib.blake2b(raw, digest_size=8).digest()
    )
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def economy_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD ``A = U diag(S) Vh`` of a 2-D matrix, in ``A``'s dtype.

    On CUDA it comes from the eigendecomposition of the smaller Gram matrix in float64: an order of
    magnitude faster than cuSOLVER's SVD at model sizes and accurate to float32 for full-rank matrices
    (directions of zero singular value get zero vectors). On CPU it is LAPACK's economy SVD.
    """
    if not A.is_cuda:
        return svd(A)
    wide = A.shape[0] <= A.shape[1]
    B = (A if wide else A.mT).double()
    ev, Q = torch.linalg.eigh(B @ B.mT)
    S = ev.flip(0).clamp_min(0).sqrt()
    Q = Q.flip(1)
    P = (B.mT @ Q) / torch.where(S > 0, S, 1.0)
    U, Vh = (Q, P.mT) if wide else (P, Q.mT)
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


def qdwh_weights(floor: float = 1e-8, halley: int = 2) -> list[tuple[float, float, float]]:
    """The weights ``(a_k, b_k, c_k)`` of the QDWH iteration for singular values in ``[floor, 1]``
    (Nakatsukasa, Bai & Gygi, "Optimizing Halley's iteration for computing the matrix polar decomposition",
    SIAM J. Matrix Anal. Appl., 2010, eq. 3.3-3.5): with ``ℓ`` the current lower bound,

        d = (4 (1 − ℓ²) / ℓ⁴)^{1/3},  a = √(1 + d) + ½ √(8 − 4d + 8 (2 − ℓ²) / (ℓ² √(1 + d))),
        b = (a − 1)² / 4,  c = a + b − 1,  ℓ ← ℓ (a + b ℓ²) / (1 + c ℓ²),

    until ``1 − ℓ < 1e-15`` (5 steps from 1e-8), then ``halley`` plain Halley steps ``(3, 1, 3)`` that
    also bring singular values somewhat below ``floor`` to 1. Host floats: they depend on ``floor`` only."""
    out, low = [], floor
    while 1.0 - low >= 1e-15:
        d = (4.0 * (1.0 - low * low) / low**4) ** (1.0 / 3.0)
        a = math.sqrt(1.0 + d) + 0.5 * math.sqrt(
            8.0 - 4.0 * d + 8.0 * (2.0 - low * low) / (low * low * math.sqrt(1.0 + d))
        )
        b = (a - 1.0) ** 2 / 4.0
        c = a + b - 1.0
        out.append((a, b, c))
        low = low * (a + b * low * low) / (1.0 + c * low * low)
    return out + [(3.0, 1.0, 3.0)] * halley


def polar_nuclear(A: Tensor, floor: float = 1e-8, halley: int = 2) -> tuple[Tensor, Tensor]:
    """The polar factor ``U Vᵀ`` of ``A = U Σ Vᵀ`` (economy) and ``‖A‖_* = Σ σ_i = tr((U Vᵀ)ᵀ A)``,
    with no host synchronisation (a CUDA graph can capture it), in ``A``'s dtype.

    QDWH (see :func:`qdwh_weights`) on the tall orientation ``X₀ = A / ‖A‖_F`` (so ``σ ≤ 1``) in float64,
    each step in its Cholesky form: ``Z = I + c XᵀX = L Lᵀ``, ``X ← (b/c) X + (a − b/c) X Z⁻¹``. Each
    step maps a singular value by ``f(σ) = σ (a + b σ²) / (1 + c σ²)``, so ``σ = 0`` stays 0: directions of
    zero singular value get zero (as in :func:`economy_svd` on CUDA), and ``A = 0`` gives ``U Vᵀ = 0``.
    The weights are fixed (from ``floor``, not from the data), ``Z ⪰ I`` is always positive definite
    (``cholesky_ex`` without its host check) and the solves are triangular: no step reads the device.
    Singular values down to ``floor · ‖A‖_F`` (and, through the 2 Halley steps, to about 5e-10 ‖A‖_F)
    converge to float32 round-off against the SVD; ``c₀ ≈ 7e10`` keeps float64 Cholesky accurate. Cost: 7
    steps of ``m n²`` (``XᵀX``) + ``n³/3`` (Cholesky) + ``m n²`` (two triangular solves) multiply-adds for
    ``A`` [m, n], m ≥ n."""
    tall = A.shape[0] >= A.shape[1]
    X = (A if tall else A.mT).double()
    X = X / torch.linalg.matrix_norm(X).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    for a, b, c in qdwh_weights(floor, halley):
        L, _ = torch.linalg.cholesky_ex(torch.addmm(eye, X.mT, X, alpha=c))
        Y = torch.linalg.solve_triangular(L, X.mT, upper=False)
        X = torch.add((b / c) * X, torch.linalg.solve_triangular(L.mT, Y, upper=True).mT, alpha=a - b / c)
    nuclear = (X * (A if tall else A.mT).double()).sum()
    return (X if tall else X.mT).to(A.dtype), nuclear.to(A.dtype)


# ------------------------------------------------------------------------------- top-k by magnitude


def magnitude_threshold(chunks: Callable[[], Iterable[Tensor]], k: int) -> float:
    """The k-th largest |x| over the tensors ``chunks()`` yields, exactly, in two histogram passes.

    Non-negative float32 values sort like their int32 bit patterns, so a 2^15-bin count of the high 16
    bits finds the bin holding the k-th value and a 2^16-bin count of the low bits inside it finishes.
    Cheaper than ``topk`` (no index tensor), and ``chunks`` may stream a whole model tensor by tensor.
    """
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for c in chunks():
        high += torch.bincount(_bits(c) >> 16, minlength=1 << 15).cpu()
    above = high.flip(0).cumsum(0)
    j = int(torch.searchsorted(above, torch.tensor(k)))
    hb = (1 << 15) - 1 - j
    need = k - (int(above[j - 1]) if j > 0 else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for c in chunks():
        b = _bits(c)
        low += torch.bincount(b[(b >> 16) == hb] & 0xFFFF, minlength=1 << 16).cpu()
    lb = (1 << 16) - 1 - int(torch.searchsorted(low.flip(0).cumsum(0), torch.tensor(need)))
    return float(torch.tensor([(hb << 16) | lb], dtype=torch.int32).view(torch.float32))


def _bits(x: Tensor) -> Tensor:
    return x.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


def above_threshold(mag: Tensor, cut: float, ties: int | None = None) -> tuple[Tensor, int]:
    """The mask of ``mag > cut`` plus entries equal to ``cut``: all of them, or (``ties`` given) only the
    first ``ties`` by position. Returns the mask and the number of tied entries it keeps; called chunk by
    chunk with the remaining tie budget, it keeps exactly k entries of a tensor whose k-th value is ``cut``.
    """
    keep = mag > cut
    tied = mag == cut
    n_tied = int(tied.sum())
    if ties is not None and n_tied > ties:
        flat = tied.reshape(-1)
        flat[flat.nonzero()[max(ties, 0) :, 0]] = False
        n_tied = max(ties, 0)
    return keep | tied, n_tied


def top_k_mask(x: Tensor, k: int) -> Tensor:
    """Exactly the ``k`` entries of largest |x| (ties at the k-th value broken by position)."""
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.detach().abs()
    cut = magnitude_threshold(lambda: [mag], k)
    budget = k - int((mag > cut).sum())
    return above_threshold(mag, cut, budget)[0]


# --------------------------------------------------------------------------- 16-bit products, float32 results


def on_device(where: Tensor | torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``where``'s GPU the current one (a Triton launch or cuSOLVER call goes to the current GPU,
    not the tensor's); on the CPU nothing (Triton's interpreter, for tests)."""
    device = where.device if isinstance(where, Tensor) else where
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def tf32_matmul(enabled: bool = True) -> Iterator[None]:
    """float32 matrix products on CUDA in TF32 (inputs rounded to a 10-bit significand, float32
    accumulation) inside the block only; the previous settings come back on exit. Torch has two APIs for
    this (``torch.set_float32_matmul_precision`` and the per-backend ``torch.backends.cuda.matmul.
    fp32_precision``) and refuses to read the first once the second has been set apart from it: then only
    the per-backend setting is changed (and restored)."""
    if not enabled:
        yield
        return
    backend = torch.backends.cuda.matmul
    before = getattr(backend, "fp32_precision", None)  # torch >= 2.9
    try:
        old: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:
        old = None
    if old is None:
        backend.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        if old is not None:
            torch.set_float32_matmul_precision(old)
        if before is not None:
            backend.fp32_precision = before


# torch.mm(..., out_dtype=) (16-bit inputs, float32 result) exists where aten::mm has its "dtype" overload
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as float32 for bf16/fp16 CUDA inputs, multiplied as they are: the product of two bf16 (8-bit
    significand) or fp16 (11-bit) values is exact in float32 (24-bit), so only the sums are rounded, in
    float32, on the tensor cores. ``torch.mm(..., out_dtype=float32)`` where this torch has it; otherwise
    TF32 on float32 copies, which hold bf16/fp16 values exactly (:func:`tf32_matmul`)."""
    if _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)  # type: ignore[call-arg]
    with tf32_matmul():
        return a.float() @ b.float()
