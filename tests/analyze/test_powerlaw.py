"""The power-law fit against WeightWatcher's own fitter and against known exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightsmith.analyze import alpha_at_quantile, fit_power_law


def _pareto(n: int, alpha: float, seed: int) -> torch.Tensor:
    """Exact Pareto samples with density ~ x^-alpha on x >= 1 (inverse CDF)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_weightwatcher_fitter_exactly(seed: int) -> None:
    from weightwatcher.WW_powerlaw import WWFit

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(120, 300, generator=g, dtype=torch.float64)
    X[:, :3] *= 8  # a few spikes so the tail is not pure noise
    evals = torch.linalg.svdvals(X) ** 2
    ours = fit_power_law(evals)
    ref = WWFit(np.sort(evals.numpy()))
    assert float(ours.alpha) == pytest.approx(ref.alpha, rel=1e-10)
    assert float(ours.xmin) == pytest.approx(ref.xmin, rel=1e-12)
    assert float(ours.D) == pytest.approx(ref.D, rel=1e-9)
    assert float(ours.sigma) == pytest.approx(ref.sigma, rel=1e-9)
    assert int(ours.num_pl_spikes) == len(ref.data)


def test_recovers_a_known_exponent() -> None:
    x = _pareto(4000, 2.5, seed=3)
    fit = fit_power_law(x)
    assert float(fit.alpha) == pytest.approx(2.5, abs=3 * float(fit.sigma) + 0.05)


def test_batched_rows_equal_single_fits_and_zeros_are_ignored() -> None:
    rows = torch.stack([_pareto(300, a, seed=i) for i, a in enumerate((2.2, 3.0, 4.5))])
    rows[1, :40] = 0.0  # below the 1e-5 threshold: not candidates, not data
    batched = fit_power_law(rows)
    for i in range(3):
        single = fit_power_law(rows[i][rows[i] > 1e-5])
        assert float(batched.alpha[i]) == pytest.approx(float(single.alpha), rel=1e-12)
        assert float(batched.xmin[i]) == float(single.xmin)


def test_subsampled_candidates_stay_close_to_the_exact_scan() -> None:
    x = _pareto(3000, 3.0, seed=5)
    exact, coarse = fit_power_law(x), fit_power_law(x, max_candidates=256)
    assert float(coarse.D) >= float(exact.D)  # the exact scan's minimum cannot be beaten
    assert float(coarse.alpha) == pytest.approx(float(exact.alpha), rel=0.1)


def test_a_single_positive_eigenvalue_gives_nan() -> None:
    fit = fit_power_law(torch.tensor([0.0] * 50 + [8.0], dtype=torch.float64))
    assert math.isnan(float(fit.alpha)) and math.isnan(float(fit.xmin))


@pytest.mark.parametrize("n", [2, 5, 7, 8, 9, 12, 19])
def test_short_spectra_match_weightwatchers_small_sample_fit(n: int) -> None:
    """Below 20 positive eigenvalues WeightWatcher switches to its bias-corrected small-sample fit."""
    import contextlib
    import io

    from weightwatcher.WW_powerlaw import WWFit

    x = torch.cat([torch.zeros(30, dtype=torch.float64), _pareto(n, 3.0, seed=n)])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "SMALL N PL FIT"
        ref = WWFit(x[x > 1e-5].numpy())
    batch = fit_power_law(torch.stack([x, torch.cat([x[1:], x[:1]])]))  # rows are fitted alone
    for row in range(2):
        assert float(batch.alpha[row]) == pytest.approx(ref.alpha, rel=1e-9, abs=1e-12)
        assert float(batch.xmin[row]) == pytest.approx(ref.xmin, rel=1e-12)
        assert float(batch.D[row]) == pytest.approx(ref.D, rel=1e-9)
        assert float(batch.sigma[row]) == pytest.approx(ref.sigma, rel=1e-9, abs=1e-12)
        assert int(batch.num_pl_spikes[row]) == int((x >= ref.xmin).sum())  # WW's num_pl_spikes


def test_alpha_at_median_matches_the_formula_by_hand() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0] * 5, dtype=torch.float64)
    # 20 positives sorted: 1 x5, 2 x5, 4 x5, 8 x5; xmin = positives[20 // 2] = 4; tail = {4 x5, 8 x5}
    expected = 1 + 10 / (5 * math.log(4 / 4) + 5 * math.log(8 / 4))
    assert float(alpha_at_quantile(x[None, :])[0]) == pytest.approx(expected, rel=1e-12)
