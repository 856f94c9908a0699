"""W-PCA (Wang et al., ICLR 2025) against scikit-learn's PCA and scipy's rank correlations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsmith import zoo
from weightsmith.analyze.wpca import ffn_layers, pca_dim, rank_correlation, wpca_score
from weightsmith.errors import WeightsmithError


@pytest.mark.parametrize("eta", [0.5, 0.9, 0.99])
def test_pca_dim_matches_sklearn(eta: float) -> None:
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(0)
    H = torch.randn(200, 30, generator=g, dtype=torch.float64) @ torch.randn(
        30, 30, generator=g, dtype=torch.float64
    )
    share = np.cumsum(PCA().fit(H.numpy()).explained_variance_ratio_)
    assert pca_dim(H, eta) == int(np.searchsorted(share, eta - 1e-12) + 1)


def test_pca_dim_of_a_rank_3_batch_and_bad_eta() -> None:
    g = torch.Generator().manual_seed(1)
    H = torch.randn(100, 3, generator=g) @ torch.randn(3, 40, generator=g)
    assert pca_dim(H, 0.9999) == 3
    with pytest.raises(WeightsmithError, match="eta"):
        pca_dim(H, 1.5)


def test_rank_correlation_matches_scipy() -> None:
    from scipy.stats import kendalltau, spearmanr

    a = [0.3, 0.1, 0.5, 0.5, 0.9, 0.2, 0.7]
    b = [1.0, 2.0, 3.0, 2.5, 5.0, 2.0, 4.0]
    got = rank_correlation(a, b)
    assert got["spearman"] == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert got["kendall"] == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
    with pytest.raises(WeightsmithError):
        rank_correlation([1.0], [2.0])


def test_wpca_score_is_params_times_summed_pca_dims() -> None:
    torch.manual_seed(0)
    task = zoo.load_task("digits")
    model = zoo.make_model("mlp", task, width=16, depth=2)
    x = task.x_train[:64]
    res = wpca_score(model, x, eta=0.9)
    assert ffn_layers(model) == ["net.0", "net.2"]
    layers = list(model.modules())[2:]  # net.0 Linear, net.1 ReLU, net.2 Linear, ...
    h1 = layers[0](x)
    h2 = layers[2](torch.relu(h1))
    assert res.pca_dims == {"net.0": pca_dim(h1, 0.9), "net.2": pca_dim(h2, 0.9)}
    assert res.params == sum(p.numel() for p in model.parameters())
    assert res.score == res.params * (res.pca_dims["net.0"] + res.pca_dims["net.2"])
    wider = wpca_score(zoo.make_model("mlp", task, width=64, depth=2), x, eta=0.9)
    assert wider.score > res.score
    with pytest.raises(WeightsmithError, match="FFN"):
        wpca_score(torch.nn.Sequential(torch.nn.ReLU()), x)
