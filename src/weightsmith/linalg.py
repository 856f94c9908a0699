"""The numerics policy, in one place.

SVDs, eigendecompositions and projections run in float32 (float64 where asked) on the tensor's device
and results are cast back by the caller. Economy SVD is used wherever exact results allow it;
randomized SVD only where an approximation is acceptable and says so.
"""

from __future__ import annotations

import math

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
        m, n = W.shape[-2:]
        G = W.double()
        G = G @ G.mT if m <= n else G.mT @ G
        ev = torch.linalg.eigvalsh(G).clamp_min(0).flip(-1)
        return ev.sqrt().to(W.dtype)
    return torch.linalg.svdvals(W)


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


def orthonormal_columns(A: Tensor) -> Tensor:
    """An orthonormal basis of A's column space via reduced QR (sign-fixed so diag(R) > 0)."""
    Q, R = torch.linalg.qr(as_compute(A))
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return Q * signs.unsqueeze(-2)


def dct_matrix(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = COMPUTE_DTYPE
) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` (n x n) with ``C @ C.T = I``; row k is the k-th cosine."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    C = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C.to(dtype)


def principal_angles_cos(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of A and B (descending)."""
    return torch.linalg.svdvals(orthonormal_columns(A).mT @ orthonormal_columns(B)).clamp(0, 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
