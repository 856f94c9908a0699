"""Randomised sketches for tall least-squares problems ``min_X ‖A X − B‖_F`` (A [m, d], m ≫ d).

A sketch ``S`` [s, m] (s ≪ m) is a subspace embedding when ``‖S A x‖ = (1 ± ε) ‖A x‖`` for all x. Three are
here, applied to the rows of a matrix (the same ``S`` to A and B by sketching ``[A B]`` at once):

* Gaussian: ``S = G / √s``, G i.i.d. N(0, 1); O(s m d).
* SRHT (subsampled randomised Hadamard transform): ``S = √(m'/s) P H D``, D random signs, H the orthonormal
  Walsh-Hadamard matrix of size m' = 2^⌈log2 m⌉ (rows zero-padded), P picks s rows without replacement
  (Ailon & Chazelle, "The fast Johnson-Lindenstrauss transform", STOC 2006; Tropp, "Improved analysis of
  the subsampled randomized Hadamard transform", 2011); O(m' d log m').
* CountSketch: every row of A is added, with a random sign, to one of s random buckets (Clarkson &
  Woodruff, "Low rank approximation and regression in input sparsity time", STOC 2013); O(m d).

Solvers:

* :func:`sketch_and_solve`: ``X' = argmin ‖S (A X − B)‖`` (Sarlós, "Improved approximation algorithms for
  large matrices via random projections", FOCS 2006): ``‖A X' − B‖ ≤ (1 + ε) ‖A X* − B‖`` and, for
  SRHT/Gaussian sketches of ``s = O(d^{1+γ} / ε²)`` rows, the ℓ∞ bound of Price, Song & Woodruff ("Fast
  regression with an ℓ∞ guarantee", ICALP 2017, Thm. 1.2)

      |x'_i − x*_i| ≤ (ε / √d) · ‖A x* − b‖₂ · ‖A⁺‖₂     for every coordinate i,

  i.e. the ℓ2 error ``ε ‖A x* − b‖ ‖A⁺‖`` is spread evenly over the d coordinates. For a Gaussian sketch the
  error is exactly ``E ‖x' − x*‖² = ‖A x* − b‖² tr((AᵀA)⁻¹) / (s − d − 1)`` (inverse-Wishart mean), which
  the tests check.
* :func:`sketch_preconditioned_lsq`: ``S A = Q R``, then CGLS (LSQR's mathematical twin) on the
  well-conditioned ``A R⁻¹`` (κ ≤ (1+ε)/(1−ε)), started at the sketch-and-solve point: converges to the
  exact solution in a few iterations (Rokhlin & Tygert, "A fast randomized algorithm for overdetermined
  linear least-squares regression", PNAS 2008; Avron, Maymounkov & Toledo, "Blendenpik", SISC 2010).

The last ``keep`` rows of A and B are never sketched (e.g. ridge rows ``√λ I``): ``S`` is then
``blockdiag(S', I)``, still an embedding. Everything runs in the input's dtype (use float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SKETCHES = ("gaussian", "srht", "countsketch")


def fwht(X: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform of the rows: ``H X / √n``, H Sylvester's [n, n] (n = 2^p)."""
    n = X.shape[0]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two number of rows, got {n}")
    Y = X.reshape(n, -1).clone()
    h = 1
    while h < n:  # butterflies in place: (a, b) -> (a + b, a - b)
        V = Y.view(n // (2 * h), 2, h, -1)
        a = V[:, 0].clone()
        V[:, 0].add_(V[:, 1])
        V[:, 1].sub_(a).neg_()
        h *= 2
    return Y.div_(math.sqrt(n)).reshape(X.shape)


def gaussian_sketch(M: Tensor, s: int, g: torch.Generator) -> Tensor:
    S = torch.randn(s, M.shape[0], generator=g, dtype=M.dtype) / math.sqrt(s)
    return S.to(M.device) @ M


def srht_sketch(M: Tensor, s: int, g: torch.Generator) -> Tensor:
    m = M.shape[0]
    mp = 1 << max(0, (m - 1).bit_length())
    signs = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(M)
    padded = torch.zeros(mp, *M.shape[1:], dtype=M.dtype, device=M.device)
    padded[:m] = M * signs.view(-1, *[1] * (M.dim() - 1))
    rows = torch.randperm(mp, generator=g)[:s].to(M.device)
    return fwht(padded)[rows] * math.sqrt(mp / s)


def countsketch(M: Tensor, s: int, g: torch.Generator) -> Tensor:
    m = M.shape[0]
    bucket = torch.randint(0, s, (m,), generator=g).to(M.device)
    signs = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(M)
    out = torch.zeros(s, *M.shape[1:], dtype=M.dtype, device=M.device)
    return out.index_add_(0, bucket, M * signs.view(-1, *[1] * (M.dim() - 1)))


_KINDS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian": gaussian_sketch,
    "srht": srht_sketch,
    "countsketch": countsketch,
}


