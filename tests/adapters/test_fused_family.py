"""The fused LoRA step for the LoRA family (issue 14): PiSSA, AdaLoRA, LoHa, NOLA, Monarch, Compacter, DoRA.

Each of these methods is ``y = x W0ᵀ + s (x Aᵀ) Bᵀ`` for factors built from its parameters (DoRA:
``y = (m / ||W0 + sBA||) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ)``, Liu et al., "DoRA: Weight-Decomposed Low-Rank
Adaptation", 2024, eq. 5 with the norm constant in backward). Alone on a layer each now computes
``x W0ᵀ`` inside its own autograd node (``base_out`` None). Checked against the method's own dense
update written with plain autograd ops, ``x W0ᵀ + x ΔWᵀ`` (``ΔW = delta(W0)``), against the unfused
path (``base_out`` given, as the core does with several active adapters), and by counting ATen ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_lora_fused import step_ops  # top-level ATen ops of one forward + backward
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.adalora import AdaLoRA
from weightsmith.adapters.compacter import Compacter
from weightsmith.adapters.dora import DoRA, dora_forward
from weightsmith.adapters.loha import LoHa
from weightsmith.adapters.monarch import Monarch
from weightsmith.adapters.nola import NOLA
from weightsmith.adapters.pissa import PiSSA

torch.set_num_threads(1)

CONFIGS = {
    "pissa": PiSSA(rank=3, alpha=6.0),
    "adalora": AdaLoRA(init_rank=4, target_rank=2),
    "loha": LoHa(rank=2, alpha=4.0),
    "nola": NOLA(rank=3, num_basis_A=8, num_basis_B=6, alpha=3.0),
    "monarch": Monarch(nblocks=4, block_rank=1),
    "monarch_zero": Monarch(nblocks=4, block_rank=2, init="zero"),
    "compacter": Compacter(phm_dim=4, rank=2),
    "dora": DoRA(rank=3, alpha=6.0),
}
IN, OUT = 32, 48


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))


def layer(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, adapters.Adapter, torch.Tensor]:
    """A [OUT, IN] linear adapted by ``name`` with every adapter parameter random (so ΔW ≠ 0)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    with torch.no_grad():
        m[0].weight.normal_(std=0.3)
    m = m.to(dtype)
    adapters.adapt(m, CONFIGS[name], targets="re:.*")
    with torch.no_grad():
        for i, p in enumerate(adapters.adapter_parameters(m)):
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(i + 1))
            if name == "dora" and p.dim() == 1:
                p.abs_().add_(0.5)  # the magnitude vector
    wrapped = m[0]
    return m, wrapped.adapters["default"], wrapped.weight().detach()


