"""The weight compander checked by hand: values, inverse and derivative of f at worked points, and the
parametrization leaves the model unchanged when applied, trains v, and bakes f(v) back on removal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.adapters.compander import (
    apply_compander,
    compand,
    compand_derivative,
    expand,
    remove_compander,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_function_inverse_and_derivative_by_hand():
    v = torch.tensor([-2.0, 0.0, 2.0, 0.75], dtype=torch.float64)
    # alpha = 1/2, beta = 1/4: f(2) = sqrt(2.25) - sqrt(0.25) = 1; f(0.75) = 1 - 0.5 = 0.5
    w = compand(v, 0.5, 0.25)
    assert torch.allclose(w, torch.tensor([-1.0, 0.0, 1.0, 0.5], dtype=torch.float64))
    # f'(v) = 0.5 / sqrt(|v| + 0.25): 1/3 at |v| = 2, 1 at 0, 0.5 at 0.75
    d = compand_derivative(v, 0.5, 0.25)
    assert torch.allclose(d, torch.tensor([1 / 3, 1.0, 1 / 3, 0.5], dtype=torch.float64))
    assert torch.allclose(expand(w, 0.5, 0.25), v)
    # autograd agrees with the closed-form derivative (at 0 autograd's sign'(0) = 0 gives 0)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64, requires_grad=True)
    compand(x, 0.7, 0.05).sum().backward()
    assert x.grad is not None
    nonzero = x.detach() != 0
    assert torch.allclose(x.grad[nonzero], compand_derivative(x.detach(), 0.7, 0.05)[nonzero])


def test_shape_odd_monotone_compressive_and_identity_at_alpha_one():
    v = torch.linspace(-4, 4, 401, dtype=torch.float64)
    w = compand(v, 0.5, 0.01)
    assert torch.allclose(w, -compand(-v, 0.5, 0.01))
    assert bool((w.diff() > 0).all())
    big = v.abs() > 1.0
    assert bool((w[big].abs() < v[big].abs()).all())  # large weights shrink ...
    d = compand_derivative(v, 0.5, 0.01)
    assert float(d[v.abs().argmin()]) == pytest.approx(5.0)  # ... and slope 0.5 * 0.01^-0.5 at zero
    assert torch.allclose(compand(v, 1.0, 0.3), v)


def test_parametrized_model_unchanged_then_trains_v_and_bakes_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    before = net(x).detach()
    assert apply_compander(net, alpha=0.5, beta=0.01) == ["0", "2"]
    assert torch.allclose(net(x), before, atol=1e-6)
    v = net[0].parametrizations.weight.original
    assert torch.allclose(net[0].weight, compand(v, 0.5, 0.01))
    v0 = v.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(x), y).backward()
    assert v.grad is not None
    opt.step()
    assert not torch.equal(v.detach(), v0)
    after = net(x).detach()
    assert remove_compander(net) == ["0", "2"]
    assert isinstance(net[0].weight, nn.Parameter)
    assert torch.allclose(net(x), after, atol=1e-6)


def test_bad_options_name_the_option():
    with pytest.raises(WeightsmithError, match="alpha"):
        apply_compander(nn.Linear(2, 2), alpha=1.5)
    with pytest.raises(WeightsmithError, match="beta"):
        apply_compander(nn.Linear(2, 2), beta=0.0)
    with pytest.raises(WeightsmithError, match="no module"):
        apply_compander(nn.ReLU())
