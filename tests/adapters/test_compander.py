"""The weight compander checked by hand: values, inverse and derivative of f at worked points, and the
parametrization leaves the model unchanged when applied, trains v, and bakes f(v) back on removal."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.adapters.compander import (
    ALPHA_MIN,
    BETA_MIN,
    LearnableCompander,
    apply_compander,
    compand,
    compand_derivative,
    compander_values,
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
    with pytest.raises(WeightsmithError, match="alpha"):
        apply_compander(nn.Linear(2, 2), alpha=1.0, learn=True)  # sigmoid cannot start at exactly 1


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def test_learn_false_is_the_fixed_compander_bit_for_bit():
    x = torch.randn(6, 4)
    nets = [_net(), _net()]
    apply_compander(nets[0], alpha=0.5, beta=0.01)
    apply_compander(nets[1], alpha=0.5, beta=0.01, learn=False)
    for net in nets:  # no new parameters; the weight is the float-argument formula, bit for bit
        assert sorted(n for n, _ in net.named_parameters()) == [
            "0.bias", "0.parametrizations.weight.original", "2.bias", "2.parametrizations.weight.original",
        ]  # fmt: skip
        v = net[0].parametrizations.weight.original.detach()
        assert torch.equal(net[0].weight, torch.sign(v) * ((v.abs() + 0.01) ** 0.5 - 0.01**0.5))
    assert torch.equal(nets[0](x), nets[1](x))
    assert compander_values(nets[1]) == {"0": (0.5, 0.01), "2": (0.5, 0.01)}


def test_partial_derivatives_in_alpha_beta_by_hand():
    # df/dalpha = sign(v)((|v|+b)^a ln(|v|+b) - b^a ln b); df/dbeta = sign(v) a ((|v|+b)^(a-1) - b^(a-1))
    v = torch.tensor([-1.5, -0.2, 0.0, 0.3, 2.0], dtype=torch.float64)
    al = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    be = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.7, -1.1, 0.4, 2.0, -0.3], dtype=torch.float64)
    (c * compand(v, al, be)).sum().backward()
    s, r = torch.sign(v), v.abs() + 0.1
    d_alpha = s * (r**0.6 * r.log() - 0.1**0.6 * torch.log(torch.tensor(0.1, dtype=torch.float64)))
    d_beta = s * 0.6 * (r**-0.4 - 0.1**-0.4)
    assert al.grad is not None and be.grad is not None
    assert float(al.grad) == pytest.approx(float((c * d_alpha).sum()), rel=1e-12)
    assert float(be.grad) == pytest.approx(float((c * d_beta).sum()), rel=1e-12)


def test_learnable_alpha_beta_gradients_match_finite_differences():
    net = _net(1, torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64)
    before = net(x).detach()
    apply_compander(net, alpha=0.6, beta=0.05, learn=True)
    assert torch.allclose(net(x), before, atol=1e-12)  # unchanged when applied
    assert compander_values(net)["0"] == pytest.approx((0.6, 0.05), rel=1e-12)
    params = [net[i].parametrizations.weight[0] for i in (0, 2)]
    with torch.no_grad():  # move off the initial values so alpha/beta differ per layer
        params[0].a += 0.3
        params[1].b -= 0.4

    def loss() -> torch.Tensor:
        return (net(x) ** 2).sum() + net(x).sum()

    loss().backward()
    h = 1e-6
    for comp in params:
        for p in (comp.a, comp.b):
            assert p.grad is not None and float(p.grad) != 0.0
            with torch.no_grad():
                p += h
                up = float(loss())
                p -= 2 * h
                down = float(loss())
                p += h
            assert float(p.grad) == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("opt_name, lr", [("sgd", 1e6), ("adam", 1e4)])
def test_constraint_holds_after_huge_steps(opt_name: str, lr: float):
    net = _net(2)
    apply_compander(net, alpha=0.5, beta=0.01, learn=True)
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr) if opt_name == "sgd" else torch.optim.Adam(params, lr=lr)
    seen = set()
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        for alpha, beta in compander_values(net).values():
            assert ALPHA_MIN * (1 - 1e-6) <= alpha <= 1.0 and beta >= BETA_MIN * (1 - 1e-6)
            seen.add((alpha, beta))
        assert bool(torch.isfinite(net(x)).all())
    assert all(ab != pytest.approx((0.5, 0.01)) for ab in seen)  # the huge steps really moved them


def test_learned_alpha_beta_survive_save_load_and_bake(tmp_path):
    net = _net(3)
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    apply_compander(net, alpha=0.5, beta=0.01, learn=True)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    learned = compander_values(net)
    assert all(ab != pytest.approx((0.5, 0.01)) for ab in learned.values())
    assert "0.parametrizations.weight.0.a" in net.state_dict()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    other = _net(4)
    apply_compander(other, alpha=0.8, beta=0.3, learn=True)
    other.load_state_dict(torch.load(tmp_path / "net.pt"))
    assert compander_values(other) == learned
    assert torch.equal(other(x), net(x))
    out = net(x).detach()
    assert remove_compander(other) == ["0", "2"]
    assert not any(isinstance(m, LearnableCompander) for m in other.modules())
    assert torch.allclose(other(x), out, atol=1e-6)
    buf = io.BytesIO()  # the baked model is a plain one again
    torch.save(other.state_dict(), buf)
    assert sorted(torch.load(io.BytesIO(buf.getvalue()))) == ["0.bias", "0.weight", "2.bias", "2.weight"]
