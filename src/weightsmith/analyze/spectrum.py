"""Empirical spectral density (ESD) of weight matrices and the norm metrics read from it.

Martin & Mahoney, "Implicit self-regularization in deep neural networks: evidence from random matrix
theory and implications for learning", JMLR 22, 2021 (arXiv:1810.01075), and Martin, Peng & Mahoney,
"Predicting trends in the quality of state-of-the-art neural networks without access to training or
testing data", Nature Communications 12, 2021 (arXiv:2002.06716).

The ESD of an N x M weight ``W`` (N >= M) is the set of eigenvalues ``lambda_i = sigma_i^2`` of the
correlation matrix ``X = W^T W``. WeightWatcher 0.7.x does not divide by N (its ``normalize`` option
is off and its ``/N`` line is commented out), so neither do we: ``log_norm = log10 sum(lambda)`` is
``log10 ||W||_F^2`` and ``log_spectral_norm = log10 lambda_max`` is ``log10 ||W||_2^2``.

The entropy effective rank is Roy & Vetterli, "The effective rank: a measure of effective
dimensionality", EUSIPCO 2007: ``exp(-sum p_i ln p_i)`` with ``p_i = sigma_i / sum(sigma)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import gram_eigvalsh


def esd(W: Tensor, dtype: torch.dtype = torch.float64, streams: int = 1) -> Tensor:
    """Eigenvalues of ``W^T W`` for a batch ``(..., m, n)``, descending, shape ``(..., min(m, n))``.

    The Gram matrix of the smaller side is formed and diagonalised in ``dtype`` (float64 by default:
    exact to round-off against WeightWatcher's float64 SVD on CPU) by ``linalg.gram_eigvalsh``, several
    times faster than an SVD; a matrix with NaN/Inf entries gets a row of NaN.
    """
    return gram_eigvalsh(W, dtype, streams)


def norm_metrics(evals: Tensor, alpha: Tensor) -> dict[str, Tensor]:
    """Per-spectrum norm metrics from descending eigenvalues ``(B, M)`` and fitted ``alpha`` ``(B,)``."""
    norm = evals.sum(-1)
    lam_max = evals[..., 0]
    log_spectral_norm = torch.log10(lam_max)
    sv = evals.sqrt()
    p = sv / sv.sum(-1, keepdim=True)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    a = alpha[..., None].nan_to_num(0.0)
    log_alpha_norm = torch.log10(torch.where(evals > 0, evals.clamp_min(1e-300) ** a, 0.0).sum(-1))
    return {
        "norm": norm,
        "log_norm": torch.log10(norm),
        "spectral_norm": lam_max,
        "log_spectral_norm": log_spectral_norm,
        "alpha_weighted": alpha * log_spectral_norm,
        "log_alpha_norm": torch.where(alpha.isnan(), alpha, log_alpha_norm),
        "stable_rank": norm / lam_max,
        "effective_rank": torch.exp(entropy),
    }


def effective_rank(W: Tensor) -> Tensor:
    """Roy & Vetterli's entropy effective rank of a batch of matrices (0 for an all-zero matrix)."""
    sv = esd(W).sqrt()
    total = sv.sum(-1, keepdim=True)
    p = sv / total.clamp_min(torch.finfo(sv.dtype).tiny)
    h = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    return torch.where(total[..., 0] > 0, torch.exp(h), torch.zeros_like(h))
