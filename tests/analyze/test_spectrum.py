"""ESD, norm metrics, effective rank and the Marchenko-Pastur fit, on cases worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.analyze import effective_rank, esd, marchenko_pastur_fit, norm_metrics
from weightsmith.analyze.mp import _kde


def test_esd_is_the_squared_singular_values_for_both_orientations() -> None:
    W = torch.randn(3, 40, 90, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.svdvals(W.double()) ** 2
    torch.testing.assert_close(esd(W), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(esd(W.mT), ref, rtol=1e-5, atol=1e-8)


def test_norm_metrics_by_hand() -> None:
    # W = diag(4, 2, 1): lambda = 16, 4, 1
    evals = torch.tensor([[16.0, 4.0, 1.0]], dtype=torch.float64)
    m = norm_metrics(evals, torch.tensor([3.0], dtype=torch.float64))
    assert float(m["log_norm"]) == pytest.approx(math.log10(21))
    assert float(m["log_spectral_norm"]) == pytest.approx(math.log10(16))
    assert float(m["stable_rank"]) == pytest.approx(21 / 16)
    assert float(m["alpha_weighted"]) == pytest.approx(3 * math.log10(16))
    assert float(m["log_alpha_norm"]) == pytest.approx(math.log10(16**3 + 4**3 + 1))
    p = torch.tensor([4.0, 2.0, 1.0]) / 7  # Roy & Vetterli: p_i = sigma_i / sum(sigma)
    assert float(m["effective_rank"]) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)


def test_effective_rank_extremes() -> None:
    assert float(effective_rank(torch.eye(7))) == pytest.approx(7.0)
    rank1 = torch.outer(torch.arange(1.0, 6.0), torch.ones(4))
    assert float(effective_rank(rank1)) == pytest.approx(1.0, abs=1e-3)
    assert float(effective_rank(torch.zeros(4, 4))) == 0.0


def test_kde_prefix_sum_equals_the_direct_sum() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.rand(2, 300, generator=g, dtype=torch.float64) * 3
    data[0, :4] = 1.5  # ties with an evaluation point
    x = torch.linspace(0, 3.5, 500, dtype=torch.float64).expand(2, -1).clone()
    x[0, 7] = 1.5
    direct = (1 - (x[:, :, None] - data[:, None, :]).abs() / 0.1).clamp_min(0).sum(-1) / (300 * 0.1)
    torch.testing.assert_close(_kde(x, data, 0.1), direct)


def test_mp_fit_on_noise_finds_the_bulk_and_planted_spikes() -> None:
    g = torch.Generator().manual_seed(2)
    N, M = 800, 200
    W = torch.randn(3, M, N, generator=g, dtype=torch.float64)
    fit = marchenko_pastur_fit(esd(W), N, M)
    # Rescaled to mean 1, the bulk edge of pure noise is (1 + 1/sqrt(Q))^2 = 2.25 = lambda_max.
    assert torch.allclose(fit.mp_softrank, torch.ones(3, dtype=torch.float64), atol=0.1)
    assert int(fit.num_spikes.max()) <= 1
    spikes = torch.randn(M, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, N, generator=g, dtype=torch.float64
    )
    fit2 = marchenko_pastur_fit(esd((W[0] + spikes)[None]), N, M)
    assert int(fit2.num_spikes[0]) == 3
    assert float(fit2.mp_softrank[0]) < 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_eigenvalues_are_squared_singular_values_for_any_layout(dtype: torch.dtype) -> None:
    from weightsmith.linalg import gram_eigvalsh

    g = torch.Generator().manual_seed(3)
    W = torch.randn(3, 40, 70, generator=g, dtype=torch.float64)
    ref = torch.linalg.svdvals(W) ** 2
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for A in (W, W.mT, W.mT.contiguous(), W[:, :, ::2]):  # wide, tall (strided view), tall, non-contiguous
        ev = gram_eigvalsh(A, dtype)
        want = ref if A.shape[-1] == 70 or A.shape[-2] == 70 else torch.linalg.svdvals(A) ** 2
        assert ev.dtype == dtype and ev.shape == want.shape
        assert torch.allclose(ev.double(), want, rtol=0, atol=tol * float(want.max()))
    bad = W.clone()
    bad[1, 2, 3] = float("inf")
    ev = gram_eigvalsh(bad, dtype)
    assert ev[1].isnan().all() and not ev[[0, 2]].isnan().any()
