"""Sparse Spectral Training and SLTrain pre-training, checked by hand on tiny layers: the SVD form computes
what the linear layer did; one SST step moves every singular value and only the sampled vectors, by Adam's
first step worked out by hand; a round ends with a re-decomposition that keeps the weight; SLTrain weights
from scratch are (alpha/r) B A + S with the paper's initialisation, the rest of the model trainable."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.optim.sst import SparseSpectralAdamW, SpectralLinear, to_spectral
from weightsmith.train.pretrain import sltrain_from_scratch

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def test_spectral_layer_computes_the_linear_layer():
    net, x = _net(), torch.randn(5, 6)
    before = net(x)
    assert to_spectral(net, ["re:^[02]\\."]) == ["0", "2"]
    assert isinstance(net[0], SpectralLinear) and net[0].U.shape == (10, 6) and net[0].Vh.shape == (6, 6)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=0)  # "zero distortion" of the SVD init
    with pytest.raises(WeightsmithError, match="matches none"):
        to_spectral(_net(), ["nothing"])


def test_sst_step_by_hand():
    net = _net()
    to_spectral(net, ["re:^0\\."])
    layer = net[0]
    opt = SparseSpectralAdamW(net, lr=0.01, rank=2, update_proj_gap=3, eps=1e-12)
    U0, S0, V0 = layer.U.detach().clone(), layer.S.detach().clone(), layer.Vh.detach().clone()
    net(torch.randn(8, 6)).square().mean().backward()
    gU, gS, gV = layer.U.grad.clone(), layer.S.grad.clone(), layer.Vh.grad.clone()
    opt.step()
    idx = opt.state[layer.U]["idx"]
    assert idx.numel() == 2 and len(set(idx.tolist())) == 2
    # Adam's first step is -lr * g / |g| elementwise (bias-corrected m / sqrt(v)); the 1/s_i of the
    # enhanced gradient does not change a first step's sign, so the moved entries move by exactly lr
    torch.testing.assert_close(layer.S.detach(), S0 - 0.01 * torch.sign(gS), atol=1e-6, rtol=0)
    moved = U0[:, idx] - 0.01 * torch.sign(gU[:, idx])
    torch.testing.assert_close(layer.U.detach()[:, idx], moved, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        layer.Vh.detach()[idx], V0[idx] - 0.01 * torch.sign(gV[idx]), atol=1e-6, rtol=0
    )
    rest = [i for i in range(6) if i not in idx.tolist()]
    assert torch.equal(layer.U.detach()[:, rest], U0[:, rest]) and torch.equal(
        layer.Vh.detach()[rest], V0[rest]
    )
    # the enhanced gradient is the chain-rule gradient without s_i: check the moments hold g / s_i
    torch.testing.assert_close(opt.state[layer.U]["mU"], 0.1 * gU[:, idx] / S0[idx], atol=1e-6, rtol=0)


def test_sst_round_ends_with_a_resvd_that_keeps_the_weight():
    net = _net()
    to_spectral(net, ["re:^[02]\\."])
    opt = SparseSpectralAdamW(net, lr=0.05, rank=2, update_proj_gap=2)
    data = torch.randn(16, 6)
    for _ in range(2):
        net(data).square().mean().backward()
        opt.step()
        opt.zero_grad()
    layer = net[0]
    W = layer.weight_matrix().detach().clone()
    assert not torch.allclose(layer.U.T @ layer.U, torch.eye(6), atol=1e-4)  # updates left U not orthonormal
    net(data).square().mean().backward()
    for group in opt.param_groups:
        group["lr"] = 0.0  # the third step then shows the re-decomposition alone
    opt.step()  # a new round: re-decomposed first, then stepped
    state = opt.state[layer.U]
    assert state["rounds"] == 2 and state["t"] == 1
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.Vh @ layer.Vh.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight_matrix(), W, atol=1e-5, rtol=0)  # the same weight
    with pytest.raises(WeightsmithError, match="SpectralLinear"):
        SparseSpectralAdamW(_net())
    with pytest.raises(WeightsmithError, match="update_proj_gap"):
        SparseSpectralAdamW(net, update_proj_gap=0)


def test_sltrain_from_scratch_parameterisation():
    net = _net()
    names = sltrain_from_scratch(net, "re:^0\\.", rank=2, alpha=4.0, density=0.25, seed=1)
    assert names == ["0.weight"]
    layer = net[0]
    adapter = layer.adapters["sltrain"]
    assert torch.count_nonzero(layer.base.weight) == 0 and not layer.base.weight.requires_grad
    assert adapter.values.numel() == round(0.25 * 60) and float(adapter.values.abs().max()) <= 1 / math.sqrt(
        6
    )
    assert torch.count_nonzero(adapter.B) == 0  # B = 0: W starts as the sparse part
    x = torch.randn(3, 6)
    S = torch.zeros(10, 6)
    S[adapter.index[0], adapter.index[1]] = adapter.values.detach()
    torch.testing.assert_close(layer(x), x @ S.T + layer.base.bias, atol=1e-6, rtol=0)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"2.weight", "2.bias", "0.base.bias"} <= trainable and "0.base.weight" not in trainable
    with torch.no_grad():
        adapter.B.normal_()
    W = adapter.scaling * adapter.B @ adapter.A + S
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias, atol=1e-5, rtol=0)
