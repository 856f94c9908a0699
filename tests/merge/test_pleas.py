"""PLeaS (Nasery et al., CVPR 2025): partial matching and the least-squares step, checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import zoo
from weightsmith.errors import WeightsmithError
from weightsmith.merge.pleas import Units, correlation, least_squares, partial_match, pleas_merge, zip_average


def test_least_squares_equals_normal_equations_by_hand():
    # 3 samples, 1 feature + bias, 1 output: fit t = w h + b. Hand solution of the 2x2 normal equations:
    # h = (0, 1, 2), t = (1, 2, 4): sum h = 3, sum h^2 = 5, sum t = 7, sum h t = 10
    # [5 3; 3 3] [w; b] = [10; 7]  ->  w = 1.5, b = 5/6
    H = torch.tensor([[0.0], [1.0], [2.0]])
    T = torch.tensor([[1.0], [2.0], [4.0]])
    W, b = least_squares(H, T)
    assert abs(float(W) - 1.5) < 1e-6 and abs(float(b) - 5 / 6) < 1e-6


def test_least_squares_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    H, W0, b0 = torch.randn(50, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    W, b = least_squares(H, H @ W0.T + b0)
    torch.testing.assert_close(W, W0, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, b0, atol=1e-5, rtol=0)


def test_partial_match_budget():
    corr = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.1, 0.3, 0.0]])
    full = partial_match(corr, 3)
    assert full.pairs == [(0, 0), (1, 2), (2, 1)] and full.width == 3  # sorted by correlation
    wide = partial_match(corr, 5)  # merge 2n - m = 1 pair, keep 2 units of each model apart
    assert wide.pairs == [(0, 0)] and wide.a_only == [1, 2] and wide.b_only == [1, 2] and wide.width == 5
    narrow = partial_match(corr, 2)
    assert narrow.pairs == [(0, 0), (1, 2)] and narrow.width == 2
    with pytest.raises(WeightsmithError, match="width 7"):
        partial_match(corr, 7)


def test_merge_matrices_average_pairs_and_copy_kept_units():
    MA, MB = Units([(1, 0)], [0], [1]).merge_matrices(2)
    fa, fb = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 40.0])
    assert (MA @ fa + MB @ fb).tolist() == [25.0, 10.0, 40.0]


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return zoo.MLP(6, (8, 8), 3).net.eval()


def test_merging_a_model_with_itself_returns_it():
    a = _mlp(0)
    x = torch.randn(200, 6)
    for merged in (pleas_merge(a, a, x, 1.0, ridge=0.0), zip_average(a, a, x, 1.0)):
        torch.testing.assert_close(merged(x), a(x), atol=1e-4, rtol=1e-4)


def test_double_width_pleas_is_the_ensemble():
    # Width 2n keeps every unit of both models: the least-squares fit can reproduce the ensemble exactly.
    a, b = _mlp(1), _mlp(2)
    x = torch.randn(300, 6)
    merged = pleas_merge(a, b, x, 2.0, ridge=0.0)
    assert merged[0].out_features == 16
    torch.testing.assert_close(merged(x), (a(x) + b(x)) / 2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zip_average(a, b, x, 2.0)(x), (a(x) + b(x)) / 2, atol=1e-5, rtol=1e-5)


def test_pleas_fits_the_ensemble_at_least_as_well_as_averaging():
    a, b = _mlp(3), _mlp(4)
    x = torch.randn(400, 6)
    with torch.no_grad():
        target = (a(x) + b(x)) / 2
    for w in (0.75, 1.0, 1.5):
        with torch.no_grad():
            err_ls = float((pleas_merge(a, b, x, w)(x) - target).pow(2).mean())
            err_avg = float((zip_average(a, b, x, w)(x) - target).pow(2).mean())
        assert err_ls <= err_avg + 1e-6


def test_correlation_matches_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    ha, hb = torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g)
    ref = np.corrcoef(ha.T.numpy(), hb.T.numpy())[:3, 3:]
    torch.testing.assert_close(correlation(ha, hb), torch.from_numpy(ref).float(), atol=1e-5, rtol=0)
