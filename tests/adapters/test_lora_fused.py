"""LoRA's fused step (issue 14): the base product inside LoRA's autograd node.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021: ``y = x W0ᵀ + s (x Aᵀ) Bᵀ``.
Alone on a layer, LoRA computes ``x W0ᵀ`` itself so that ``dx = g W0 + s (g B) A`` is one GEMM that
accumulates into the small one. Checked against the equation written with plain autograd ops, against
the unfused path (``base_out`` given), and by counting the ATen ops of one step.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from weightsmith import adapters
from weightsmith.adapters.lora import LoRA, lora_forward

torch.set_num_threads(1)
S = 0.7


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def reference(x, W0, A, B, s, base=None):
    """The paper's equation with plain autograd ops (float32 parameters, math in x's dtype)."""
    base = F.linear(x, W0) if base is None else base
    return base + s * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))


def grads(y: torch.Tensor, g: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, ts, g))


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))


@pytest.mark.parametrize("w_grad", [False, True])
def test_fused_equals_the_equation_in_float32(w_grad):
    x, W0, A, B = rand(2, 3, 16), rand(24, 16, seed=1), rand(4, 16, seed=2), rand(24, 4, seed=3)
    W0.requires_grad_(w_grad)
    g = rand(2, 3, 24, seed=4).detach()
    y = lora_forward(None, x, A, B, S, W0)
    ref = reference(x, W0, A, B, S)
    assert y.shape == ref.shape and close(y, ref, 1e-6)
    ts = (x, W0, A, B) if w_grad else (x, A, B)
    for got, want in zip(grads(y, g, *ts), grads(ref, g, *ts), strict=True):
        assert got.dtype == want.dtype and close(got, want, 1e-6)


def test_fused_gradcheck_float64():
    def t(*shape: int) -> torch.Tensor:
        return rand(*shape).double().detach().requires_grad_()

    x, W0, A, B = t(2, 3, 5), t(4, 5), t(2, 5), t(4, 2)
    assert torch.autograd.gradcheck(lambda x, W0, A, B: lora_forward(None, x, A, B, S, W0), (x, W0, A, B))


def test_fused_equals_unfused_in_bfloat16_with_float32_parameters():
    x = rand(4, 8, 32, dtype=torch.bfloat16)
    W0 = rand(48, 32, dtype=torch.bfloat16, seed=1).detach()
    A, B = rand(8, 32, seed=2), rand(48, 8, seed=3)
    g = rand(4, 8, 48, dtype=torch.bfloat16, seed=4).detach()
    y = lora_forward(None, x, A, B, S, W0)
    y_old = lora_forward(F.linear(x, W0), x, A, B, S)
    ref = reference(x.float(), W0.float(), A, B, S)
    assert y.dtype == torch.bfloat16 and close(y, y_old, 2e-2) and close(y, ref, 2e-2)
    fused, unfused = grads(y, g, x, A, B), grads(y_old, g, x, A, B)
    exact = grads(ref, g.float(), x, A, B)
    for got, old, want in zip(fused, unfused, exact, strict=True):
        assert close(got, old, 3e-2) and close(got, want, 3e-2)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.float32, torch.float32]


class Net(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 24, bias=bias)
        self.conv = Conv1D(12, 24)  # GPT-2 layout: W0 is a transposed view
        with torch.no_grad():
            self.conv.weight.normal_(std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.lin(x)))


def adapted(bias: bool, dropout: float = 0.0, **opts) -> Net:
    m = Net(bias)
    adapters.adapt(m, LoRA(rank=4, alpha=8.0, dropout=dropout, **opts), targets="lin,conv")
    with torch.no_grad():
        for p in adapters.adapter_parameters(m):
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(p.numel()))
    return m


def merged_reference(m: Net, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``x (W0 + s B A)ᵀ + b`` layer by layer, dropout masks ``keep`` on each LoRA input."""
    outs = x
    for i, (layer, act) in enumerate(((m.lin, torch.tanh), (m.conv, None))):
        a = layer.adapters["default"]
        W0 = layer.weight().detach()
        xd = outs if keep is None else outs * keep[i]
        y = F.linear(outs, W0) + a.scaling * F.linear(F.linear(xd, a.A), a.B)
        bias = getattr(layer.base, "bias", None)
        y = y + bias if bias is not None else y
        outs = act(y) if act is not None else y
    return outs


