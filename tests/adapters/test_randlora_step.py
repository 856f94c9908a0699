"""RandLoRA's step with fewer weight-sized passes (issue 14), checked against the previous code's math.

The previous step built ``Af = s λ ⊙ A ⊙ γ`` in three passes (two products, a cast) and reduced ``∂Af`` to
``∂λ``, ``∂γ`` through three more (a cast and two scalings) before two batched products; it is written
out here (``old_*``) and the new one must give the same ``Af`` bit for bit and the same gradients (float64
to 1e-12, bf16 activations to float32 rounding). ``keep_weight`` (forward's ``W0 + ΔW`` kept for
backward) must give the same step as rebuilding it, and the paper's equation's gradients. A dispatch-level
count fixes the number of weight-sized elementwise passes and products of one layer's step, and a second
step (after AdamW moved λ, γ) must run the same ops on the same shapes, with no host read.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith import adapters
from weightsmith.adapters import AdapterContext, SharedBases
from weightsmith.adapters.randlora import (
    RandLoRA,
    _RandLoRAWeight,
    randlora_costs,
    scaled_rows,
    scalings_grad,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def old_scaled_rows(lam: Tensor, gamma: Tensor, A: Tensor, s: float, dtype: torch.dtype) -> Tensor:
    n, r = lam.shape
    return (lam[:, :, None] * s * A[None].to(lam.dtype) * gamma[:, None, :]).reshape(n * r, -1).to(dtype)


def old_scalings_grad(dAf: Tensor, A: Tensor, lam: Tensor, gamma: Tensor, s: float) -> tuple[Tensor, Tensor]:
    n, r = lam.shape
    P = dAf.view(n, r, -1).to(lam.dtype).mul_(A.to(lam.dtype)).mul_(s)
    return torch.bmm(P, gamma.unsqueeze(2)).view(n, r), torch.bmm(lam.unsqueeze(1), P).view(n, -1)


def old_weight_step(x, W0, lam, gamma, A, Bf, s, g):
    """The previous weight path, forward and backward, in plain tensor ops."""
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    wide = W0.shape[0] >= W0.shape[1]

    def merged(Af):
        W = W0.to(Af.dtype)
        return torch.addmm(W, Bf, Af) if wide else torch.addmm(W, Af.t(), Bf.t())

    y = torch.mm(x2, merged(old_scaled_rows(lam, gamma, A, s, x.dtype)).t())
    dx = torch.mm(g2, merged(old_scaled_rows(lam, gamma, A, s, x.dtype)))
    dW = torch.mm(g2.t(), x2)
    dAf = torch.mm(Bf.t(), dW) if wide else torch.mm(Bf.t(), dW.t())
    return (y, dx, *old_scalings_grad(dAf, A, lam, gamma, s))


def factors(n, r, d, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam, gamma = torch.randn(n, r, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    A = torch.randn(r, d + 3, generator=g, dtype=dtype)[:, :d]  # a slice, as layers slice the shared basis
    B = torch.randn(D, n * r, generator=g, dtype=dtype)
    return lam, gamma, A, B


@pytest.mark.parametrize("params,compute", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_scaled_rows_bit_for_bit_and_scalings_grad_as_before(params, compute):
    lam, gamma, A, _ = factors(4, 3, 10, 16, params)
    got, ref = scaled_rows(lam, gamma, A, 2.5, compute), old_scaled_rows(lam, gamma, A, 2.5, compute)
    assert got.dtype == compute and got.shape == (12, 10)
    assert torch.equal(got, ref)
    dAf = torch.randn(12, 10, dtype=torch.float64).to(compute)
    tol = 1e-12 if params == torch.float64 else 1e-5  # ``s`` now scales A, not P: float32 rounding apart
    new, old = scalings_grad(dAf, A, lam, gamma, 2.5), old_scalings_grad(dAf, A, lam, gamma, 2.5)
    for a, b in zip(new, old, strict=True):
        assert a.dtype == params and torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_scalings_grad_is_the_equation_by_hand():
    # n=1, r=1, d=2: Af = s λ A γ entrywise; ∂λ = s Σ_j ∂Af_j A_j γ_j, ∂γ_j = s λ ∂Af_j A_j
    lam, gamma = torch.tensor([[2.0]]), torch.tensor([[3.0, -1.0]])
    A, dAf = torch.tensor([[0.5, 4.0]]), torch.tensor([[1.0, 2.0]])
    d_lam, d_gamma = scalings_grad(dAf, A, lam, gamma, 10.0)
    assert torch.equal(d_lam, torch.tensor([[10 * (1 * 0.5 * 3 + 2 * 4 * -1.0)]]))
    assert torch.equal(d_gamma, torch.tensor([[10 * 2 * 1 * 0.5, 10 * 2 * 2 * 4.0]]))
    assert torch.equal(scaled_rows(lam, gamma, A, 10.0, torch.float32), torch.tensor([[30.0, -80.0]]))


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("keep,x_grad", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("params,compute", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_weight_path_equals_the_previous_one(shape, keep, x_grad, params, compute):
    out_f, in_f = shape
    d, D, n, r = min(shape), max(shape), 3, 3
    lam, gamma, A, Bf = factors(n, r, d, D, params, seed=1)
    W0 = torch.randn(out_f, in_f, dtype=compute)
    x = torch.randn(2, 5, in_f, dtype=compute, requires_grad=x_grad)
    g = torch.randn(2, 5, out_f, dtype=compute)
    lam_, gamma_ = lam.clone().requires_grad_(), gamma.clone().requires_grad_()
    y = _RandLoRAWeight.apply(x, W0, lam_, gamma_, A, Bf.to(compute), 1.5, keep)
    y.backward(g)
    ref = old_weight_step(x.detach(), W0, lam, gamma, A, Bf.to(compute), 1.5, g)
    assert torch.equal(y.reshape(-1, out_f), ref[0])
    assert torch.equal(x.grad.reshape(-1, in_f), ref[1]) if x_grad else x.grad is None
    tol = 1e-12 if params == torch.float64 else 1e-5
    for got, want in ((lam_.grad, ref[2]), (gamma_.grad, ref[3])):
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


def paper_step(a, W0, x):
    """``x (W0 + ΔW)ᵀ``, ``ΔW = s Σ_i B_i Λ_i A Γ_i`` term by term (autograd's own gradients)."""
    d, D = min(W0.shape), max(W0.shape)
    A = a.randlora_A[: a.rank, :d]
    M = a.scaling * sum(
        a.randlora_B[:D, i, : a.rank] @ torch.diag(a.randlora_lambda[i]) @ A @ torch.diag(a.randlora_gamma[i])
        for i in range(a.n)
    )
    return x @ (W0 + (M if W0.shape[0] >= W0.shape[1] else M.T)).T


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_keep_weight_through_the_adapter_is_the_paper_equation(shape):
    W0 = torch.randn(*shape, dtype=torch.float64)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=(shape,))
    a = RandLoRA(rank=2, alpha=4.0, path="weight", keep_weight=True).create(W0.float(), ctx).double()
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    x = torch.randn(7, shape[1], dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (lambda: a(x, W0, None), lambda: paper_step(a, W0, x)):
        x.grad = None
        for p in a.parameters():
            p.grad = None
        y = fn()
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view(y.shape))
        results.append((y.detach(), x.grad.clone(), *(p.grad.clone() for p in a.parameters())))
    for got, want in zip(*results, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_costs_with_keep_weight_by_hand_and_the_option():
    # N=2, W0 [3, 2], k=2 (test_randlora_boft_paths: weight path 72 with an input gradient); keeping
    # forward's W saves the rebuild Bf Af = 3*2*2 = 12 multiply-adds
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=True, keep=True) == (72, 60)
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=False, keep=True) == (52, 48)
    with pytest.raises(WeightsmithError, match="'keep_weight'"):
        RandLoRA(keep_weight="yes")  # type: ignore[arg-type]


