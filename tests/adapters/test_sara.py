"""SaRA checked by hand: the support is the smallest-|W0| entries, the update lives only there, the
penalty is the nuclear norm of the explicit update, and the gradient of each value is the dense
gradient at its position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.sara import SaRA, ineffective_support
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8, bias=False))


def test_support_is_the_smallest_magnitudes_ties_by_position():
    W = torch.tensor([[0.5, -0.1, 0.3], [0.1, -0.7, 0.0]])
    assert ineffective_support(W, 3).tolist() == [1, 3, 5]  # |0.0| at 5, then the tie 0.1 at 1 and 3


def test_update_only_on_support_and_penalty_is_nuclear_norm():
    lin = _layer()
    W0 = lin[0].weight.detach().clone()
    adapters.adapt(lin, SaRA(density=0.25, nuclear=0.5), targets=None)
    params = list(adapters.adapter_parameters(lin))
    assert len(params) == 1 and params[0].numel() == 24  # 25 % of 96
    with torch.no_grad():
        params[0].normal_()
    dense = torch.zeros(96)
    support = ineffective_support(W0, 24)
    dense[support] = params[0].detach()
    dense = dense.view(8, 12)
    x = torch.randn(5, 12)
    assert torch.allclose(lin(x), x @ (W0 + dense).T, atol=1e-6)
    outside = torch.ones(96, dtype=torch.bool)
    outside[support] = False
    assert bool((dense.flatten()[outside] == 0).all())
    reg = adapters.adapter_regularization(lin)
    assert torch.allclose(reg, 0.5 * torch.linalg.svdvals(dense).sum(), atol=1e-6)


def test_value_gradient_is_dense_gradient_at_support():
    lin = _layer()
    W0 = lin[0].weight.detach().clone()
    adapters.adapt(lin, SaRA(density=0.5, nuclear=0.0), targets=None)
    (V,) = adapters.adapter_parameters(lin)
    x = torch.randn(7, 12)
    lin(x).square().sum().backward()
    W = W0.clone().requires_grad_()
    (x @ W.T).square().sum().backward()
    assert torch.allclose(V.grad, W.grad.flatten()[ineffective_support(W0, 48)], atol=1e-5)


def test_rank_budget_matches_lora_count():
    lin = _layer()
    adapters.adapt(lin, SaRA(rank_budget=2), targets=None)
    n_sara = sum(p.numel() for p in adapters.adapter_parameters(lin))
    lin2 = _layer()
    adapters.adapt(lin2, adapters.registered_adapters()["lora"](rank=2), targets=None)
    assert n_sara == sum(p.numel() for p in adapters.adapter_parameters(lin2)) == 2 * (8 + 12)


@pytest.mark.parametrize(
    "opts, word",
    [({"density": 0.0}, "density"), ({"nuclear": -1.0}, "nuclear"), ({"rank_budget": 50}, "rank_budget")],
)
def test_bad_options_name_the_option(opts, word):
    with pytest.raises(WeightsmithError, match=word):
        adapters.adapt(_layer(), SaRA(**opts), targets=None)
