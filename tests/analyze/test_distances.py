"""distances(model_a, model_b) against WeightWatcher 0.7.7's distances() on Linear and Conv2d layers."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from weightsmith.analyze import distances
from weightsmith.errors import WeightsmithError
from weightsmith.store import DictStore


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.Conv2d(16, 24, 3), torch.nn.Linear(40, 12, bias=False)
    )
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return a, b


def _store(m: torch.nn.Module, source: str) -> DictStore:
    return DictStore({k: v.detach().clone() for k, v in m.state_dict().items()}, source=source)


@pytest.mark.parametrize("method", ["raw", "euclidean", "cka"])
def test_distances_match_weightwatcher(method: str) -> None:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    a, b = _models()
    ref_w, ref_b, ref = ww.WeightWatcher().distances(a, b, method=method)
    dw, db, ours = distances(_store(a, "a"), _store(b, "b"), method=method)
    np.testing.assert_allclose(ours["delta_W"], ref["delta_W"].astype(float), rtol=1e-6)
    np.testing.assert_allclose(ours["delta_b"], ref["delta_b"].astype(float), rtol=1e-6)
    assert list(ours["M"]) == list(ref["M"]) and list(ours["N"]) == list(ref["N"])
    assert dw == pytest.approx(ref_w, rel=1e-6) and db == pytest.approx(ref_b, rel=1e-6, abs=1e-12)


def test_a_model_against_itself_and_mismatches() -> None:
    a, _ = _models()
    dw, db, frame = distances(_store(a, "a"), _store(a, "a"))
    assert dw == 0.0 and db == 0.0 and list(frame["method"]) == ["raw"] * 3
    _, _, cka = distances(_store(a, "a"), _store(a, "a"), method="cka")
    assert np.all(cka["delta_W"] > 0)
    short = DictStore({k: v for k, v in a.state_dict().items() if k != "2.weight"}, source="short")
    with pytest.raises(WeightsmithError, match="2.weight"):
        distances(_store(a, "a"), short)
    with pytest.raises(WeightsmithError, match="method"):
        distances(_store(a, "a"), _store(a, "a"), method="l1")