def sketch_rows(M: Tensor, s: int, kind: str = "srht", seed: int = 0, keep: int = 0) -> Tensor:
    """``S M`` for a fresh sketch ``S`` of ``s`` rows of kind ``kind``; the last ``keep`` rows pass as is."""
    if kind not in _KINDS:
        raise ValueError(f"unknown sketch {kind!r}: use one of {', '.join(SKETCHES)}")
    g = torch.Generator().manual_seed(int(seed))
    top = M[: M.shape[0] - keep]
    return torch.cat([_KINDS[kind](top, s, g), M[M.shape[0] - keep :]])


def sketch_and_solve(
    A: Tensor, B: Tensor, s: int, kind: str = "srht", seed: int = 0, keep: int = 0
) -> Tensor:
    """``argmin_X ‖S (A X − B)‖_F`` (module docstring): [d, k] for A [m, d], B [m, k]."""
    SAB = sketch_rows(torch.cat([A, B], 1), s, kind, seed, keep)
    d = A.shape[1]
    return torch.linalg.lstsq(SAB[:, :d], SAB[:, d:]).solution


def sketch_preconditioned_lsq(
    A: Tensor,
    B: Tensor,
    s: int,
    kind: str = "srht",
    seed: int = 0,
    keep: int = 0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[Tensor, int]:
    """The exact ``argmin_X ‖A X − B‖_F`` by CGLS on ``A R⁻¹`` (``S A = Q R``), every column of B at once;
    returns ``(X, iterations)``. Stops when every column's ``‖(A R⁻¹)ᵀ r‖ ≤ tol ‖r‖`` (LSQR's test with
    ``‖A R⁻¹‖ ≈ 1``) or when ``r`` vanishes. ``A`` must have full column rank (``S A`` does then too)."""
    SAB = sketch_rows(torch.cat([A, B], 1), s, kind, seed, keep)
    d = A.shape[1]
    Q, R = torch.linalg.qr(SAB[:, :d])

    def rinv(Y: Tensor) -> Tensor:  # R⁻¹ Y
        return torch.linalg.solve_triangular(R, Y, upper=True)

    def rinv_t(Y: Tensor) -> Tensor:  # R⁻ᵀ Y
        return torch.linalg.solve_triangular(R.T, Y, upper=False)

    Y = Q.T @ SAB[:, d:]  # the sketch-and-solve point, in y = R x
    Rres = B - A @ rinv(Y)
    Sg = rinv_t(A.T @ Rres)
    P = Sg.clone()
    gamma = (Sg * Sg).sum(0)
    tiny = torch.finfo(A.dtype).tiny
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        rn = (Rres * Rres).sum(0)
        if bool((gamma <= (tol**2) * rn + tiny).all()):
            it -= 1
            break
        Qp = A @ rinv(P)
        alpha = gamma / (Qp * Qp).sum(0).clamp_min(tiny)
        Y = Y + alpha * P
        Rres = Rres - alpha * Qp
        Sg = rinv_t(A.T @ Rres)
        g_new = (Sg * Sg).sum(0)
        P = Sg + (g_new / gamma.clamp_min(tiny)) * P
        gamma = g_new
    return rinv(Y), it