@pytest.mark.parametrize("bias", [False, True])
def test_adapted_layers_with_bias_and_conv1d_equal_the_merged_equation(bias):
    m = adapted(bias)
    x = rand(3, 5, 16)
    y, ref = m(x), merged_reference(m, x)
    assert close(y, ref, 1e-6)
    params = list(adapters.adapter_parameters(m))
    g = rand(3, 5, 12, seed=7).detach()
    for got, want in zip(grads(y, g, x, *params), grads(ref, g, x, *params), strict=True):
        assert close(got, want, 1e-6)


def test_dropout_sees_only_the_adapter_input():
    m = adapted(True, dropout=0.5).train()
    x = rand(3, 5, 16)
    torch.manual_seed(11)
    y = m(x)
    torch.manual_seed(11)
    keep = [F.dropout(torch.ones(3, 5, 16), 0.5), F.dropout(torch.ones(3, 5, 24), 0.5)]
    ref = merged_reference(m, x, keep)
    assert close(y, ref, 1e-6)
    params = list(adapters.adapter_parameters(m))
    g = rand(3, 5, 12, seed=7).detach()
    for got, want in zip(grads(y, g, x, *params), grads(ref, g, x, *params), strict=True):
        assert close(got, want, 1e-6)
    m.eval()  # no dropout: the fused path, same as the equation without masks
    assert close(m(x), merged_reference(m, x), 1e-6)


def test_two_active_loras_add_their_updates():
    m = adapted(True)
    adapters.adapt(m, LoRA(rank=2, alpha=2.0, seed=3), targets="lin,conv", name="second")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "second" in n:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(p.numel() + 1))
    x = rand(3, 5, 16)
    h = x
    for layer, act in ((m.lin, torch.tanh), (m.conv, None)):
        W = layer.weight().detach() + sum(a.delta(None) for a in layer.adapters.values())
        h = F.linear(h, W) + (layer.base.bias if layer.base.bias is not None else 0)
        h = act(h) if act is not None else h
    assert close(m(x), h, 1e-5)


def test_autocast_bfloat16_gives_float32_gradients_close_to_the_equation():
    m = adapted(False)
    x = rand(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        assert m.lin(x).dtype == torch.bfloat16  # as autocast's nn.Linear (the conv's fp32 bias promotes y)
    params = list(adapters.adapter_parameters(m))
    g = rand(3, 5, 12, seed=7).detach()
    got = grads(y.float(), g, *params)
    want = grads(merged_reference(m, x), g, *params)
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, want, strict=True):
        assert close(a, b, 5e-2)


def step_ops(m: nn.Module, x: torch.Tensor) -> collections.Counter[str]:
    """Top-level ATen ops of one forward + backward (nested ATen calls not counted again)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = m(x)
        y.backward(torch.ones_like(y))
    out: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            out[e.name] += 1
    return out


def test_one_layer_step_has_no_gradient_sum_and_one_node():
    lin = nn.Linear(32, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    m = nn.Sequential(lin)
    adapters.adapt(m, LoRA(rank=4, alpha=8.0), targets="re:.*")
    x = torch.randn(2, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    ops = step_ops(m, x)
    # forward h = x Aᵀ, h (sB)ᵀ, += x W0ᵀ; backward g (sB), (g sB) A, += g W0, dA, dB: GEMMs only
    assert ops["aten::mm"] + ops["aten::addmm_"] == 8, ops
    assert ops["aten::addmm_"] == 2, ops  # both base products accumulate into the small ones
    assert "aten::add" not in ops and "aten::linear" not in ops, ops  # no separate gradient sum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_gradients_written_in_float32_by_the_gemm():
    dev = torch.device("cuda")
    x = rand(4, 64, 128, dtype=torch.bfloat16).detach().to(dev).requires_grad_()
    W0 = rand(96, 128, dtype=torch.bfloat16, seed=1).detach().to(dev)
    A, B = (
        rand(8, 128, seed=2).detach().to(dev).requires_grad_(),
        rand(96, 8, seed=3).detach().to(dev).requires_grad_(),
    )
    g = rand(4, 64, 96, dtype=torch.bfloat16, seed=4).detach().to(dev)
    got = grads(lora_forward(None, x, A, B, S, W0), g, x, A, B)
    want = grads(reference(x.float(), W0.float(), A, B, S), g.float(), x, A, B)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.float32]
    for a, b in zip(got, want, strict=True):
        assert close(a, b, 3e-2)
