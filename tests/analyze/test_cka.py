"""Linear CKA against the HSIC closed form and its invariances (Kornblith et al., ICML 2019)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.analyze.cka import linear_cka
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _hsic_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The n x n Gram-matrix form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)/(n-1)^2."""
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = X.double() @ X.double().T, Y.double() @ Y.double().T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.trace(a @ H @ b @ H)) / (n - 1) ** 2

    return hsic(K, L) / (hsic(K, K) * hsic(L, L)) ** 0.5


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 5, generator=g)
    Y = X @ torch.randn(5, 7, generator=g) + 0.5 * torch.randn(30, 7, generator=g)
    return X, Y


def test_equals_the_hsic_closed_form() -> None:
    X, Y = _pair()
    assert linear_cka(X, Y) == pytest.approx(_hsic_cka(X, Y), rel=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-12)
    # a hand-sized case: 3 examples, 1 feature each, y = -2x + 1: perfectly (anti)correlated -> 1
    assert linear_cka(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[1.0], [-1.0], [-3.0]])) == 1.0


def test_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_general_linear_maps() -> None:
    X, Y = _pair(1)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(2)))
    base = linear_cka(X, Y)
    assert linear_cka(X, Y @ Q) == pytest.approx(base, rel=1e-5)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, rel=1e-5)
    assert linear_cka(X + 5.0, Y - 2.0) == pytest.approx(base, rel=1e-5)  # centring
    A = torch.diag(torch.tensor([10.0, 1.0, 0.1, 1.0, 1.0]))
    assert abs(linear_cka(X @ A, Y) - base) > 1e-3


def test_independent_noise_is_dissimilar_and_bad_inputs_raise() -> None:
    g = torch.Generator().manual_seed(3)
    assert linear_cka(torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)) < 0.02
    with pytest.raises(WeightsmithError, match="same examples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(WeightsmithError, match="constant"):
        linear_cka(torch.ones(4, 2), torch.randn(4, 2))
