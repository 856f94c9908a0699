"""Hydra's and SLTrain's single autograd nodes (issue 14) against their papers' equations.

Hydra (Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning", 2023):
``y = x W0ᵀ + s (x A_pᵀ) B_pᵀ + s ((x W0ᵀ) A_sᵀ) B_sᵀ``. SLTrain (Han et al., "SLTrain: a sparse plus
low-rank approach for parameter and memory efficient pretraining", 2024): ``y = x (W0 + s B A + S)ᵀ`` with
``S`` the values ``V`` at a fixed support. Each equation is written with plain autograd ops (the sequential
branch reading the base output, ``S`` scattered by ``index_put``); the nodes must give the same output and
gradients alone on a layer (``base_out`` None: the node owns ``x W0ᵀ``) and beside another adapter
(``base_out`` given), float32 tight, float64 by gradcheck, bfloat16 loose; and one step must run only the
frozen layer's full-size GEMMs (plus ``gᵀ x`` for SLTrain) with no activation-sized elementwise pass.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_group_family import grouped_vs_per_layer
from test_lora_group import tiny_llama
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from weightsmith import adapters
from weightsmith.adapters._core import amp_apply
from weightsmith.adapters.hydra import Hydra, _HydraLinear
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.sltrain import SLTrain, _SparseLowRank, random_support

torch.set_num_threads(1)
S = 0.7
GEMMS = ("mm", "addmm", "addmm_")


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def close(a: Tensor, b: Tensor, tol: float) -> bool:
    return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))


def grads(y: Tensor, g: Tensor, ts: tuple[Tensor, ...]) -> list[Tensor]:
    return list(torch.autograd.grad(y, ts, g))


# ------------------------------------------------------------------- the equations, plain autograd


def hydra_eq(x: Tensor, W0: Tensor, A_p: Tensor, A_s: Tensor, B_p: Tensor, B_s: Tensor) -> Tensor:
    dt = x.dtype
    base = F.linear(x, W0.to(dt))
    par = F.linear(F.linear(x, A_p.to(dt)), B_p.to(dt))
    seq = F.linear(F.linear(base, A_s.to(dt)), B_s.to(dt))  # the sequential branch reads the base output
    return base + S * (par + seq)


def sltrain_eq(x: Tensor, W0: Tensor, A: Tensor, B: Tensor, V: Tensor, flat: Tensor) -> Tensor:
    sparse = torch.zeros(W0.numel(), dtype=V.dtype).index_put((flat,), V).view(W0.shape)
    dW = S * B @ A + sparse
    return F.linear(x, W0.to(x.dtype)) + F.linear(x, dW.to(x.dtype))


def hydra_tensors(d_in: int = 16, d_out: int = 12, r: int = 3) -> tuple[Tensor, ...]:
    W0 = (rand(d_out, d_in, seed=1) * 0.3).detach()
    return W0, *(
        rand(*shape, seed=i) for i, shape in enumerate([(r, d_in), (r, d_out), (d_out, r), (d_out, r)], 2)
    )


def sltrain_tensors(d_in: int = 16, d_out: int = 12, r: int = 3, nnz: int = 20) -> tuple[Tensor, ...]:
    flat = random_support(d_out * d_in, nnz, torch.Generator().manual_seed(3))
    W0 = rand(d_out, d_in, seed=1).detach()
    return W0, rand(r, d_in, seed=2), rand(d_out, r, seed=3), rand(nnz, seed=4), flat


def hydra_node(base: Tensor | None, x: Tensor, W0: Tensor, *p: Tensor) -> Tensor:
    return amp_apply(_HydraLinear, base, x, W0, *p, S)


def sltrain_node(base: Tensor | None, x: Tensor, W0: Tensor, *p: Tensor) -> Tensor:
    return amp_apply(_SparseLowRank, base, x, W0, *p, S)


CASES: dict[str, Any] = {
    "hydra": (hydra_tensors, hydra_node, hydra_eq, 4),
    "sltrain": (sltrain_tensors, sltrain_node, sltrain_eq, 3),
}


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("given_base", [False, True])
@pytest.mark.parametrize("w_grad", [False, True])
def test_node_equals_the_equation_in_float32(method, given_base, w_grad):
    make, node, eq, n_params = CASES[method]
    W0, *p = make()
    W0.requires_grad_(w_grad)
    x = rand(2, 5, W0.shape[1], seed=6)
    g = rand(2, 5, W0.shape[0], seed=7).detach()
    base = F.linear(x, W0) if given_base else None  # beside another adapter: the core's product
    y, ref = node(base, x, W0, *p), eq(x, W0, *p)
    assert y.shape == ref.shape and close(y, ref, 1e-5)
    ts = (x, *p[:n_params]) + ((W0,) if w_grad else ())
    for got, want in zip(grads(y, g, ts), grads(ref, g, ts), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and close(got, want, 1e-5)


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("given_base", [False, True])
def test_node_gradcheck_float64(method, given_base):
    make, node, _, n_params = CASES[method]
    W0, *p = make(d_in=5, d_out=4, r=2, **({"nnz": 6} if method == "sltrain" else {}))
    W0 = W0.double().requires_grad_()
    params = [t.double().detach().requires_grad_() for t in p[:n_params]]
    rest = p[n_params:]
    x = rand(2, 3, 5, seed=8).double().detach().requires_grad_()

    def f(x: Tensor, W0: Tensor, *params: Tensor) -> Tensor:
        base = F.linear(x, W0) if given_base else None
        return node(base, x, W0, *params, *rest)

    assert torch.autograd.gradcheck(f, (x, W0, *params))


@pytest.mark.parametrize("method", sorted(CASES))
def test_bfloat16_activations_with_float32_parameters(method):
    make, node, eq, n_params = CASES[method]
    W0, *p = make(d_in=32, d_out=24, r=4, **({"nnz": 60} if method == "sltrain" else {}))
    with torch.no_grad():  # a realistic update: ΔW well below W0, as after some training
        for t in p[:n_params]:
            t.mul_(0.3)
    W16 = W0.to(torch.bfloat16)
    x = rand(4, 8, 32, dtype=torch.bfloat16, seed=9)
    g = rand(4, 8, 24, dtype=torch.bfloat16, seed=10).detach()
    ts = (x, *p[:n_params])
    y, y_old = node(None, x, W16, *p), eq(x, W16, *p)  # new node; the plain path in bfloat16
    exact = eq(x.float(), W16.float(), *p)
    assert y.dtype == torch.bfloat16 and close(y, y_old, 3e-2) and close(y, exact, 3e-2)
    new, old, want = grads(y, g, ts), grads(y_old, g, ts), grads(exact, g.float(), ts)
    for got, o, w in zip(new, old, want, strict=True):
        assert close(got, o, 3e-2) and close(got, w, 3e-2)
    assert [t.dtype for t in new] == [torch.bfloat16] + [torch.float32] * n_params


# ----------------------------------------------------------------------- through the core


def adapted(config: Any, module: nn.Module, *extra: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(module).requires_grad_(False)
    adapters.adapt(model, config, targets=["0"])
    for name, cfg in extra:
        adapters.adapt(model, cfg, targets=["0"], name=name)
    with torch.no_grad():
        for t in adapters.adapter_parameters(model):
            t.copy_(torch.randn(t.shape) * 0.2)
    return model


@pytest.mark.parametrize("config", [Hydra(rank=3, scale=0.5), SLTrain(rank=3, alpha=6.0, density=0.2)])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "two adapters"])
def test_adapted_layer_equals_its_merged_weight(config, kind):
    extra = [("other", LoRA(rank=2, alpha=4.0))] if kind == "two adapters" else []
    module = Conv1D(12, 16) if kind == "conv1d" else nn.Linear(16, 12)
    model = adapted(config, module, *extra)
    layer = model[0]
    x = rand(3, 4, 16, seed=11)
    y = model(x)
    W0 = layer.weight()
    delta = sum(a.delta(W0) for a in layer.adapters.values())
    ref = F.linear(x, W0 + delta) + layer.base.bias
    params = tuple(adapters.adapter_parameters(model))
    g = rand(3, 4, 12, seed=12).detach()
    assert close(y, ref, 1e-5)
    for got, want in zip(grads(y, g, (x, *params)), grads(ref, g, (x, *params)), strict=True):
        assert close(got, want, 1e-5)


# ------------------------------------------------------------------------ sibling groups


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_hydra_grouped_step_equals_per_layer(dtype: torch.dtype, tol: float) -> None:
    """q/k/v and gate/up with Hydra run as one grouped LoRA node of rank 2r each (``group_terms``)."""
    model = tiny_llama(dtype, Hydra(rank=2, scale=0.5))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    assert grouped_vs_per_layer(model, ids, tol) == [2, 2, 3, 3]


def test_hydra_grouped_under_autocast_gives_float32_gradients() -> None:
    model = tiny_llama(config=Hydra(rank=2, scale=0.5))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert len(grouped_vs_per_layer(model, ids, 3e-2)) == 4
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.adapter_parameters(model)
    )


# --------------------------------------------------------------------------- op counts


class OpLog(TorchDispatchMode):
    """Every ATen op of one step that writes memory, with its output's size; GEMMs also with (M, N, K)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        schema = func._schema
        if schema.returns and schema.returns[0].alias_info is not None and not schema.is_mutable:
            return out  # a view: writes nothing
        mnk: tuple[int, ...] = ()
        if name in GEMMS:
            a, b = args[-2], args[-1]
            mnk = (a.shape[0], b.shape[1], a.shape[1])
        self.ops.append((name, out.numel() if isinstance(out, Tensor) else 0, mnk))
        return out


