"""SVD smoothing against WeightWatcher 0.7.7's SVDSmoothing, and the model it writes."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from weightsmith.analyze.smoothing import detx_count, smooth_count, svd_smoothing
from weightsmith.errors import WeightsmithError
from weightsmith.store import DictStore, open_store


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Conv2d(16, 24, 3), torch.nn.Linear(40, 96))
    with torch.no_grad():  # give the layers a few strong directions above the random bulk
        m[0].weight += 0.5 * torch.randn(48, 3) @ torch.randn(3, 64) / 8
        m[2].weight += 0.5 * torch.randn(96, 2) @ torch.randn(2, 40) / 6
    return m


@pytest.mark.parametrize("method", ["svd", "detx", "lambda_min"])
def test_smoothing_matches_weightwatcher(method: str, tmp_path: Path) -> None:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = _model()
    store = DictStore({k: v.detach().clone() for k, v in model.state_dict().items()}, source="toy")
    ww_method = {"detx": "detX", "lambda_min": "alpha_min"}.get(method, method)  # WeightWatcher's spelling
    ref = ww.WeightWatcher().SVDSmoothing(copy.deepcopy(model), percent=0.5, method=ww_method).state_dict()
    out = svd_smoothing(store, tmp_path / "smooth", method=method, percent=0.5)
    ours = open_store(out)
    assert sorted(ours) == sorted(store)
    for name in store:
        # WeightWatcher's truncated SVD is randomised (7 power iterations, seed 42); ours is exact
        err = torch.linalg.vector_norm(ours[name].double() - ref[name].double())
        assert float(err) <= 5e-3 * float(torch.linalg.vector_norm(ref[name].double())), name
    changed = [n for n in store if n.endswith("weight") and not torch.equal(ours[n], store[n])]
    assert changed  # the transform did something
    assert all(torch.equal(ours[n], store[n]) for n in store if n.endswith("bias"))


def test_counts_and_refusals(tmp_path: Path) -> None:
    assert detx_count(torch.ones(10)) == 0  # a flat spectrum has no tail
    ev = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.2, 0.1])  # rescaled to mean 1: 3.57, 1.79, 0.357, 0.179, ...
    assert detx_count(ev) == 4  # top products 3.57, 6.38, 2.28, 0.41 < 1
    from weightwatcher.RMT_Util import detX_constraint

    for seed in range(3):
        x = torch.rand(50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4
        assert detx_count(x) == detX_constraint(torch.sort(x).values.numpy())[0]
    W = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))
    assert smooth_count(W, "svd", 0.5) == 10
    store = DictStore({"w": W})
    with pytest.raises(WeightsmithError, match="method"):
        svd_smoothing(store, tmp_path / "x", method="fft")
    with pytest.raises(WeightsmithError, match="percent"):
        svd_smoothing(store, tmp_path / "x", method="svd", percent=1.5)
