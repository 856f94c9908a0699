"""The learned PST adapter: the straight-through gradients of the importance factors worked by hand, the exact
sparsity of the merged weight, the parameter count (out + in)(k + 1) + LoRA, the cubic schedule, save/load
at the final sparsity, and bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters._core import AdapterContext, SharedBases
from weightsmith.adapters.pst_adapter import PST, PSTAdapter, cubic_level
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def make(W0: torch.Tensor, **opts) -> PSTAdapter:
    ctx = AdapterContext(name="w", index=0, seed=0, kind="linear", shared=SharedBases(0))
    return PST(**opts).create(W0, ctx)


def test_mask_and_straight_through_gradients_by_hand():
    W0 = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 1.0, 1.0]])  # mean |W0| = 2
    a = make(W0, sparsity=0.5, rank=1, alpha=1.0, score_rank=1, ramp=0.0)
    with torch.no_grad():
        a.score_B.copy_(torch.tensor([[1.0], [0.0]]))
        a.score_A.copy_(torch.tensor([[0.0, 0.0, -2.0]]))
        a.score_R.copy_(torch.tensor([0.0, 0.25]))
        a.score_C.copy_(torch.tensor([1.0, 0.0, 0.0]))
    # S = |W0|/2 + B_s A_s + R + C = [[1.5, 1, -0.5], [3.25, 0.75, 0.75]]: the 3 lowest are dropped
    # (magnitude alone would keep 3, -4, -2 instead: the learned part moved the mask)
    S = a.importance(W0, W0)
    torch.testing.assert_close(S, torch.tensor([[1.5, 1.0, -0.5], [3.25, 0.75, 0.75]]))
    M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    Wp = a(torch.eye(3), W0, None).T  # x = I gives W'ᵀ
    torch.testing.assert_close(Wp, M * W0)
    c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (Wp * c).sum().backward()  # ∂L/∂W' = c, so ∂L/∂S = c ⊙ (W0 + s B A) = c ⊙ W0 (B = 0)
    dS = torch.tensor([[1.0, -4.0, 9.0], [-16.0, 5.0, 6.0]])
    torch.testing.assert_close(a.score_R.grad, torch.tensor([6.0, -5.0]))  # row sums
    torch.testing.assert_close(a.score_C.grad, torch.tensor([-15.0, 1.0, 15.0]))  # column sums
    torch.testing.assert_close(a.score_B.grad, torch.tensor([[-18.0], [-12.0]]))  # dS A_sᵀ
    torch.testing.assert_close(a.score_A.grad, torch.tensor([[1.0, -4.0, 9.0]]))  # B_sᵀ dS
    assert torch.equal(dS, c * W0)
    # the LoRA factors see only the kept weights: ∂L/∂B = s (c ⊙ M) Aᵀ, ∂L/∂A = s Bᵀ (c ⊙ M) = 0
    torch.testing.assert_close(a.B.grad, a.scaling * (c * M) @ a.A.detach().T)
    torch.testing.assert_close(a.A.grad, torch.zeros_like(a.A))


def perturbed_linear(**opts) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    first = nn.Linear(32, 16)
    W0 = first.weight.detach().clone()
    lin = nn.Sequential(first)
    adapters.adapt(lin, PST(**opts), targets=None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.adapter_parameters(lin):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return lin, W0


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_merged_weight_has_exactly_the_requested_sparsity(scope):
    lin, W0 = perturbed_linear(sparsity=0.3, rank=2, score_rank=2, prune_scope=scope)
    x = torch.randn(5, 32)
    y = lin(x)  # ramp 0.5 and no training step: the forward is not pruned yet
    adapters.merge_adapters(lin)
    W = lin[0].base.weight.detach()
    if scope == "layer":
        assert int((W == 0).sum()) == int(0.3 * W.numel())
    else:
        assert ((W == 0).sum(1) == int(0.3 * 32)).all()
    # the kept entries are W0 + s B A
    ((_, layer),) = adapters.adapted_layers(lin)
    a = layer.adapters["default"]
    kept = W != 0
    torch.testing.assert_close(W[kept], a.updated(W0).detach()[kept])
    assert not torch.allclose(lin(x), y)
    adapters.unmerge_adapters(lin)
    assert torch.equal(lin[0].base.weight.detach(), W0)


def test_parameter_count_is_structured_low_rank_plus_lora():
    lin = nn.Sequential(nn.Linear(32, 16))
    adapters.adapt(lin, PST(rank=4, score_rank=3), targets=None)
    out_f, in_f = 16, 32
    assert adapters.trainable_parameters(lin) == (out_f + in_f) * (3 + 1) + 4 * (out_f + in_f)
    # the ablation without data-driven importance trains the LoRA factors only; its mask is magnitude
    net = nn.Sequential(nn.Linear(32, 16))
    adapters.adapt(net, PST(rank=4, data_driven=False, ramp=0.0), targets=None)
    assert adapters.trainable_parameters(net) == 4 * (out_f + in_f)
    W = net[0].base.weight.detach()
    kept = net(torch.eye(32)).T - net[0].base.bias.detach()[:, None] != 0  # B = 0: W' = M ⊙ W
    assert kept.sum() == 256 and float(W.abs()[kept].min()) >= float(W.abs()[~kept].max())


def test_cubic_schedule_identity_at_start_and_final_level():
    assert cubic_level(0.6, 0, 10, 0.0) == 0.6
    assert cubic_level(0.6, 1, 10, 0.4) == pytest.approx(0.6 * (1 - 0.5**3))  # 2 of 4 ramp steps done
    assert cubic_level(0.6, 3, 10, 0.4) == 0.6 and cubic_level(0.6, 9, 10, 0.4) == 0.6
    assert PST(ramp=0.5).identity_at_init and not PST(ramp=0.0).identity_at_init
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(4, 32)
    y0 = lin(x)
    adapters.adapt(lin, PST(sparsity=0.5, ramp=0.5), targets=None)
    assert torch.allclose(lin(x), y0, atol=1e-6)  # level 0 and B = 0
    ((_, layer),) = adapters.adapted_layers(lin)
    a = layer.adapters["default"]
    for step in range(5):
        adapters.adapter_step(lin, step, 10)
    assert a.level == 0.5
    W = a.pruned(lin[0].base.weight.detach(), a.level).detach()
    assert int((W == 0).sum()) == 256


def test_restored_adapter_computes_at_the_final_sparsity(tmp_path):
    lin, _ = perturbed_linear(sparsity=0.5, rank=2, score_rank=2, ramp=0.5)
    adapters.save_adapters(lin, tmp_path / "a")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(32, 16))
    adapters.load_adapters(fresh, tmp_path / "a")
    x = torch.randn(3, 32)
    y = fresh(x)
    adapters.merge_adapters(lin)  # merging prunes at the final sparsity
    torch.testing.assert_close(y, lin(x))


def test_bad_options():
    bads = [
        (dict(sparsity=1.0), "sparsity"),
        (dict(ramp=1.5), "ramp"),
        (dict(prune_scope="col"), "prune_scope"),
    ]
    for bad, opt in [*bads, (dict(score_rank=-1), "score_rank")]:
        with pytest.raises(WeightsmithError, match=opt):
            PST(**bad)  # type: ignore[arg-type]
    with pytest.raises(WeightsmithError, match=r"'0.weight'.*score_rank 40"):
        adapters.adapt(nn.Sequential(nn.Linear(32, 16)), PST(score_rank=40), targets=None)
    with pytest.raises(WeightsmithError, match="PST rank 0"):
        adapters.adapt(nn.Sequential(nn.Linear(32, 16)), PST(rank=0), targets=None)
