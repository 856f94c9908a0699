"""VeRA, RandLoRA, Bone/MiSS and HRA against PEFT 0.21 on the same input with the same parameters.

Each test builds one ``nn.Linear``, wraps it with PEFT, copies PEFT's frozen bases and random trainable
values into our adapter, and compares the layer output and the merged weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from weightsmith.adapters import AdapterContext, SharedBases  # noqa: E402
from weightsmith.adapters.bone import Bone  # noqa: E402
from weightsmith.adapters.hra import HRA  # noqa: E402
from weightsmith.adapters.randlora import RandLoRA  # noqa: E402
from weightsmith.adapters.vera import VeRA  # noqa: E402

TOL = 1e-6


class Net(nn.Module):
    def __init__(self, out_f: int, in_f: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(in_f, out_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def ours(config, W0: torch.Tensor):
    ctx = AdapterContext("lin.weight", 0, 0, "linear", SharedBases(0), shapes=(tuple(W0.shape),))
    return config.create(W0, ctx)


def peft_layer(net: Net, config):
    model = peft.get_peft_model(net, config)
    return model, model.base_model.model.lin


def compare(model, layer, adapter, W0: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """Max abs differences of (layer output, merged weight) between PEFT and ours, relative to the
    largest entry of PEFT's (float32 sums of many products differ in rounding order)."""
    x = torch.randn(6, W0.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_peft = layer(x)
        y_ours = adapter(x, W0, x @ W0.T) + bias
        merged = model.merge_and_unload().lin.weight
        d_out = float((y_peft - y_ours).abs().max() / (1 + y_peft.abs().max()))
        d_w = float((merged - adapter.merge(W0)).abs().max() / (1 + merged.abs().max()))
    return d_out, d_w


def rand_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_vera_matches_peft(shape):
    net = Net(*shape)
    W0, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model, layer = peft_layer(net, peft.VeraConfig(r=8, target_modules=["lin"]))
    a = ours(VeRA(rank=8), W0)
    with torch.no_grad():
        a.vera_A.copy_(layer.vera_A["default"])
        a.vera_B.copy_(layer.vera_B["default"])
        for name, seed in (("vera_lambda_d", 1), ("vera_lambda_b", 2)):
            v = rand_like(getattr(a, name), seed)
            getattr(layer, name)["default"].copy_(v)
            getattr(a, name).copy_(v)
    d_out, d_w = compare(model, layer, a, W0, bias)
    assert d_out < TOL and d_w < TOL


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_randlora_matches_peft(shape):
    """PEFT pairs B's column ``i r + k`` with A-row ``k n + i``; both bases are random, so we copy
    PEFT's B into our layout with the pairing PEFT uses and compare the updates exactly."""
    net = Net(*shape)
    W0, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    r = 8
    model, layer = peft_layer(net, peft.RandLoraConfig(r=r, randlora_alpha=16, target_modules=["lin"]))
    a = ours(RandLoRA(rank=r, alpha=16.0), W0)
    n, D = a.n, max(shape)
    A_p = layer.randlora_A["default"]  # [r, 1, d]
    B_p = layer.randlora_B["default"][:D, :n, :].reshape(D, n * r)  # column i r + k
    lam = rand_like(a.randlora_lambda, 1)  # ours [n, r]
    gam = rand_like(a.randlora_gamma, 2)  # [n, d]
    with torch.no_grad():
        a.randlora_A.copy_(A_p[:, 0, :])
        a.randlora_B.copy_(B_p.reshape(D, r, n).permute(0, 2, 1))  # ours[:, i, k] = B_p[:, k n + i]
        a.randlora_lambda.copy_(lam)
        a.randlora_gamma.copy_(gam)
        layer.randlora_lambda["default"].copy_(lam.T)
        layer.randlora_gamma["default"].copy_(gam)
    d_out, d_w = compare(model, layer, a, W0, bias)
    assert d_out < TOL and d_w < TOL


@pytest.mark.parametrize(("variant", "peft_init"), [("miss", True), ("bat", "bat"), ("mini", "mini")])
def test_bone_matches_peft_miss(variant, peft_init):
    net = Net(32, 48)
    W0, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    cfg = peft.MissConfig(r=8, init_weights=peft_init, mini_r=4, target_modules=["lin"])
    model, layer = peft_layer(net, cfg)
    a = ours(Bone(rank=8, variant=variant, mini_r=4), W0)
    assert tuple(a.miss_block.shape) == tuple(layer.miss_block["default"].shape)
    v = rand_like(a.miss_block, 1) * 0.1
    with torch.no_grad():
        a.miss_block.copy_(v)
        layer.miss_block["default"].copy_(v)
    d_out, d_w = compare(model, layer, a, W0, bias)
    assert d_out < TOL and d_w < TOL


def test_bone_miss_partial_block_matches_peft():
    """in_features not a multiple of r: PEFT pads x and uses the first rows of the shard for the tail."""
    net = Net(16, 20)
    W0, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model, layer = peft_layer(net, peft.MissConfig(r=8, target_modules=["lin"]))
    a = ours(Bone(rank=8), W0)
    v = rand_like(a.miss_block, 1)
    with torch.no_grad():
        a.miss_block.copy_(v)
        layer.miss_block["default"].copy_(v)
    d_out, d_w = compare(model, layer, a, W0, bias)
    assert d_out < TOL and d_w < TOL


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_hra_matches_peft(shape):
    net = Net(*shape)
    W0, bias = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model, layer = peft_layer(net, peft.HRAConfig(r=6, target_modules=["lin"]))
    a = ours(HRA(rank=6), W0)
    # identity at init in both, then the same random reflections
    x = torch.randn(4, shape[1])
    with torch.no_grad():
        assert float((layer(x) - net.lin.base_layer(x)).abs().max()) < 1e-5
        u = rand_like(a.hra_u, 1)
        a.hra_u.copy_(u)
        layer.hra_u["default"].copy_(u)
    d_out, d_w = compare(model, layer, a, W0, bias)
    assert d_out < TOL and d_w < TOL
