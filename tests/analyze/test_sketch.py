"""Streaming power method, Oja's rule and very sparse random projections against exact SVDs."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.analyze.sketch import (
    oja,
    row_blocks,
    sketch,
    sketched_singular_values,
    streamed_norm_metrics,
    streaming_power,
    very_sparse_projection,
)
from weightsmith.analyze.spectrum import esd, norm_metrics
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _spiked(m: int = 600, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Gaussian noise plus two rank-one spikes: a trained layer's ESD shape (bulk + outliers)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    for s in (3.0, 1.5):
        W += s * torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g) / math.sqrt(n) * 10
    return W


def test_streaming_power_equals_the_exact_top_singular_value_and_norm_metrics() -> None:
    W = _spiked()
    exact = torch.linalg.svdvals(W.double())
    res = streaming_power(row_blocks(W, 64), iters=200, tol=1e-12)
    assert res.converged and res.passes < 50
    assert res.lambda_max == pytest.approx(float(exact[0] ** 2), rel=1e-6)
    assert res.frobenius_sq == pytest.approx(float((exact**2).sum()), rel=1e-6)
    vt = torch.linalg.svd(W.double()).Vh[0]
    assert abs(float(res.vector.double() @ vt)) == pytest.approx(1.0, abs=1e-5)
    evals = esd(W[None].double())
    ref = norm_metrics(evals, torch.tensor([2.0], dtype=torch.float64))
    got = streamed_norm_metrics(W, max_block_bytes=64 * 200 * 4, tol=1e-12)
    for key in ("log_norm", "log_spectral_norm", "stable_rank"):
        assert got[key] == pytest.approx(float(ref[key][0]), rel=1e-6), key


def test_oja_on_a_random_order_stream_gets_close_in_one_pass() -> None:
    W = _spiked(seed=1)
    exact = float(torch.linalg.svdvals(W.double())[0] ** 2)
    one = oja(W, rows=16, passes=1, seed=0)
    assert one.lambda_max == pytest.approx(exact, rel=2e-3)
    assert one.lambda_max <= exact * (1 + 1e-6)  # a Rayleigh quotient never exceeds lambda_max


def test_very_sparse_projection_has_the_papers_distribution_and_keeps_distances() -> None:
    n, k = 10_000, 400
    R = very_sparse_projection(n, k, seed=0)
    s = math.sqrt(n)
    vals = R.values()
    assert vals.abs().unique().tolist() == [pytest.approx(math.sqrt(s))]
    assert vals.numel() / (n * k) == pytest.approx(1 / s, rel=0.02)  # density 1/s = 1%
    assert float((vals > 0).double().mean()) == pytest.approx(0.5, abs=0.01)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, n, generator=g)
    Y = sketch(row_blocks(X, 7), R)
    d_true = torch.cdist(X.double(), X.double())
    d_sk = torch.cdist(Y, Y)
    off = ~torch.eye(20, dtype=torch.bool)
    ratio = d_sk[off] / d_true[off]
    assert float((ratio - 1).abs().max()) < 0.25  # JL: k = 400 keeps 20 points' distances within 25%
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.03)


def test_sketched_singular_values_match_the_top_of_the_exact_spectrum() -> None:
    W = _spiked(seed=2)
    exact = torch.linalg.svdvals(W.double())
    approx = sketched_singular_values(row_blocks(W, 100), k=40, power_iters=2, seed=0)
    torch.testing.assert_close(approx[:2], exact[:2], rtol=1e-3, atol=0)
    assert bool((approx <= exact[: approx.numel()] * (1 + 1e-9)).all())  # Q^T W never exceeds W


def test_bad_options_raise_naming_them() -> None:
    W = torch.randn(8, 4)
    with pytest.raises(WeightsmithError, match="iters"):
        streaming_power(row_blocks(W, 2), iters=0)
    with pytest.raises(WeightsmithError, match="rows"):
        row_blocks(W, 0)
    with pytest.raises(WeightsmithError, match="passes"):
        oja(W, passes=0)
    with pytest.raises(WeightsmithError, match="sparsity"):
        very_sparse_projection(10, 2, s=0.5)
    with pytest.raises(WeightsmithError, match="2-D"):
        streamed_norm_metrics(torch.randn(2, 3, 4))


def test_oversized_matrices_are_split_off_and_streamed_from_a_store() -> None:
    from weightsmith.analyze.batches import oversized
    from weightsmith.store import DictStore

    W = _spiked(seed=3)
    store = DictStore(
        {"big.weight": W, "small.weight": torch.randn(20, 10), "conv.weight": torch.randn(8, 4, 3, 3)}
    )
    fit, big = oversized(store, list(store), max_bytes=20 * 10 * 4)
    assert (fit, big) == (["small.weight", "conv.weight"], ["big.weight"])
    got = streamed_norm_metrics(store["big.weight"], max_block_bytes=1 << 14, tol=1e-12)
    exact = torch.linalg.svdvals(W.double())
    assert got["lambda_max"] == pytest.approx(float(exact[0] ** 2), rel=1e-6)
