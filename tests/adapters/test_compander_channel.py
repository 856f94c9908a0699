"""The per-channel learnable compander checked by hand: each output row uses its own α_r, β_r in
w_rj = sign(v_rj) ((|v_rj| + β_r)^α_r − β_r^α_r), worked at chosen values; the model is unchanged when
applied; the per-row gradients match finite differences; convolutions get one pair per filter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.adapters.compander import (
    ALPHA_MIN,
    LearnableCompander,
    apply_compander,
    compander_values,
    remove_compander,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _logit_alpha(alpha: float) -> float:
    s = (alpha - ALPHA_MIN) / (1.0 - ALPHA_MIN)
    return float(torch.logit(torch.tensor(s, dtype=torch.float64)))


def test_each_row_uses_its_own_alpha_beta_by_hand():
    lin = nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.5], [1.0, -0.5], [1.0, -0.5]]))
    apply_compander(lin, alpha=0.5, beta=0.25, learn=True, per_channel=True)
    comp = lin.parametrizations.weight[0]
    assert isinstance(comp, LearnableCompander) and comp.a.shape == (3, 1) and comp.b.shape == (3, 1)
    with torch.no_grad():
        assert torch.allclose(lin.weight, torch.tensor([[1.0, -0.5]] * 3, dtype=torch.float64))
        lin.parametrizations.weight.original.copy_(torch.tensor([[2.0, -0.75]] * 3))
        comp.a[1] = _logit_alpha(0.75)  # row 1: alpha 3/4, row 2: beta 1 (softplus b = 1 - 1e-6)
        comp.b[2] = float(torch.log(torch.expm1(torch.tensor(1.0 - 1e-6, dtype=torch.float64))))
    # row 0 (α ½, β ¼): f(2) = √2.25 − √0.25 = 1, f(0.75) = 1 − 0.5 = 0.5
    # row 1 (α ¾, β ¼): f(2) = 2.25^¾ − 0.25^¾, f(0.75) = 1 − 0.25^¾
    # row 2 (α ½, β 1): f(2) = √3 − 1, f(0.75) = √1.75 − 1
    q = 0.25**0.75
    expected = torch.tensor(
        [[1.0, -0.5], [2.25**0.75 - q, -(1.0 - q)], [3**0.5 - 1, -(1.75**0.5 - 1)]], dtype=torch.float64
    )
    assert torch.allclose(lin.weight, expected, atol=1e-9)
    alpha, beta = compander_values(lin)[""]
    assert alpha == pytest.approx((0.5 + 0.75 + 0.5) / 3) and beta == pytest.approx((0.25 + 0.25 + 1) / 3)


def test_per_channel_unchanged_on_apply_gradients_and_bake():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    before = net(x).detach()
    assert apply_compander(net, alpha=0.6, beta=0.05, learn=True, per_channel=True) == ["0", "2"]
    assert torch.allclose(net(x), before, atol=1e-12)
    comp = net[0].parametrizations.weight[0]
    with torch.no_grad():
        comp.a += torch.linspace(-0.5, 0.5, 5, dtype=torch.float64)[:, None]  # rows differ

    def loss() -> torch.Tensor:
        return (net(x) ** 2).sum() + net(x).sum()

    loss().backward()
    h = 1e-6
    for p in (comp.a, comp.b):
        assert p.grad is not None
        for r in (0, 3):
            with torch.no_grad():
                p[r] += h
                up = float(loss())
                p[r] -= 2 * h
                down = float(loss())
                p[r] += h
            assert float(p.grad[r, 0]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    out = net(x).detach()
    remove_compander(net)
    assert torch.allclose(net(x), out, atol=1e-10)


def test_training_moves_the_channels_apart_and_conv_gets_one_pair_per_filter():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    apply_compander(net, alpha=0.5, beta=0.01, learn=True, per_channel=True)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.arange(32) % 3
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    alpha = net[0].parametrizations.weight[0].alpha.detach().flatten()
    assert float(alpha.max() - alpha.min()) > 1e-3
    conv = nn.Conv2d(2, 4, 3)
    apply_compander(conv, learn=True, per_channel=True)
    assert conv.parametrizations.weight[0].a.shape == (4, 1, 1, 1)


def test_per_channel_needs_learn():
    with pytest.raises(WeightsmithError, match="per_channel"):
        apply_compander(nn.Linear(2, 2), per_channel=True)
