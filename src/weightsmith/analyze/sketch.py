"""Spectral norms and sketches of matrices read as streams of row blocks: no SVD, no whole-matrix copy.

A matrix larger than the accelerator's memory (an embedding or ``lm_head`` of a large vocabulary, or any
weight on a small GPU) can still be read row block by row block from its memory-mapped file. Three
methods work on such a stream, each touching a block once per pass:

- **Streaming power method** (the block / "noisy" power method of Mitliagkas, Caramanis & Jain,
  "Memory limited, streaming PCA", NeurIPS 2013, and Hardt & Price, "The noisy power method", NeurIPS
  2014): one power step on ``C = W^T W = sum_i x_i x_i^T`` per pass, ``v <- sum_blocks X_b^T (X_b v)``,
  ``v <- v / ||v||``; ``lambda_max = ||W v||^2`` (the Rayleigh quotient) and ``||W||_2 = sqrt(lambda_max)``.
  Each pass costs ``2 m n`` flops against ``O(m n min(m, n))`` for an SVD or the Gram eigensolver.
- **Oja's rule on a random-order stream** (Oja, "Simplified neuron model as a principal component
  analyzer", J. Math. Biology 1982; rates from Jain, Jin, Kakade, Netrapalli & Sidford, "Streaming PCA:
  matching matrix Bernstein and near-optimal finite sample guarantees for Oja's algorithm", COLT 2016):
  rows ``x_t`` arrive in random order and ``v <- normalise(v + eta_t x_t (x_t^T v))`` with
  ``eta_t = c / (t + t0)`` (here applied to row blocks, ``X_b^T X_b v`` per step): one pass, O(n) state.
- **Very sparse random projections** (Li, Hastie & Church, "Very sparse random projections", KDD 2006):
  ``R`` (n x k) with entries ``sqrt(s) * {+1 w.p. 1/(2s), 0 w.p. 1 - 1/s, -1 w.p. 1/(2s)}`` and
  ``s = sqrt(n)``; ``E[R R^T] = k I``, so ``W R / sqrt(k)`` keeps row norms and inner products in
  expectation (Johnson-Lindenstrauss) while ``R`` has only ``n k / s`` non-zeros. Used as the test matrix
  of a two-pass randomized range finder (Halko, Martinsson & Tropp, "Finding structure with randomness",
  SIAM Review 2011): ``Q = orth(W R)``, then the singular values of ``Q^T W`` approximate the top-k of W.

``blocks`` is a zero-argument callable returning a fresh iterable of row blocks (``(rows, n)`` tensors,
e.g. slices of a memory-mapped tensor moved to the device one at a time), so a pass can be repeated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WeightsmithError

Blocks = Callable[[], Iterable[Tensor]]


def row_blocks(W: Tensor, rows: int, device: torch.device | str | None = None) -> Blocks:
    """Row blocks of ``W`` (``rows`` at a time) copied to ``device`` in float32 one block at a time."""
    if rows < 1:
        raise WeightsmithError(f"rows per block must be at least 1, got {rows}")
    dev = torch.device(device) if device is not None else W.device

    def gen() -> Iterable[Tensor]:
        for i in range(0, W.shape[0], rows):
            yield W[i : i + rows].to(dev, torch.float32)

    return gen


@dataclass(frozen=True)
class StreamedNorm:
    """``lambda_max = ||W||_2^2`` and ``||W||_F^2`` from a stream, the top right singular vector and the
    passes it took (``converged`` when the relative change of ``lambda_max`` fell below ``tol``)."""

    lambda_max: float
    frobenius_sq: float
    vector: Tensor
    passes: int
    converged: bool

    @property
    def stable_rank(self) -> float:
        return self.frobenius_sq / self.lambda_max if self.lambda_max > 0 else math.nan


def _gram_pass(blocks: Blocks, V: Tensor, frobenius: bool = True) -> tuple[Tensor, Tensor, float]:
    """``W^T W V``, ``V^T W^T W V`` and (when ``frobenius``) ``||W||_F^2`` in one pass (float64 sums)."""
    out = torch.zeros_like(V, dtype=torch.float64)
    small = torch.zeros(V.shape[-1], V.shape[-1], dtype=torch.float64, device=V.device)
    fro = torch.zeros((), dtype=torch.float64, device=V.device)
    for X in blocks():
        xv = X @ V.to(X.dtype)
        out += (X.T @ xv).double()
        small += (xv.T @ xv).double()
        if frobenius:
            fro += torch.linalg.vector_norm(X, dtype=torch.float64).square()
    return out, small, float(fro)


def _start(n: int, cols: int, seed: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, cols, generator=g, dtype=torch.float64)).Q.to(device)


def _first(blocks: Blocks) -> Tensor:
    for X in blocks():
        return X
    raise WeightsmithError("the matrix stream is empty: no row blocks")


def streaming_power(
    blocks: Blocks, iters: int = 100, tol: float = 1e-6, block: int = 4, seed: int = 0
) -> StreamedNorm:
    """Top eigenvalue of ``W^T W`` by the block power method (subspace iteration with ``block``
    vectors and a Rayleigh-Ritz step), one pass over the row blocks per iteration. The error of
    ``lambda_max`` shrinks like ``(lambda_{block+1} / lambda_max)^(2 k)`` after ``k`` passes."""
    if iters < 1:
        raise WeightsmithError(f"iters {iters}: the streaming power method needs at least 1 pass")
    if block < 1:
        raise WeightsmithError(f"block {block}: the power method needs at least 1 vector")
    first = _first(blocks)
    V = _start(first.shape[1], min(block, *first.shape[-1:]), seed, first.device)
    lam, prev, fro = 0.0, None, 0.0
    for k in range(1, iters + 1):
        CV, small, f = _gram_pass(blocks, V, k == 1)  # small = V^T C V: Rayleigh-Ritz on span(V)
        fro = f if k == 1 else fro
        evals, evecs = torch.linalg.eigh(small)
        lam = float(evals[-1])
        top = V @ evecs[:, -1]
        if lam <= 0.0:
            return StreamedNorm(0.0, fro, top, k, True)
        if prev is not None and abs(lam - prev) <= tol * prev:
            return StreamedNorm(lam, fro, top, k, True)
        prev = lam
        V = torch.linalg.qr(CV).Q
    return StreamedNorm(lam, fro, top, iters, False)


def oja(
    W: Tensor,
    rows: int = 64,
    device: torch.device | str | None = None,
    passes: int = 1,
    c: float = 4.0,
    t0: float = 1.0,
    seed: int = 0,
) -> StreamedNorm:
    """Oja's rule on the rows of ``W`` in a seeded random order (``rows`` of them per step), then one
    in-order Rayleigh pass for ``lambda_max``.

    Step ``t`` uses ``X_t^T X_t v * (m / rows)``, an unbiased estimate of ``C v``, with
    ``eta_t = c / (lambda_hat (t + t0))``: ``lambda_hat`` is the largest Rayleigh quotient seen so far (it
    makes the rule scale-free). The defaults ``c = 4, t0 = 1`` were picked on spiked Gaussian matrices
    (1e-4 relative error of ``lambda_max`` in one pass; tests/analyze/test_sketch.py).
    """
    if passes < 1:
        raise WeightsmithError(f"passes {passes}: Oja's rule needs at least 1 pass over the stream")
    if rows < 1:
        raise WeightsmithError(f"rows per block must be at least 1, got {rows}")
    dev = torch.device(device) if device is not None else W.device
    m = W.shape[0]
    g = torch.Generator().manual_seed(seed)
    v = _start(W.shape[1], 1, seed, dev)[:, 0]
    scale = 1e-300
    t = 0
    for _ in range(passes):
        order = torch.randperm(m, generator=g)
        for i in range(0, m, rows):
            X = W[order[i : i + rows]].to(dev, torch.float32)
            cv = (X.T @ (X @ v.float())).double() * (m / X.shape[0])
            scale = max(scale, float(cv @ v))  # running estimate of lambda_max from below
            v = v + (c / (scale * (t + t0))) * cv
            v = v / v.norm()
            t += 1
    _, lam, fro = _gram_pass(row_blocks(W, rows, dev), v[:, None])
    return StreamedNorm(float(lam[0, 0]), fro, v, passes + 1, True)


def very_sparse_projection(
    n: int, k: int, s: float | None = None, seed: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Li, Hastie & Church's ``R`` (n x k) as a sparse COO tensor: ``+-sqrt(s)`` w.p. ``1/(2s)`` each."""
    if n < 1 or k < 1:
        raise WeightsmithError(f"a random projection needs n >= 1 and k >= 1, got n={n}, k={k}")
    s = math.sqrt(n) if s is None else s
    if not s >= 1:
        raise WeightsmithError(f"sparsity s {s}: must be at least 1 (s=1: dense +-1, s=3: Achlioptas)")
    g = torch.Generator().manual_seed(seed)
    nnz = int(torch.binomial(torch.tensor(float(n * k)), torch.tensor(1.0 / s), generator=g))
    flat = torch.randperm(n * k, generator=g)[:nnz] if n * k <= 1 << 24 else _distinct(n * k, nnz, g)
    signs = torch.randint(0, 2, (nnz,), generator=g).double() * 2 - 1
    idx = torch.stack([flat // k, flat % k])
    return torch.sparse_coo_tensor(
        idx, signs * math.sqrt(s), (n, k), device=device, check_invariants=False
    ).coalesce()


def _distinct(total: int, count: int, g: torch.Generator) -> Tensor:
    """``count`` distinct integers below ``total`` without a permutation of all of them."""
    picked = torch.unique(torch.randint(0, total, (int(count * 1.1) + 16,), generator=g))
    while picked.numel() < count:
        extra = torch.randint(0, total, (count,), generator=g)
        picked = torch.unique(torch.cat([picked, extra]))
    return picked[torch.randperm(picked.numel(), generator=g)[:count]]


def sketch(blocks: Blocks, R: Tensor) -> Tensor:
    """``W R / sqrt(k)`` (m x k), one pass: row norms and inner products kept in expectation."""
    parts = [torch.sparse.mm(R.t(), X.T.double()).t() for X in blocks()]
    return torch.cat(parts) / math.sqrt(R.shape[1])


def sketched_singular_values(
    blocks: Blocks, k: int = 32, power_iters: int = 1, seed: int = 0, s: float | None = None
) -> Tensor:
    """Approximate top-``k`` singular values of W: range finder with a very sparse test matrix, then
    the exact singular values of ``Q^T W`` (2 + 2 * ``power_iters`` passes)."""
    first = _first(blocks)
    R = very_sparse_projection(first.shape[1], k, s, seed, first.device)
    Y = sketch(blocks, R)
    for _ in range(power_iters):  # Y <- W (W^T Q): sharpens the decay of the spectrum
        Q = torch.linalg.qr(Y).Q
        Z = _left_product(blocks, Q)
        Y = torch.cat([X.double() @ Z.T for X in blocks()])
    Q = torch.linalg.qr(Y).Q
    return torch.linalg.svdvals(_left_product(blocks, Q))


def _left_product(blocks: Blocks, Q: Tensor) -> Tensor:
    """``Q^T W`` (k x n) accumulated over the row blocks."""
    out, i = None, 0
    for X in blocks():
        part = Q[i : i + X.shape[0]].T @ X.double()
        out = part if out is None else out + part
        i += X.shape[0]
    assert out is not None
    return out


def streamed_norm_metrics(
    W: Tensor,
    device: torch.device | str | None = None,
    max_block_bytes: int = 1 << 28,
    iters: int = 100,
    tol: float = 1e-7,
) -> dict[str, float | int | bool]:
    """The norm metrics of ``analyze`` that need no full spectrum, under the same names (``lambda_max``,
    ``norm``, ``log_norm``, ``log_spectral_norm``, ``stable_rank``), for a matrix streamed to ``device``
    in row blocks of at most ``max_block_bytes`` (float32): the memory held is one block plus
    ``W.shape[1] x 4`` vectors, whatever the size of W."""
    if W.dim() != 2:
        raise WeightsmithError(f"streamed norm metrics need a 2-D matrix, got shape {list(W.shape)}")
    rows = max(1, max_block_bytes // (4 * W.shape[1]))
    res = streaming_power(row_blocks(W, rows, device), iters=iters, tol=tol)
    lam, fro = res.lambda_max, res.frobenius_sq
    return {
        "lambda_max": lam,
        "norm": fro,
        "log_norm": math.log10(fro) if fro > 0 else math.nan,
        "log_spectral_norm": math.log10(lam) if lam > 0 else math.nan,
        "stable_rank": res.stable_rank,
        "spectral_passes": res.passes,
        "spectral_converged": res.converged,
    }
