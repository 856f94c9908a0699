"""CUR-style low-rank compression: keep ``k`` actual columns of ``W`` chosen by volume sampling (a k-DPP).

Deshpande, Rademacher, Vempala & Wang, "Matrix approximation and projective clustering via volume
sampling", SODA 2006: pick a set S of k columns with probability proportional to their squared volume,

    P(S) = det(W_Sᵀ W_S) / Σ_{|T|=k} det(W_Tᵀ W_T) = det(L_S) / e_k(σ²),    L = WᵀW,

and keep ``Ŵ = C C⁺ W`` (``C = W[:, S]``; the CX form of a CUR decomposition, the best Ŵ with columns in
span C). Then (Thm. 1.3) ``E ‖W − C C⁺ W‖_F² = (k + 1) e_{k+1}(σ²) / e_k(σ²) ≤ (k + 1) ‖W − W_k‖_F²``, where
``e_j`` is the j-th elementary symmetric polynomial of the squared singular values and ``W_k`` the truncated
SVD. Volume sampling is the k-DPP with kernel L, sampled exactly by the spectral algorithm of Kulesza &
Taskar ("k-DPPs: Fixed-size determinantal point processes", ICML 2011, Alg. 1 and 8): choose k eigenvectors
of L (eigenvector n with the ratio of elementary symmetric polynomials), then k columns one by one from the
projection DPP they span (each conditional by a rank-one Schur-complement update, O(n k) per column).
``selection="pivoted-qr"`` is the deterministic greedy volume maximiser (column-pivoted QR; Businger &
Golub, "Linear least squares solutions by Householder transformations", 1965). Stored as ``A = C``
[out, k], ``B = C⁺ W`` [k, in]: ``k (out + in)`` numbers, as for rank-k SVD.

By Eckart-Young no choice of columns can beat the truncated SVD's Frobenius error at equal rank; what CUR
offers is factors made of the layer's own columns (sparse/interpretable ``C``). docs/components.md measures
the gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import scipy.linalg
import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._lowrank import LowRankConfig, LowRankWeight, Weighting

SELECTIONS = ("volume", "pivoted-qr")


def log_elementary_symmetric(lam: Tensor, k: int) -> Tensor:
    """``log e_l(λ_1..λ_m)`` for l = 0..k, m = 0..n as a [k + 1, n + 1] float64 table (−inf where zero)."""
    n = lam.numel()
    logl = torch.log(lam.double().clamp_min(0))
    E = torch.full((k + 1, n + 1), -math.inf, dtype=torch.float64)
    E[0] = 0.0
    for m in range(1, n + 1):
        E[1:, m] = torch.logaddexp(E[1:, m - 1], logl[m - 1] + E[:-1, m - 1])
    return E


def kdpp_sample(W: Tensor, k: int, g: torch.Generator) -> list[int]:
    """k column indices of ``W`` with ``P(S) ∝ det(W_Sᵀ W_S)`` (exact; module docstring)."""
    _, S, Vh = torch.linalg.svd(W.detach().double().cpu(), full_matrices=False)  # the sampler runs on the CPU
    lam, V = S**2, Vh.T  # eigenpairs of L = WᵀW (the zero ones never get picked)
    if k > int((lam > lam[0] * 1e-24).sum()):
        raise WeightsmithError(f"volume sampling: k={k} exceeds the matrix rank")
    E = log_elementary_symmetric(lam, k)
    chosen, left = [], k
    for m in range(lam.numel(), 0, -1):  # Kulesza & Taskar, Alg. 8
        if left == 0:
            break
        p = math.exp(float(torch.log(lam[m - 1]) + E[left - 1, m - 1] - E[left, m]))
        if float(torch.rand((), generator=g, dtype=torch.float64)) < p:
            chosen.append(m - 1)
            left -= 1
    Vs = V[:, chosen]  # [n, k], orthonormal: the projection DPP with kernel K = Vs Vsᵀ
    d = (Vs**2).sum(1)  # P(i | picked) ∝ K_ii − K_iY K_YY⁻¹ K_Yi, updated as an incomplete Cholesky of K
    rows = torch.zeros(len(chosen), d.numel(), dtype=d.dtype)
    picked: list[int] = []
    for t in range(len(chosen)):
        i = int(torch.multinomial(d.clamp_min(0) / d.clamp_min(0).sum(), 1, generator=g))
        picked.append(i)
        c = (Vs @ Vs[i] - rows[:t].T @ rows[:t, i]) / d[i].sqrt()
        rows[t] = c
        d = d - c**2
        d[i] = 0.0
    return sorted(picked)


def pivoted_qr_columns(W: Tensor, k: int) -> list[int]:
    """The first k pivots of the column-pivoted QR of W (greedy largest remaining volume)."""
    piv = scipy.linalg.qr(W.double().cpu().numpy(), pivoting=True, mode="r")[1]
    return sorted(int(p) for p in piv[:k])


def column_factors(W: Tensor, cols: Sequence[int]) -> LowRankWeight:
    """``A = C = W[:, cols]``, ``B = C⁺ W`` (least squares in float64): ``Ŵ = C C⁺ W``."""
    Wd = W.double()
    C = Wd[:, list(cols)]
    X = torch.linalg.lstsq(C, Wd, driver="gelsd" if not Wd.is_cuda else None).solution
    return LowRankWeight(C.to(W.dtype).contiguous(), X.to(W.dtype).contiguous())


def cur_factors(W: Tensor, k: int, selection: str = "volume", seed: int = 0) -> LowRankWeight:
    """Rank-``k`` CX factors of ``W`` with columns chosen by ``selection``."""
    if selection == "volume":
        cols = kdpp_sample(W, k, torch.Generator().manual_seed(int(seed)))
    else:
        cols = pivoted_qr_columns(W, k)
    return column_factors(W, cols)


@register_config("cur", kind="compress")
class CUR(LowRankConfig):
    """Column selection (``selection``: "volume" = k-DPP volume sampling, "pivoted-qr"), ranks as SVD's
    (``keep``/``rank``; ``allocation="global"`` spends the budget by singular-value energy as for SVD)."""

    selection: str = "volume"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise WeightsmithError(
                f"cur option selection={self.selection!r}: use one of {', '.join(SELECTIONS)}"
            )

    def factor(self, W: Tensor, weighting: Weighting, rank: int, index: int) -> LowRankWeight:
        """CX factors of ``W`` (unweighted: CUR keeps real columns), a new draw per layer."""
        return cur_factors(W, rank, self.selection, self.seed + index)
