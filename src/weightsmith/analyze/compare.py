"""How a fine-tuned weight matrix differs from its base: intruder dimensions and subspace drift.

Shuttleworth, Andreas, Torralba & Sharma, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228 (2024; NeurIPS 2025), Definition 1: a singular vector ``y_j`` of the fine-tuned matrix
is an *intruder dimension* iff ``max_i |cos(y_j, x_i)| < epsilon`` over every singular vector ``x_i``
of the base matrix. As in the authors' code, the vectors are the left singular vectors, the cosine is
taken in absolute value, the maximum runs over all min(m, n) base vectors, and only the top ``k``
fine-tuned vectors are examined (k = 10, epsilon = 0.5 by default).

Beside the count we report the share of the fine-tuned matrix's energy (squared singular values)
carried by the intruders, the max-|cos| profile of the top-k vectors, the overlap of the top-k left
singular subspaces (mean squared cosine of their principal angles: 1 = same subspace, k/m on average
for unrelated random ones), the relative norm of the update ``||W1 - W0||_F / ||W0||_F`` and the
entropy effective rank (Roy & Vetterli, 2007) of the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import as_compute, svd
from .spectrum import effective_rank


@dataclass(frozen=True)
class Comparison:
    """Batched results; every field has the batch as its first dimension."""

    num_intruders: Tensor  # (B,) intruders among the top-k fine-tuned singular vectors
    intruder_energy: Tensor  # (B,) sum of their sigma^2 over ||W1||_F^2
    max_cos: Tensor  # (B, k) largest |cos| of each top-k fine-tuned vector with any base vector
    subspace_overlap: Tensor  # (B,) mean cos^2 of the principal angles between top-k subspaces
    relative_norm: Tensor  # (B,) ||W1 - W0||_F / ||W0||_F
    delta_effective_rank: Tensor  # (B,) entropy effective rank of W1 - W0


def intruder_dimensions(
    W0: Tensor, W1: Tensor, k: int = 10, epsilon: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, energy share, max-|cos| profile)`` of intruders in ``W1`` relative to ``W0``.

    Batched over leading dimensions; ``k`` is capped at min(m, n).
    """
    U0, _, _ = svd(W0)
    U1, S1, _ = svd(W1)
    k = min(k, U1.shape[-1])
    cos = (U1[..., :k].mT @ U0).abs()  # (..., k, r): |cos| of each top-k tuned vector with each base vector
    max_cos = cos.amax(-1)
    intruder = max_cos < epsilon
    energy = S1.double() ** 2
    share = (energy[..., :k] * intruder).sum(-1) / energy.sum(-1).clamp_min(torch.finfo(energy.dtype).tiny)
    return intruder.sum(-1), share, max_cos


def subspace_overlap(W0: Tensor, W1: Tensor, k: int = 10) -> Tensor:
    """Mean squared cosine of the principal angles between the top-k left singular subspaces."""
    U0, _, _ = svd(W0)
    U1, _, _ = svd(W1)
    k = min(k, U0.shape[-1])
    cos = torch.linalg.svdvals(U0[..., :k].mT @ U1[..., :k]).clamp(0, 1)
    return (cos**2).mean(-1)


def compare_matrices(W0: Tensor, W1: Tensor, k: int = 10, epsilon: float = 0.5) -> Comparison:
    """All comparison metrics for a batch of same-shaped pairs ``(B, m, n)``, with one SVD of each."""
    if W0.shape != W1.shape:
        raise ValueError(f"shapes differ: {tuple(W0.shape)} vs {tuple(W1.shape)}")
    W0f = as_compute(W0)
    W1f = as_compute(W1)
    U0, _, _ = svd(W0f)
    U1, S1, _ = svd(W1f)
    kk = min(k, U1.shape[-1])
    max_cos = (U1[..., :kk].mT @ U0).abs().amax(-1)
    intruder = max_cos < epsilon
    energy = S1.double() ** 2
    share = (energy[..., :kk] * intruder).sum(-1) / energy.sum(-1).clamp_min(torch.finfo(energy.dtype).tiny)
    cos = torch.linalg.svdvals(U0[..., :kk].mT @ U1[..., :kk]).clamp(0, 1)
    delta = W1f.double() - W0f.double()
    base_norm = torch.linalg.matrix_norm(W0f.double())
    rel = torch.linalg.matrix_norm(delta) / base_norm.clamp_min(torch.finfo(torch.float64).tiny)
    return Comparison(
        num_intruders=intruder.sum(-1),
        intruder_energy=share,
        max_cos=max_cos,
        subspace_overlap=(cos**2).mean(-1),
        relative_norm=rel,
        delta_effective_rank=effective_rank(delta),
    )
