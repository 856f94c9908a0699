"""LoRA, rsLoRA, DoRA, PiSSA, EVA and AdaLoRA checked against their papers' equations worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.adalora import AdaLoRA
from weightsmith.adapters.dora import DoRA
from weightsmith.adapters.eva import EVA, redistribute
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.pissa import PiSSA


def lin(out_f: int = 12, in_f: int = 20, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_lora_delta_and_scaling(rslora, expected):
    m = lin()
    adapters.adapt(m, LoRA(rank=4, alpha=16, rslora=rslora))
    a = m[0].adapters["default"]
    assert a.scaling == expected
    assert torch.count_nonzero(a.B) == 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in=20
    assert a.A.abs().max() <= bound and a.A.abs().max() > 0.5 * bound
    with torch.no_grad():
        a.B.normal_()
    x = torch.randn(5, 20)
    W = m[0].base.weight
    assert torch.allclose(m(x), x @ (W + expected * a.B @ a.A).T + m[0].base.bias, atol=1e-5)


def test_dora_matches_its_definition_and_fast_norm():
    m = lin(12, 20)
    W0 = m[0].weight.detach().clone()
    adapters.adapt(m, DoRA(rank=3, alpha=6))
    a = m[0].adapters["default"]
    assert torch.allclose(a.m, W0.norm(dim=1))
    with torch.no_grad():
        a.B.normal_()
        a.m.mul_(1.5)
    V = W0 + 2.0 * a.B @ a.A
    expected = a.m.unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(a.row_norm(W0), V.norm(dim=1), rtol=1e-5)
    x = torch.randn(5, 20)
    assert torch.allclose(m(x), x @ expected.T + m[0].base.bias, atol=1e-5)
    # the norm is a constant for the backward pass (paper, section 4.3): d/dm is V/||V|| exactly
    m(x).sum().backward()
    g = (x.sum(0) @ (V / V.norm(dim=1, keepdim=True)).T).detach()
    assert torch.allclose(a.m.grad, g, atol=1e-4)


def test_pissa_init_is_principal_part_and_residual_is_frozen():
    m = lin(12, 20)
    W0 = m[0].weight.detach().clone()
    adapters.adapt(m, PiSSA(rank=3, alpha=6))
    a = m[0].adapters["default"]
    U, S, Vh = torch.linalg.svd(W0)
    principal = (U[:, :3] * S[:3]) @ Vh[:3]
    assert torch.allclose(a.scaling * a.B @ a.A, principal, atol=1e-5)
    with torch.no_grad():
        a.A.add_(0.1 * torch.randn_like(a.A))
        a.B.add_(0.1 * torch.randn_like(a.B))
    # W' = W_res + s B A with W_res = W0 - principal (the paper's form)
    expected = (W0 - principal) + a.scaling * a.B @ a.A
    assert torch.allclose(m[0].weight() + a.delta(W0), expected, atol=1e-5)


def test_pissa_randomized_svd_is_close_to_exact():
    m = lin(40, 30)
    with torch.no_grad():  # a decaying spectrum, as in trained weights
        U, _, Vh = torch.linalg.svd(torch.randn(40, 30), full_matrices=False)
        m[0].weight.copy_((U * 0.7 ** torch.arange(30.0)) @ Vh)
    W = m[0].weight.detach().clone()
    adapters.adapt(m, PiSSA(rank=4, niter=4))
    a = m[0].adapters["default"]
    U, S, Vh = torch.linalg.svd(W)
    principal = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.allclose(a.scaling * a.B @ a.A, principal, atol=1e-3)


def test_eva_components_are_pca_of_inputs_and_ranks_redistribute():
    from sklearn.decomposition import PCA

    torch.manual_seed(0)
    # layer "a" gets inputs with a few dominant directions, layer "b" gets isotropic inputs
    model = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(16, 8)})

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
            self.m["a"](xa)
            self.m["b"](xb)

    scales = torch.tensor([10.0, 8, 6, 5] + [0.1] * 12)
    xa = torch.randn(256, 16) * scales
    xb = torch.randn(256, 16)
    net = Two()
    adapters.adapt(net, EVA(rank=2, alpha=4, rho=2), calibration=[(xa, xb)])
    A = net.m["a"].adapters["default"].A
    assert A.shape == (4, 16)
    pca = PCA(n_components=4).fit(xa.numpy())
    ref = torch.from_numpy(pca.components_).float()
    assert torch.allclose((A * ref).sum(1).abs(), torch.ones(4), atol=1e-4)  # same directions up to sign
    # layer b's isotropic directions explain less variance than layer a's top four, so b gets rank 0
    assert isinstance(net.m["b"], nn.Linear)
    cfg = net.m["a"].configs["default"]
    assert cfg.rank == 4 and cfg.alpha == 8.0  # alpha follows the rank: alpha / r stays 2
    assert torch.count_nonzero(net.m["a"].adapters["default"].B) == 0


def test_eva_redistribution_by_hand():
    ratios = {
        "x": torch.tensor([0.5, 0.3, 0.1]),
        "y": torch.tensor([0.4, 0.2, 0.05]),
        "z": torch.tensor([0.01]),
    }
    assert redistribute(ratios, 4) == {"x": 2, "y": 2, "z": 0}
    assert redistribute(ratios, 2) == {"x": 1, "y": 1, "z": 0}


def test_adalora_budget_schedule_masks_and_regularizer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10))
    adapters.adapt(net, AdaLoRA(init_rank=6, target_rank=2, tinit=2, tfinal=3, orth_weight=0.3))
    layers = [net[0].adapters["default"], net[2].adapters["default"]]
    alloc = layers[0]._allocator
    assert alloc is layers[1]._allocator and len(alloc.layers) == 2
    total = 20
    # cubic schedule from 12 to 4 triplets between step 2 and 17
    assert alloc.budget(2, total) == (12, False)
    b = alloc.budget(8, total)[0]
    assert b == int((12 - 4) * (1 - 6 / 15) ** 3 + 4)
    assert alloc.budget(18, total) == (4, True)
    # orthogonality penalty: 0.3 * mean over the 4 matrices of ||PᵀP - I||_F, ||QQᵀ - I||_F
    ref = (
        sum((a.P.T @ a.P - torch.eye(6)).norm() + (a.Q @ a.Q.T - torch.eye(6)).norm() for a in layers)
        * 0.3
        / 4
    )
    assert torch.allclose(adapters.adapter_regularization(net), ref)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(16, 10)
    for step in range(total):
        loss = (net(x) - x).square().mean()
        loss.backward()
        opt.step()
        adapters.adapter_step(net, step, total)
        opt.zero_grad()
        kept = sum(int((a.E != 0).sum()) for a in layers)
        budget, _ = alloc.budget(step, total)
        if step > 2:
            assert kept <= budget, (step, kept, budget)
    assert sum(int((a.E != 0).sum()) for a in layers) == 4


def test_hand_written_backwards_pass_gradcheck():
    from weightsmith.adapters.dora import dora_forward
    from weightsmith.adapters.lora import lora_forward

    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    base, x, A, B = t(2, 3, 5), t(2, 3, 4), t(2, 4), t(5, 2)
    assert torch.autograd.gradcheck(lambda *a: lora_forward(*a, 0.7), (base, x, A, B))
    m, n = t(5), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda b, x, A, B, m: dora_forward(b, x, A, B, m, n, 0.7), (base, x, A, B, m)
    )