class OpLog(TorchDispatchMode):
    """Every ATen op with its output's shape and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...], Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        shape = tuple(first.shape) if isinstance(first, Tensor) else ()
        self.ops.append((func.overloadpacket.__name__, shape, getattr(first, "dtype", None)))
        return out


NO_WORK = {"view", "t", "unsqueeze", "alias", "detach", "empty", "_unsafe_view", "reshape", "expand", "slice"}


def weight_sized(ops, size):
    """Ops that read or write at least ``size`` elements and do work (no views, no allocations)."""
    return Counter(op for op, shape, _ in ops if op not in NO_WORK and torch.Size(shape).numel() >= size)


def layer_step(keep, shape=(96, 64), tokens=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)).to(torch.bfloat16)
    adapters.adapt(model, RandLoRA(rank=8, path="weight", keep_weight=keep), targets="0")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    x = torch.randn(tokens, shape[1], dtype=torch.bfloat16, requires_grad=True)
    logs = []
    for _ in range(3):  # the first step also casts the shared bases to bf16, once for all layers
        with OpLog() as log:
            model(x).float().square().sum().backward()
        logs.append(log.ops)
        opt.step()
        opt.zero_grad()
    return logs[1:]


@pytest.mark.parametrize(
    "keep,expected",
    [
        # forward: s λ ⊙ A, ⊙ γ (into bf16), W0 + Bf Af; backward: the same two passes and W0 + Bf Af
        # again, ∂W = gᵀ x, ∂Af = Bfᵀ ∂W, P = ∂Af ⊙ s A (before: 9 elementwise passes, not 5)
        (False, {"mul": 5, "addmm": 2, "mm": 2}),
        (True, {"mul": 3, "addmm": 1, "mm": 2}),  # forward's W kept: no rebuild, no second Af
    ],
)
def test_weight_sized_passes_of_one_layer_step(keep, expected):
    first, second = layer_step(keep)
    assert dict(weight_sized(first, 64 * 64)) == expected
    assert first == second  # the same ops on the same shapes at other λ, γ: one CUDA graph replays both
    assert not {op for op, _, _ in first} & {"_local_scalar_dense", "item", "nonzero", "is_nonzero"}


def test_keep_weight_compiles_as_eager():
    """``torch.compile`` (AOT autograd, no code generation) traces the weight path with a kept weight
    (the benchmark's ``-compile`` libraries) and gives the eager outputs and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Linear(20, 12, bias=False))
    adapters.adapt(model, RandLoRA(rank=4, path="weight", keep_weight=True), targets="0,1")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_()
    x = torch.randn(16, 12, requires_grad=True)
    results = []
    for net in (model, torch.compile(model, backend="aot_eager")):
        for p in (*params, x):
            p.grad = None
        y = net(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), *(p.grad.clone() for p in params)))
    for got, want in zip(*results, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