def equation(a: adapters.Adapter, x: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
    """``x W0ᵀ + x ΔWᵀ`` with the method's dense ``ΔW`` (plain autograd ops, float32 math)."""
    return F.linear(x.float(), W0.float()) + F.linear(x.float(), a.delta(W0.float()))


def grads(y: torch.Tensor, g: torch.Tensor, ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, ts, g))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_equals_unfused_and_the_equation_in_float32(name):
    m, a, W0 = layer(name)
    assert not a.needs_base_out
    params = list(adapters.adapter_parameters(m))
    x = rand(2, 5, IN, seed=3).requires_grad_()
    g = rand(2, 5, OUT, seed=4)
    fused = a(x, W0, None)
    unfused = a(x, W0, F.linear(x, W0))
    ref = equation(a, x, W0)
    assert fused.shape == ref.shape == (2, 5, OUT)
    assert close(fused, ref, 1e-5) and close(fused, unfused, 1e-6)
    for got, old, want in zip(
        grads(fused, g, [x, *params]),
        grads(unfused, g, [x, *params]),
        grads(ref, g, [x, *params]),
        strict=True,
    ):
        assert got.dtype == want.dtype and close(got, want, 1e-5) and close(got, old, 1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_equals_unfused_in_bfloat16_with_float32_parameters(name):
    m, a, W0 = layer(name)
    W0 = W0.to(torch.bfloat16)
    params = list(adapters.adapter_parameters(m))
    x = rand(2, 8, IN, dtype=torch.bfloat16, seed=3).requires_grad_()
    g = rand(2, 8, OUT, dtype=torch.bfloat16, seed=4)
    fused = a(x, W0, None)
    unfused = a(x, W0, F.linear(x, W0))
    ref = equation(a, x, W0)
    assert fused.dtype == torch.bfloat16 and close(fused, unfused, 2e-2) and close(fused, ref, 3e-2)
    new, old = grads(fused, g, [x, *params]), grads(unfused, g, [x, *params])
    want = grads(ref, g.float(), [x, *params])
    assert [t.dtype for t in new] == [torch.bfloat16] + [p.dtype for p in params]
    for got, o, w in zip(new, old, want, strict=True):
        assert close(got, o, 3e-2) and close(got, w, 5e-2)


def test_dora_fused_gradcheck_float64_with_a_trainable_base():
    m, a, W0 = layer("dora")
    a.double()
    W0 = W0.double().requires_grad_()
    x = rand(2, 3, IN, seed=3).double().requires_grad_()
    n = a.row_norm(W0.detach())

    def f(x, W0, A, B, mag):
        return dora_forward(None, x, A, B, mag, n, a.scaling, W0)

    inputs = (x, W0, a.A.detach().clone().requires_grad_(), a.B.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(f, (*inputs, a.m.detach().clone().requires_grad_()))
    # W0's gradient (a trainable base): the norm is a constant, so dW0 = (g ⊙ m/n)ᵀ x
    g = rand(2, 3, OUT, seed=5).double()
    (dW,) = torch.autograd.grad(a(x, W0, None), [W0], g)
    c = (a.m / n).detach()
    want = (g * c).reshape(-1, OUT).t() @ x.detach().reshape(-1, IN)
    assert close(dW, want, 1e-10)


def test_adalora_dropout_sees_only_the_adapter_input():
    cfg = AdaLoRA(init_rank=4, target_rank=2, dropout=0.5)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    adapters.adapt(m, cfg, targets="re:.*")
    a, W0 = m[0].adapters["default"], m[0].weight().detach()
    with torch.no_grad():
        for i, p in enumerate(adapters.adapter_parameters(m)):
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(i + 1))
    m.train()
    x = rand(3, IN, seed=3).requires_grad_()
    torch.manual_seed(11)
    y = m(x)
    torch.manual_seed(11)
    keep = F.dropout(torch.ones(3, IN), 0.5)
    ref = F.linear(x, W0) + a.scaling * F.linear(F.linear(x * keep, a.Q * a.E), a.P)
    assert close(y, ref, 1e-6)
    params = list(adapters.adapter_parameters(m))
    g = rand(3, OUT, seed=4)
    for got, want in zip(grads(y, g, [x, *params]), grads(ref, g, [x, *params]), strict=True):
        assert close(got, want, 1e-6)


def test_loha_unfactored_layer_takes_base_out_none():
    # r² (out + in) >= out · in: LoHa builds the dense update; alone on the layer it computes x W0ᵀ itself
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4, bias=False))
    adapters.adapt(m, LoHa(rank=3, alpha=3.0), targets="re:.*")
    a, W0 = m[0].adapters["default"], m[0].weight().detach()
    assert not a.factored
    with torch.no_grad():
        for i, p in enumerate(adapters.adapter_parameters(m)):
            p.normal_(generator=torch.Generator().manual_seed(i + 1))
    x = rand(5, 6, seed=3)
    assert close(m(x), equation(a, x, W0), 1e-6) and close(a(x, W0, None), a(x, W0, F.linear(x, W0)), 1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_layer_step_has_the_base_product_inside_the_node(name):
    m, _, _ = layer(name, torch.bfloat16)
    m[0].base.requires_grad_(False)
    x = rand(2, 4, IN, dtype=torch.bfloat16).requires_grad_()
    ops = step_ops(m, x)
    # the base products x W0ᵀ and g W0 accumulate into the small GEMMs; no separate full-size sum
    assert ops["aten::addmm_"] == 2, ops
    assert "aten::add" not in ops and "aten::linear" not in ops, ops


def test_adalora_orthogonality_penalty_equals_autograd_of_its_definition():
    """``w (||PᵀP - I||_F + ||QQᵀ - I||_F) / (2 L)`` and its gradients, against autograd of the formula;
    at an exactly orthonormal ``P`` (norm 0) the gradient is 0, as autograd's norm gives."""
    m, a, _ = layer("adalora")
    L, w = a._allocator.n_layers, a._allocator.cfg.orth_weight
    eye = torch.eye(a.P.shape[1])
    want = w * ((a.P.T @ a.P - eye).norm() + (a.Q @ a.Q.T - eye).norm()) / (2 * L)
    got = a.regularizer()
    assert close(got, want, 1e-6)
    for g1, g2 in zip(
        torch.autograd.grad(got, [a.P, a.Q]), torch.autograd.grad(want, [a.P, a.Q]), strict=True
    ):
        assert close(g1, g2, 1e-6)
    with torch.no_grad():
        a.P.zero_()
        a.P[: a.P.shape[1]] = torch.eye(a.P.shape[1])  # PᵀP = I exactly
    dP, dQ = torch.autograd.grad(a.regularizer(), [a.P, a.Q])
    assert bool((dP == 0).all()) and bool(torch.isfinite(dQ).all()) and bool(dQ.abs().sum() > 0)
