"""MixtureGrowth template banks checked by hand: the block grid ``W_rc = Σ_k c_rc,k T_k`` on a worked
example, the gradients of templates and coefficients against those of an equal plain ``nn.Linear``
(``∂L/∂c_rc,k = ⟨G_rc, T_k⟩``, ``∂L/∂T_k = Σ_rc c_rc,k G_rc``), shared banks trained jointly, and growth
keeping the small networks in the diagonal blocks (zero new blocks: exactly the mean of their logits)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.adapters.mixturegrowth_bank import (
    TemplateLinear,
    bank_networks,
    grow_bank,
    new_coefficients,
    to_mlp,
    train_jointly,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _layer() -> TemplateLinear:
    T = nn.Parameter(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]))  # I, swap
    c = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # a 1 x 2 grid
    return TemplateLinear(T, c, torch.tensor([0.5, -0.5]))


def test_block_grid_by_hand():
    layer = _layer()
    # block (0,0) = 1 I + 2 swap = [[1, 2], [2, 1]];  block (0,1) = 3 I = [[3, 0], [0, 3]]
    expected = torch.tensor([[1.0, 2.0, 3.0, 0.0], [2.0, 1.0, 0.0, 3.0]])
    assert torch.equal(layer.weight, expected)
    assert (layer.in_features, layer.out_features) == (4, 2)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(layer(x), torch.tensor([[1.5, 4.5]]))  # rows of W summed at columns 0, 3, + b


def test_gradients_reach_templates_and_coefficients_as_for_a_plain_linear():
    torch.manual_seed(0)
    T = nn.Parameter(torch.randn(3, 4, 5, dtype=torch.float64))
    layer = TemplateLinear(T, torch.randn(2, 2, 3, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    x, target = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    plain = nn.Linear(10, 8, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.zero_()
    ((plain(x) - target) ** 2).sum().backward()
    assert plain.weight.grad is not None and layer.coefficients.grad is not None and T.grad is not None
    G = plain.weight.grad.reshape(2, 4, 2, 5).permute(0, 2, 1, 3)  # G[r, c] = the block's gradient
    by_hand_c = torch.einsum("rcoi,koi->rck", G, T.detach())
    by_hand_T = torch.einsum("rck,rcoi->koi", layer.coefficients.detach(), G)
    assert torch.allclose(layer.coefficients.grad, by_hand_c)
    assert torch.allclose(T.grad, by_hand_T)


def test_bank_networks_share_templates_and_train_jointly():
    a, b = bank_networks(4, (5,), 3, n_networks=2, n_templates=2, seed=0)
    la, lb = a.layers(), b.layers()
    assert all(x.templates is y.templates for x, y in zip(la, lb, strict=True))
    coefs = torch.cat([la[0].coefficients.reshape(1, -1), lb[0].coefficients.reshape(1, -1)])
    assert torch.allclose(coefs @ coefs.T, torch.eye(2), atol=1e-6)  # orthonormal start
    assert sum(p.numel() for p in nn.ModuleList([a, b]).parameters()) == (
        2 * (5 * 4 + 3 * 5) + 2 * 2 * 2 + 2 * (5 + 3)  # banks once, coefficients and biases per network
    )
    torch.manual_seed(1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    before = [p.detach().clone() for p in (la[0].templates, la[0].coefficients, lb[0].coefficients)]

    def loss() -> float:
        with torch.no_grad():
            return float(sum(nn.functional.cross_entropy(n(x), y) for n in (a, b)))

    start = loss()
    train_jointly([a, b], x, y, epochs=20, lr=1e-2, batch_size=8)
    after = (la[0].templates, la[0].coefficients, lb[0].coefficients)
    assert all(not torch.equal(p0, p1) for p0, p1 in zip(before, after, strict=True))
    assert loss() < start


def _trained_smalls(n: int = 2, K: int = 3) -> list:
    smalls = bank_networks(4, (5, 5), 3, n_networks=n, n_templates=K, seed=0)
    torch.manual_seed(0)
    train_jointly(smalls, torch.randn(16, 4), torch.randint(0, 3, (16,)), epochs=2, batch_size=8)
    return smalls


def test_growth_keeps_the_small_networks_in_the_diagonal_blocks():
    a, b = _trained_smalls()
    x = torch.randn(7, 4)
    big = grow_bank([a, b], coef_init="zero")
    with torch.no_grad():
        assert torch.allclose(big(x), (a(x) + b(x)) / 2, atol=1e-6)
    big = grow_bank([a, b], coef_init="orthogonal", seed=1)
    assert big.hidden == (10, 10)
    W = big.layers()[1].weight.detach()
    assert torch.allclose(W[:5, :5], a.layers()[1].weight.detach(), atol=1e-6)
    assert torch.allclose(W[5:, 5:], b.layers()[1].weight.detach(), atol=1e-6)
    assert torch.allclose(big.layers()[0].weight[5:], b.layers()[0].weight, atol=1e-6)  # rows stacked
    assert torch.allclose(big.layers()[2].weight[:, :5], a.layers()[2].weight / 2, atol=1e-6)  # averaged
    assert big.layers()[0].templates is not a.layers()[0].templates  # the grown network has its own copy
    with torch.no_grad():
        assert torch.allclose(to_mlp(big)(x), big(x), atol=1e-6)
    # every block, the new ones included, is trained: templates and coefficients get gradient
    grown = grow_bank([a, b], coef_init="zero")
    nn.functional.cross_entropy(grown(x), torch.randint(0, 3, (7,))).backward()
    g = grown.layers()[1].coefficients.grad
    assert g is not None and float(g[0, 1].abs().sum()) > 0 and float(g[1, 0].abs().sum()) > 0


def test_own_banks_are_concatenated_and_coefficients_padded():
    a, b = bank_networks(4, (5, 5), 3, n_networks=2, n_templates=2, seed=0, shared=False)
    assert a.layers()[1].templates is not b.layers()[1].templates
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for net in (a, b):  # trained one after the other, as in the paper's code
        train_jointly([net], x, y, epochs=2, batch_size=8)
    big = grow_bank([a, b], coef_init="zero")
    with torch.no_grad():
        assert torch.allclose(big(x), (a(x) + b(x)) / 2, atol=1e-6)
    big = grow_bank([a, b], coef_init="orthogonal", seed=2)  # K = 2 each: a 2-D complement in R^4
    mid = big.layers()[1]
    T = [net.layers()[1].templates.detach() for net in (a, b)]
    assert torch.equal(mid.templates.detach(), torch.cat(T))
    ca, cb = (net.layers()[1].coefficients.detach().flatten() for net in (a, b))
    C = mid.coefficients.detach()
    assert torch.equal(C[0, 0], torch.cat([ca, torch.zeros(2)]))
    assert torch.equal(C[1, 1], torch.cat([torch.zeros(2), cb]))
    padded = torch.stack([C[0, 0], C[1, 1]])
    assert torch.allclose(torch.stack([C[0, 1], C[1, 0]]) @ padded.T, torch.zeros(2, 2), atol=1e-6)
    assert torch.allclose(mid.weight[5:, 5:], b.layers()[1].weight, atol=1e-6)


def test_new_coefficients_orthogonal_and_convex():
    learned = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    new = new_coefficients(learned, 3, "orthogonal", scale=0.5, seed=0)
    assert torch.allclose(new @ learned.T, torch.zeros(3, 2), atol=1e-6)
    assert torch.allclose(new.norm(dim=1), torch.full((3,), 0.5 * 1.5))  # scale x mean learned norm
    assert not torch.allclose(new[0], new[1])  # a random direction in the 2-D complement
    convex = new_coefficients(learned, 4, "convex", seed=0)
    w = convex[:, :2] / learned.diagonal()  # the weights on c_1, c_2, read off by hand
    assert torch.allclose(convex[:, 2:], torch.zeros(4, 2))
    assert bool((w >= 0).all()) and torch.allclose(w.sum(1), torch.ones(4))
    assert torch.equal(new_coefficients(learned, 2, "zero"), torch.zeros(2, 4))


def test_bad_options_name_the_option():
    a, b = _trained_smalls(K=2)
    with pytest.raises(WeightsmithError, match="coef_init='orthogonal'"):
        grow_bank([a, b], coef_init="orthogonal")  # K = 2 templates, 2 learned directions: no complement
    with pytest.raises(WeightsmithError, match="coef_init"):
        grow_bank([a, b], coef_init="copy")
    with pytest.raises(WeightsmithError, match="coef_init"):  # checked even with no hidden-to-hidden layer
        grow_bank(bank_networks(4, (5,), 3), coef_init="copy")
    with pytest.raises(WeightsmithError, match="scale"):
        grow_bank([a, b], coef_init="convex", scale=-1.0)
    c = bank_networks(4, (5, 5), 3, seed=1)[0]  # a, b share a bank, c has another: neither form
    with pytest.raises(WeightsmithError, match="one shared bank or on one bank each"):
        grow_bank([a, b, c], coef_init="convex")
    with pytest.raises(WeightsmithError, match="n_networks"):
        bank_networks(4, (5,), 3, n_networks=1)
    with pytest.raises(WeightsmithError, match="coefficients"):
        TemplateLinear(nn.Parameter(torch.zeros(2, 3, 3)), torch.zeros(1, 1, 3), torch.zeros(3))
