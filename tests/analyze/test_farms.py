"""FARMS removes the aspect-ratio bias of alpha on random matrices of different shapes."""

from __future__ import annotations

import pytest
import torch

from weightsmith.analyze import FarmsConfig, alpha_at_quantile, esd, farms_alpha, farms_esd, fit_power_law
from weightsmith.analyze.farms import window_grid

SHAPES = [(128, 128), (128, 256), (128, 512), (128, 1024)]  # Q = 1, 2, 4, 8


def test_window_grid() -> None:
    r, c, rs, cs = window_grid(100, 400, FarmsConfig(q=1.0, rows=50, windows=3))
    assert (r, c) == (50, 50)
    assert rs == [0, 25, 50] and cs == [0, 175, 350]
    r, c, rs, cs = window_grid(64, 64, FarmsConfig(q=2.0, rows=64, windows=4))
    assert (r, c) == (32, 64) and cs == [0]  # shrunk to fit, aspect ratio kept
    assert farms_esd(torch.randn(2, 100, 400), FarmsConfig(rows=50, windows=3)).shape == (2, 9 * 50)


def test_farms_esd_pools_the_windows_eigenvalues() -> None:
    W = torch.randn(1, 20, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pooled = farms_esd(W, FarmsConfig(q=1.0, rows=10, windows=2))
    blocks = [W[0, i : i + 10, j : j + 10] for i in (0, 10) for j in (0, 30)]
    ref = torch.cat([torch.linalg.svdvals(b) ** 2 for b in blocks])
    torch.testing.assert_close(torch.sort(pooled[0]).values, torch.sort(ref).values)


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def test_farms_removes_the_aspect_ratio_bias_of_gaussian_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    cfg = FarmsConfig(q=1.0, rows=64, windows=3, xmin="median")
    plain, farms = [], []
    for shape in SHAPES:
        W = torch.randn(4, *shape, generator=g)
        plain.append(float(alpha_at_quantile(esd(W)).mean()))
        farms.append(float(farms_alpha(W, cfg).mean()))
    assert plain == sorted(plain)  # plain alpha grows with Q for the very same kind of noise
    assert _spread(plain) > 1.5
    assert _spread(farms) < 0.1


def test_farms_reduces_the_bias_for_heavy_tailed_matrices_with_the_ks_fit() -> None:
    torch.manual_seed(1)
    t = torch.distributions.StudentT(3.0)
    plain, farms = [], []
    for shape in SHAPES:
        W = t.sample((6, *shape))
        plain.append(float(fit_power_law(esd(W)).alpha.median()))
        farms.append(float(farms_alpha(W, FarmsConfig(rows=64)).median()))
    assert _spread(farms) < _spread(plain)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="xmin"):
        farms_alpha(torch.randn(1, 30, 30), FarmsConfig(xmin="peak"))
