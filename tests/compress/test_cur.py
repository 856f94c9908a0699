"""CUR / volume sampling (compress/cur.py) against exact enumeration, numpy and scipy."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from weightsmith.compress import compress
from weightsmith.compress.cur import (
    CUR,
    column_factors,
    cur_factors,
    kdpp_sample,
    log_elementary_symmetric,
    pivoted_qr_columns,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def volumes(W: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    return {
        S: float(np.linalg.det(W[:, S].T @ W[:, S])) for S in itertools.combinations(range(W.shape[1]), k)
    }


def projection_error(W: np.ndarray, S: tuple[int, ...]) -> float:
    C = W[:, S]
    return float(((W - C @ np.linalg.pinv(C) @ W) ** 2).sum())


def test_elementary_symmetric_polynomials_by_enumeration():
    lam = torch.tensor([0.5, 2.0, 3.0, 0.25, 1.5], dtype=torch.float64)
    E = log_elementary_symmetric(lam, 3).exp()
    for m in range(6):
        for j in range(4):
            brute = sum(math.prod(c) for c in itertools.combinations(lam[:m].tolist(), j))
            assert math.isclose(float(E[j, m]), brute, rel_tol=1e-12, abs_tol=1e-300)


def test_kdpp_sampler_matches_squared_volumes_on_a_4x5_matrix():
    """P(S) = det(W_Sᵀ W_S) / Σ_T det(W_Tᵀ W_T), enumerated over all 10 pairs of the 5 columns."""
    W = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vol = volumes(W.numpy(), 2)
    total = sum(vol.values())
    g = torch.Generator().manual_seed(1)
    n = 1200
    counts = dict.fromkeys(vol, 0)
    for _ in range(n):
        counts[tuple(kdpp_sample(W, 2, g))] += 1
    for S, v in vol.items():
        p = v / total
        assert abs(counts[S] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (S, counts[S] / n, p)


def test_volume_sampling_expected_error_identity():
    """Deshpande et al. Thm 1.3: E_S ‖W − π_S W‖² = (k+1) e_{k+1}(σ²)/e_k(σ²) ≤ (k+1) ‖W − W_k‖²."""
    W = np.random.default_rng(2).standard_normal((5, 6)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.2])
    k = 2
    vol = volumes(W, k)
    total = sum(vol.values())
    expected = sum(v / total * projection_error(W, S) for S, v in vol.items())
    sig2 = np.linalg.svd(W, compute_uv=False) ** 2
    e = log_elementary_symmetric(torch.tensor(sig2), k + 1).exp()[:, -1]
    assert math.isclose(expected, (k + 1) * float(e[k + 1] / e[k]), rel_tol=1e-9)
    assert expected <= (k + 1) * sig2[k:].sum()


def test_pivoted_qr_and_cx_factors():
    W = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cols = pivoted_qr_columns(W, 3)
    assert cols == sorted(scipy.linalg.qr(W.numpy(), pivoting=True)[2][:3].tolist())
    f = column_factors(W, cols)
    assert f.A.shape == (6, 3) and f.B.shape == (3, 9)
    assert math.isclose(float(((W - f.dequantize()) ** 2).sum()), projection_error(W.numpy(), tuple(cols)))


def test_cur_compress_at_svd_parameters():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 24))
    errs = {}
    for cfg in (
        CUR(keep=0.5, allocation="uniform"),
        CUR(keep=0.5, allocation="uniform", selection="pivoted-qr"),
    ):
        q, report = compress(copy.deepcopy(m), cfg)
        dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
        assert len(report.layers) == 2 and sum(f.params for f in report.weights.values()) <= 0.5 * dense
        errs[cfg.selection] = np.mean([r.rel_error for r in report.layers])
        for ly in report.layers[:2]:  # the error is the layer's SVD error or more (Eckart-Young)
            W = dict(m.named_parameters())[ly.name].detach()
            r = report.weights[ly.name].rank
            s = torch.linalg.svdvals(W)
            assert ly.rel_error >= float(s[r:].norm() / s.norm()) - 1e-5
    assert all(0 < e < 1 for e in errs.values())


def test_bad_cur_option():
    with pytest.raises(WeightsmithError, match="selection='leverage'"):
        CUR(selection="leverage")


def test_compress_lowrank_runs_cur_not_svd():
    """Both entry points (``compress`` and ``compress_lowrank``) factor through ``CUR.factor``."""
    from weightsmith.compress._lowrank import compress_lowrank

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 8))
    W = net[0].weight.detach().clone()
    _, report = compress_lowrank(net, CUR(rank=3, allocation="uniform", seed=5))
    f = report.weights["0.weight"]
    expected = cur_factors(W, 3, "volume", 5)  # layer 0: seed + 0
    torch.testing.assert_close(f.A @ f.B, expected.dequantize())