def step_log(config: Any | None, tokens: int = 64, d_in: int = 24, d_out: int = 20) -> OpLog:
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).requires_grad_(False)
    if config is not None:
        adapters.adapt(model, config, targets=["0"])
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    model(x).backward(g)  # the gradients exist: the counted step accumulates as a training step does
    x.grad = None
    with OpLog() as log:
        model(x).backward(g)
    return log


def summary(log: OpLog, full: int = 20, activation: int = 64 * 20) -> tuple[int, int, list[str]]:
    """(GEMMs, full-size GEMMs: every dimension at least ``full``, non-GEMM ops writing an
    activation-sized tensor)."""
    gemms = [mnk for name, _, mnk in log.ops if name in GEMMS]
    big = [mnk for mnk in gemms if min(mnk) >= full]
    passes = [name for name, n, _ in log.ops if name not in GEMMS and n >= activation]
    return len(gemms), len(big), passes


def test_frozen_layer_reference_counts():
    assert summary(step_log(None)) == (2, 2, [])  # y = x W0ᵀ, dx = g W0


def test_hydra_step_has_the_frozen_full_size_gemms_and_no_activation_pass():
    gemms, big, passes = summary(step_log(Hydra(rank=2)))
    # forward A_s W0, h = x [A_p; A_s W0]ᵀ, h (sB)ᵀ, += x W0ᵀ; backward g (sB), gB A, += g W0, dA, dA_s, dB
    assert (gemms, big, passes) == (10, 2, [])


