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


# ---------------------------------------------------------------- progressive re-selection


def _trained(reselect_every: int = 1, density: float = 0.25) -> tuple[nn.Sequential, torch.Tensor]:
    """A layer adapted with re-selection on, its values moved off zero (as if trained)."""
    lin = _layer()
    W0 = lin[0].weight.detach().clone()
    adapters.adapt(lin, SaRA(density=density, nuclear=0.0, reselect_every=reselect_every), targets=None)
    (V,) = adapters.adapter_parameters(lin)
    with torch.no_grad():
        V.copy_(torch.linspace(-0.6, 0.6, V.numel()))  # large enough to make some entries effective
    return lin, W0


def _ctx():
    from weightsmith.adapters._core import AdapterContext, SharedBases

    return AdapterContext("w", 0, 0, "linear", SharedBases(0))


def _sara(lin: nn.Sequential):
    (a,) = [m for m in lin.modules() if type(m).__name__ == "SaRAAdapter"]
    return a


def test_reselect_is_smallest_current_magnitude_by_hand():
    # 2x3 weight, k = 2: support {1 (|0.1|), 5 (|0.0|)}; values +0.9 at 1 and +0.2 at 5
    W0 = torch.tensor([[0.5, 0.1, 0.3], [0.4, -0.7, 0.0]])
    a = SaRA(density=1 / 3, reselect_every=1).create(W0, _ctx())
    assert a.flat.tolist() == [1, 5]
    with torch.no_grad():
        a.values.copy_(torch.tensor([0.9, 0.2]))
    # W = [[0.5, 1.0, 0.3], [0.4, -0.7, 0.2]]: smallest |W| are 5 (0.2) and 2 (0.3)
    slots = a.reselect(W0)
    assert slots.tolist() == [0]  # position 1 left slot 0; position 5 keeps slot 1
    assert a.flat.tolist() == [2, 5]
    assert torch.allclose(a.values.detach(), torch.tensor([0.0, 0.2]))
    assert torch.allclose(a.fixed, torch.tensor([[0.0, 0.9, 0.0], [0.0, 0.0, 0.0]]))


def test_reselect_keeps_count_budget_and_function():
    lin, W0 = _trained()
    a = _sara(lin)
    x = torch.randn(6, 12)
    torch.manual_seed(1)
    for _ in range(3):  # repeated: released entries may re-enter, their frozen update moving back to V
        before_out, before_flat = lin(x).detach(), a.flat.clone()
        slots = a.reselect(W0)
        assert slots.numel() > 0 and not torch.equal(a.flat, before_flat)  # the support did move
        assert a.flat.numel() == a.values.numel() == 24 and a.flat.unique().numel() == 24
        assert sum(p.numel() for p in adapters.adapter_parameters(lin)) == 24
        assert torch.allclose(lin(x), before_out, atol=1e-6)
        W = W0 + a.delta(W0).detach()
        assert a.flat.sort().values.tolist() == ineffective_support(W, 24).tolist()
        assert bool((a.fixed.flatten()[a.flat] == 0).all())
        with torch.no_grad():  # as if trained between re-selections
            a.values.add_(0.3 * torch.randn(24))


def test_reselect_gives_entering_slots_fresh_adam_moments():
    lin, W0 = _trained()
    a = _sara(lin)
    opt = torch.optim.AdamW(adapters.adapter_parameters(lin), lr=1e-2, weight_decay=0.0)
    x = torch.randn(6, 12)
    for _ in range(2):
        lin(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    old_m = opt.state[a.values]["exp_avg"].clone()
    slots = a.reselect(W0)
    kept = torch.ones(24, dtype=torch.bool)
    kept[slots] = False
    lin(x).square().sum().backward()
    g = a.values.grad.clone()
    opt.step()
    m = opt.state[a.values]["exp_avg"]
    assert torch.allclose(m[slots], 0.1 * g[slots])  # fresh: m = (1 - β1) g
    assert torch.allclose(m[kept], 0.9 * old_m[kept] + 0.1 * g[kept])  # kept slots keep their history


def test_train_step_schedule_first_half_only():
    lin, W0 = _trained(reselect_every=2)
    a = _sara(lin)
    lin(torch.randn(3, 12))  # a training forward: the adapter sees W0
    moves = []
    for step in range(10):
        with torch.no_grad():  # as if trained: every step moves the values
            a.values.add_(0.3 * torch.randn(a.values.shape))
        before = a.flat.clone()
        a.on_train_step(step, 10)
        moves.append(not torch.equal(before, a.flat))
    # every 2nd step (done = 2, 4) within the first half (done <= 5), never later
    assert moves == [False, True, False, True, False, False, False, False, False, False]


def test_default_off_is_the_plain_update_bit_for_bit():
    lin = _layer()
    W0 = lin[0].weight.detach().clone()
    adapters.adapt(lin, SaRA(density=0.25, nuclear=0.0), targets=None)
    a = _sara(lin)
    assert set(a.state_dict()) == {"values"}  # nothing new saved
    with torch.no_grad():
        a.values.normal_()
    x = torch.randn(5, 12)
    lin(x)
    flat = a.flat.clone()
    for step in range(6):
        a.on_train_step(step, 6)
    assert torch.equal(a.flat, flat)
    dense = torch.zeros(96).index_put((flat,), a.values.detach()).view(8, 12)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, W0) + torch.nn.functional.linear(x, dense))
    with pytest.raises(WeightsmithError, match="reselect_every"):
        a.reselect(W0)


def test_reselected_adapter_saves_and_loads(tmp_path):
    lin, W0 = _trained()
    _sara(lin).reselect(W0)
    x = torch.randn(4, 12)
    out = lin(x).detach()
    adapters.save_adapters(lin, tmp_path / "a")
    fresh = _layer()
    adapters.load_adapters(fresh, tmp_path / "a")
    assert torch.equal(_sara(fresh).flat, _sara(lin).flat)
    assert torch.allclose(fresh(x), out, atol=1e-6)


@pytest.mark.parametrize(
    "opts, word", [({"reselect_every": -1}, "reselect_every"), ({"reselect_until": 0.0}, "reselect_until")]
)
def test_bad_reselect_options_name_the_option(opts, word):
    with pytest.raises(WeightsmithError, match=word):
        adapters.adapt(_layer(), SaRA(**opts), targets=None)
