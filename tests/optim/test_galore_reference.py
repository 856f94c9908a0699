"""GaLoreAdamW against galore-torch 1.0 on the same parameters and gradients, through projection refreshes."""

from __future__ import annotations

import warnings

import pytest
import torch

from weightsmith.errors import WeightsmithError
from weightsmith.optim import GaLoreAdamW

torch.set_num_threads(1)
galore_torch = pytest.importorskip("galore_torch")

SHAPES = [(24, 16), (16, 24), (20, 20), (12,)]


def _groups(params, proj_type):
    return [
        {"params": params[:3], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type},
        {"params": params[3:]},
    ]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_galore_torch(proj_type, weight_decay):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW(_groups(a, proj_type), lr=1e-2, weight_decay=weight_decay)
    ours = GaLoreAdamW(_groups(b, proj_type), lr=1e-2, weight_decay=weight_decay)
    for _ in range(8):  # refreshes at steps 0, 3 and 6
        for x, y in zip(a, b, strict=True):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    moved = max(float((x.detach() - y0).abs().max()) for x, y0 in zip(a, init, strict=True))
    assert moved > 1e-2  # the comparison is not vacuous
    for x, y in zip(a, b, strict=True):
        assert float((x - y).abs().max()) <= 1e-5


def test_projected_group_checks():
    w, bias = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    with pytest.raises(WeightsmithError, match=r"'lin.bias' has shape \(6,\).*2-D"):
        GaLoreAdamW([{"params": [("lin.weight", w), ("lin.bias", bias)], "rank": 2}])
    with pytest.raises(WeightsmithError, match="update_proj_gap must be a positive integer"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 0}])
    with pytest.raises(WeightsmithError, match="proj_type"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "diagonal"}])