def test_sltrain_step_runs_one_gemm_each_way_plus_the_full_gradient():
    log = step_log(SLTrain(rank=2, density=0.1))
    gemms, big, passes = summary(log)
    # forward W_eff += s B A, x W_effᵀ; backward g W_eff, G = gᵀ x, dA, dB: three full-size (was five)
    assert (gemms, big, passes) == (6, 3, [])
    names = Counter(name for name, _, _ in log.ops)
    assert names["index_put_"] == 1 and names["index"] == 2  # one scatter, two gathers (V in, dV out)
    assert "sort" not in names and "index_add_" not in names


def test_sltrain_update_is_kept_in_the_fused_weight_at_16_bit():
    """In bfloat16 ``W_eff = W0 + ΔW`` is rounded once; an update at ``W0``'s scale shows in the output."""
    W0, A, B, V, flat = sltrain_tensors(d_in=32, d_out=24, r=4, nnz=80)
    x = rand(8, 32, dtype=torch.bfloat16, seed=13).detach()
    W16 = W0.to(torch.bfloat16)
    base = F.linear(x, W16)
    with torch.no_grad():
        y = sltrain_node(None, x, W16, A, B, V, flat)
        ref = sltrain_eq(x.float(), W16.float(), A, B, V, flat)
    change, err = (ref - base.float()).norm(), (y.float() - ref).norm()
    assert err < 0.02 * change
