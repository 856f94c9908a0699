"""fix_fingers="clip_xmax" against WeightWatcher 0.7.7 on matrices with planted outsized eigenvalues."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from weightsmith.analyze import analyze_weights
from weightsmith.errors import WeightsmithError
from weightsmith.store import DictStore

COLUMNS = (
    "alpha",
    "raw_alpha",
    "num_fingers",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "num_pl_spikes",
    "alpha_weighted",
)


def _mats() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mats = []
    for i in range(6):
        W = torch.randn(96, 64, generator=g) / 8
        for k in range(i):  # k planted outsized rank-1 components
            W += (6 + 2 * k) * torch.randn(96, 1, generator=g) @ torch.randn(1, 64, generator=g) / 64
        mats.append(W)
    mats.append(torch.randn(80, 40, generator=g) ** 3 / 10)  # heavy-tailed entries: a finger at the top
    return mats


def test_clip_xmax_matches_weightwatcher() -> None:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    mats = _mats()
    model = torch.nn.Sequential(*[torch.nn.Linear(W.shape[1], W.shape[0], bias=False) for W in mats])
    for layer, W in zip(model, mats, strict=True):
        layer.weight.data.copy_(W)
    ref = ww.WeightWatcher(model=model).analyze(fix_fingers="clip_xmax")
    store = DictStore({k: v.detach().clone() for k, v in model.state_dict().items()})
    ours = analyze_weights(
        store, device="cpu", farms=False, mp_fit=False, fix_fingers="clip_xmax"
    ).to_pandas()
    for column in COLUMNS:
        np.testing.assert_allclose(
            ours[column].astype(float), ref[column].astype(float), rtol=1e-6, err_msg=column
        )
    assert (ours["num_fingers"] > 0).sum() >= 2  # the clipping did change some fits
    assert (ours["alpha"] < ours["raw_alpha"]).sum() == (ours["num_fingers"] > 0).sum()


def test_without_fix_fingers_the_columns_are_absent_and_bad_names_are_refused() -> None:
    store = DictStore({"w": _mats()[0]})
    frame = analyze_weights(store, device="cpu", farms=False).to_pandas()
    assert "num_fingers" not in frame.columns and float(frame["xmax"][0]) == float(frame["lambda_max"][0])
    with pytest.raises(WeightsmithError, match="fix_fingers"):
        analyze_weights(store, device="cpu", fix_fingers="clip")
