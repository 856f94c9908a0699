"""EL2N and GraNd (Paul et al., NeurIPS 2021) against their definitions computed example by example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.analyze.datadiet import el2n_scores, grand_scores, select_subset
from weightsmith.errors import WeightsmithError


def _setup() -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    models: list[nn.Module] = [nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    return models, torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)


def test_el2n_is_the_mean_softmax_error_norm() -> None:
    models, x, y = _setup()
    want = torch.zeros(len(y), dtype=torch.float64)
    for m in models:
        for i in range(len(y)):
            p = torch.softmax(m(x[i]).double(), -1)
            p[y[i]] -= 1
            want[i] += p.norm() / len(models)
    torch.testing.assert_close(el2n_scores(models, x, y, batch_size=4), want)


def test_grand_is_the_mean_per_example_gradient_norm() -> None:
    models, x, y = _setup()
    want = torch.zeros(len(y), dtype=torch.float64)
    for m in models:
        for i in range(len(y)):
            m.zero_grad()
            nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
            sq = sum(float(p.grad.double().pow(2).sum()) for p in m.parameters() if p.grad is not None)
            want[i] += sq**0.5 / len(models)
    torch.testing.assert_close(grand_scores(models, x, y, batch_size=4), want, rtol=1e-5, atol=1e-7)


def test_select_subset() -> None:
    s = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert select_subset(s, 0.5).tolist() == [1, 3]
    r = select_subset(s, 0.5, "random", seed=3)
    assert len(r) == 2 and r.tolist() == select_subset(s, 0.5, "random", seed=3).tolist()
    with pytest.raises(WeightsmithError, match="keep"):
        select_subset(s, 0.0)
    with pytest.raises(WeightsmithError, match="how"):
        select_subset(s, 0.5, "bottom")
