"""Linear centred kernel alignment (CKA) between two representations of the same examples.

Kornblith, Norouzi, Lee & Hinton, "Similarity of neural network representations revisited", ICML 2019
(arXiv:1905.00414), eq. (5) for the linear kernel: with ``X`` (n x p1) and ``Y`` (n x p2) the
representations of the same n examples, each column centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),

which equals ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for ``K = X X^T``, ``L = Y Y^T`` and
``HSIC(K, L) = tr(K H L H) / (n - 1)^2``, ``H = I - 11^T / n``. It lies in [0, 1], is invariant to
orthogonal transforms and isotropic scaling of either representation, and not to general invertible
linear maps. Yang et al. (NeurIPS 2021) use it to tell whether models trained from different seeds
learn similar functions (their phases IV-A and IV-B). The feature form above costs O(n p^2), never
forming the n x n Gram matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import WeightsmithError


def linear_cka(X: Tensor, Y: Tensor) -> float:
    """Linear CKA of ``X`` (n x p1) and ``Y`` (n x p2), rows the same examples; computed in float64."""
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise WeightsmithError(
            f"linear CKA needs two 2-D representations of the same examples, got shapes "
            f"{list(X.shape)} and {list(Y.shape)}"
        )
    if X.shape[0] < 2:
        raise WeightsmithError(f"linear CKA needs at least 2 examples, got {X.shape[0]}")
    x = X.double() - X.double().mean(0)
    y = Y.double() - Y.double().mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(denom) == 0.0:
        raise WeightsmithError("linear CKA is undefined: a representation is constant over the examples")
    return float(cross / denom)
