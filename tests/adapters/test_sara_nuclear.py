"""SaRA's nuclear-norm penalty: the one-SVD ``nuclear_norm`` against the norm and its gradient U Vᵀ worked
by hand, against the previous path (``torch.linalg.svdvals(ΔW).sum()`` through autograd) on sparse
matrices of both orientations, and the ``nuclear_every`` schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.sara import SaRA, ineffective_support, nuclear_norm
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


@pytest.mark.parametrize("transpose", [False, True])
def test_nuclear_norm_by_hand(transpose):
    # diag(3, -4) padded: σ = (4, 3), ‖A‖_* = 7; A = U Σ Vᵀ with U Vᵀ = [[1, 0, 0], [0, -1, 0]]
    A = torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]])
    polar = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    if transpose:
        A, polar = A.T.contiguous(), polar.T.contiguous()
    A.requires_grad_()
    n = nuclear_norm(A)
    n.backward()
    assert float(n.detach()) == pytest.approx(7.0, abs=1e-6)
    assert torch.allclose(A.grad, polar, atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (7, 7)])
def test_value_and_gradient_equal_the_svdvals_path(shape):
    torch.manual_seed(1)
    A = torch.randn(shape) * (torch.rand(shape) < 0.4)  # sparse, as a SaRA update is
    A = A + torch.eye(*shape)  # keep it full rank (U Vᵀ unique)
    G = torch.randn(shape)  # an outer gradient, so the check covers the chain rule too
    a1, a2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    v1, v2 = nuclear_norm(a1), torch.linalg.svdvals(a2).sum()
    (2.5 * v1).backward()
    (2.5 * v2).backward()
    assert torch.allclose(v1, v2, atol=1e-6)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-6)
    b = A.clone().requires_grad_()
    (nuclear_norm(b) * (G * b).sum()).backward()  # product rule through nuclear_norm
    c = A.clone().requires_grad_()
    (torch.linalg.svdvals(c).sum() * (G * c).sum()).backward()
    assert torch.allclose(b.grad, c.grad, atol=1e-5)


def _adapted(**opts) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(12, 8, bias=False))
    W0 = lin[0].weight.detach().clone()
    adapters.adapt(lin, SaRA(density=0.25, **opts), targets=None)
    (V,) = adapters.adapter_parameters(lin)
    with torch.no_grad():
        V.normal_()
    return lin, W0


def test_adapter_penalty_value_and_value_gradient_unchanged():
    lin, W0 = _adapted(nuclear=0.3)
    (V,) = adapters.adapter_parameters(lin)
    reg = adapters.adapter_regularization(lin)
    reg.backward()
    support = ineffective_support(W0, 24)
    dense = torch.zeros(96).index_put((support,), V.detach().clone()).view(8, 12).requires_grad_()
    ref = 0.3 * torch.linalg.svdvals(dense).sum()  # the previous implementation's expression
    ref.backward()
    assert torch.allclose(reg, ref, atol=1e-6)
    assert torch.allclose(V.grad, dense.grad.flatten()[support], atol=1e-6)


def test_nuclear_every_applies_k_times_the_penalty_every_kth_step():
    lin, _ = _adapted(nuclear=0.3, nuclear_every=3)
    full, _ = _adapted(nuclear=0.3)
    every = float(adapters.adapter_regularization(full).detach())
    seen = []
    for step in range(7):
        seen.append(float(adapters.adapter_regularization(lin).detach()))
        adapters.adapter_step(lin, step, 10)
    assert seen[0] == pytest.approx(3 * every, rel=1e-6)
    assert seen == [seen[0], 0, 0, seen[0], 0, 0, seen[0]]


def test_bad_nuclear_every_names_the_option():
    with pytest.raises(WeightsmithError, match="nuclear_every"):
        _adapted(nuclear_every=0)
