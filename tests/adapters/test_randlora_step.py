"""RandLoRA's step with fewer weight-sized passes (issue 14), checked against the previous code's math.

The previous step built ``Af = s λ ⊙ A ⊙ γ`` in three passes (two products, a cast) and reduced ``∂Af`` to
``∂λ``, ``∂γ`` through three more (a cast and two scalings) before two batched products; it is written
out here (``old_*``) and the new one must give the same ``Af`` bit for bit and the same gradients (float64
to 1e-12, bf16 activations to float32 rounding). ``keep_weight`` (forward's ``W0 + ΔW`` kept for
backward) must give the same step as rebuilding it, and the paper's equation's gradients. A dispatch-level
count fixes the number of weight-sized elementwise passes and products of one layer's step, and a second
step (after AdamW moved λ, γ) must run the same ops on the same shapes, with no host read.

Session 2026-12-01: ``∂Af = Bfᵀ gᵀ x`` runs through the tokens, ``(g Bf)ᵀ x``, when that is fewer
multiply-adds (no [out, in] ``∂W``): float64 to 1e-12 as before, bf16 as close to float64 as the
previous order (the two round a different intermediate to bf16). ``s A`` is made once for all layers
(``scaled_basis``), so a step has no [n, r] or [r, d] scaling kernels: float64 to 1e-15, bf16 ``Af``
within one bf16 step of before.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith import adapters
from weightsmith.adapters import AdapterContext, SharedBases, randlora
from weightsmith.adapters.randlora import (
    RandLoRA,
    _RandLoRAWeight,
    grad_through_tokens,
    randlora_costs,
    scaled_basis,
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


@pytest.mark.parametrize("params,compute", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_scaled_basis_carries_s_with_the_previous_values(params, compute):
    """``Af`` from ``s A`` (made once) and ``s = 1`` against the previous ``(s λ) ⊙ A ⊙ γ``: float rounding
    of the parameters' dtype apart, so in bf16 the same values but for a rare one-ulp tie; ``∂λ``, ``∂γ``
    as before (they already scaled ``A``)."""
    lam, gamma, A, _ = factors(16, 8, 64, 96, params)
    sA = scaled_basis(A, 20.0, params)
    got, ref = scaled_rows(lam, gamma, sA, 1.0, compute), old_scaled_rows(lam, gamma, A, 20.0, compute)
    assert got.dtype == compute
    if params == torch.float64:
        assert torch.allclose(got, ref, rtol=1e-15, atol=0)
    else:
        f32 = scaled_rows(lam, gamma, sA, 1.0, params)
        assert torch.allclose(f32, old_scaled_rows(lam, gamma, A, 20.0, params), rtol=3e-7, atol=0)
        off = got != ref
        assert off.sum() <= got.numel() // 1000
        assert torch.allclose(got[off].float(), ref[off].float(), rtol=2**-8, atol=0)
    dAf = torch.randn(128, 64, dtype=torch.float64).to(compute)
    # the same products as scalings_grad(…, A, …, s), which multiplied s into A already
    new, before = scalings_grad(dAf, sA, lam, gamma, 1.0), scalings_grad(dAf, A, lam, gamma, 20.0)
    assert all(torch.equal(a, b) for a, b in zip(new, before, strict=True))


def test_scaled_basis_is_made_once_and_again_after_a_change():
    A = torch.randn(4, 6)
    sA = scaled_basis(A, 2.5, torch.float32)
    assert scaled_basis(A, 2.5, torch.float32) is sA and torch.equal(sA, A * 2.5)
    assert torch.equal(scaled_basis(A, 0.5, torch.float64), A.double() * 0.5)  # another s, another dtype
    with torch.no_grad():
        A.add_(1.0)  # e.g. PEFT bases copied in
    again = scaled_basis(A, 2.5, torch.float32)
    assert again is not sA and torch.equal(again, A * 2.5)


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
@pytest.mark.parametrize("tokens", [10, 40])  # ∂Af through the tokens (10 < ~D) or through ∂W (40)
def test_weight_path_equals_the_previous_one(shape, keep, x_grad, params, compute, tokens):
    out_f, in_f = shape
    d, D, n, r = min(shape), max(shape), 3, 3
    assert grad_through_tokens(tokens, D, d, n * r) == (tokens == 10)
    lam, gamma, A, Bf = factors(n, r, d, D, params, seed=1)
    W0 = torch.randn(out_f, in_f, dtype=compute)
    x = torch.randn(2, tokens // 2, in_f, dtype=compute, requires_grad=x_grad)
    g = torch.randn(2, tokens // 2, out_f, dtype=compute)
    lam_, gamma_ = lam.clone().requires_grad_(), gamma.clone().requires_grad_()
    y = _RandLoRAWeight.apply(x, W0, lam_, gamma_, A, Bf.to(compute), 1.5, keep)
    y.backward(g)
    ref = old_weight_step(x.detach(), W0, lam, gamma, A, Bf.to(compute), 1.5, g)
    assert torch.equal(y.reshape(-1, out_f), ref[0])
    assert torch.equal(x.grad.reshape(-1, in_f), ref[1]) if x_grad else x.grad is None
    # bf16 through the tokens rounds g Bf, not gᵀ x: as close to float64 (the next test), not to the old
    tol = 1e-12 if params == torch.float64 else 1e-5 if tokens == 40 else 2e-2
    for got, want in ((lam_.grad, ref[2]), (gamma_.grad, ref[3])):
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


def rel_err(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_grad_through_the_tokens_in_bf16_is_as_close_to_float64_as_before(shape):
    """bf16 activations, float32 scalings, 32 tokens (< D: ``(g Bf)ᵀ x``): the new order's ∂λ, ∂γ are as
    close to the float64 gradient of the same inputs as the previous order's (each rounds one intermediate
    to bf16; relative errors about 2e-3)."""
    out_f, in_f = shape
    d, D, r = min(shape), max(shape), 8
    new_errs, old_errs = [], []
    for seed in range(3):
        lam, gamma, A, Bf = factors(d // r, r, d, D, torch.float32, seed=seed)
        Bf = Bf.to(torch.bfloat16)
        W0 = torch.randn(out_f, in_f).to(torch.bfloat16)
        x, g = torch.randn(32, in_f).to(torch.bfloat16), torch.randn(32, out_f).to(torch.bfloat16)
        assert grad_through_tokens(32, D, d, d)
        lam_, gamma_ = lam.clone().requires_grad_(), gamma.clone().requires_grad_()
        _RandLoRAWeight.apply(x, W0, lam_, gamma_, A, Bf, 1.5, True).backward(g)
        old = old_weight_step(x, W0, lam, gamma, A, Bf, 1.5, g)
        f64 = [t.double() for t in (x, W0, lam, gamma, A, Bf)]
        ref = old_weight_step(*f64[:6], 1.5, g.double())
        for got, was, want in ((lam_.grad, old[2], ref[2]), (gamma_.grad, old[3], ref[3])):
            new_errs.append(rel_err(got, want))
            old_errs.append(rel_err(was, want))
    assert max(new_errs) < 5e-3 and max(old_errs) < 5e-3
    assert sum(new_errs) <= 1.15 * sum(old_errs)
    assert all(a <= 1.5 * b for a, b in zip(new_errs, old_errs, strict=True))


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
    # and ∂Af = (g Bf)ᵀ x: 2*3*2 + 2*2*2 = 20, not gᵀ x 12 + Bfᵀ ∂W 12 (test_randlora_boft_paths)
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=True, keep=True) == (72, 56)
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=False, keep=True) == (52, 44)
    # the benchmark's shapes at 4096 tokens: through the tokens where D = 5632 > N, not at D = 2048
    assert [grad_through_tokens(4096, D, d, d) for D, d in ((2048, 2048), (2048, 256), (5632, 2048))] == [
        False,
        False,
        True,
    ]
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


def weight_sized(ops, size, tokens):
    """Ops that write at least ``size`` elements and do work (no views, no allocations), but not
    activation-sized ones (``tokens`` rows)."""
    return Counter(
        op
        for op, shape, _ in ops
        if op not in NO_WORK and torch.Size(shape).numel() >= size and shape[:1] != (tokens,)
    )


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
    "keep,tokens,expected",
    [
        # forward: λ ⊙ s A, ⊙ γ (into bf16), W0 + Bf Af; backward: the same two passes and W0 + Bf Af
        # again, ∂Af = (g Bf)ᵀ x (16 tokens < D = 96: no [out, in] ∂W), P = ∂Af ⊙ s A (before session
        # 2026-11-30: 9 elementwise passes, not 5)
        (False, 16, {"mul": 5, "addmm": 2, "mm": 1}),
        (True, 16, {"mul": 3, "addmm": 1, "mm": 1}),  # forward's W kept: no rebuild, no second Af
        (True, 128, {"mul": 3, "addmm": 1, "mm": 2}),  # 128 tokens: ∂W = gᵀ x, then Bfᵀ ∂W
    ],
)
def test_weight_sized_passes_of_one_layer_step(keep, tokens, expected):
    first, second = layer_step(keep, tokens=tokens)
    assert dict(weight_sized(first, 64 * 64, tokens)) == expected
    # s A is made once for all layers: no s λ [n, r, 1] in forward, no s A [r, d] in backward
    assert not [shape for op, shape, _ in first if op == "mul" and shape in {(8, 8, 1), (8, 64)}]
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


# The fused kernels (adapters/_randlora_triton.py). With a GPU they run on CUDA; without one under Triton's
# interpreter on CPU tensors, which needs TRITON_INTERPRET=1 before Triton is imported: the parent process
# runs this file's kernel tests again in a child process with it set (and skips them itself).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (DEV == "cpu" and not INTERPRETED),
    reason="needs Triton; on the CPU runs in test_kernels_under_the_interpreter's child process",
)
KERNEL_TESTS = 10  # the tests marked runs_kernels, parameters counted


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or DEV != "cpu" or INTERPRETED,
    reason="only a GPU-less parent process with Triton spawns the child",
)
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "kernel_", __file__]
    run = subprocess.run(
        cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == KERNEL_TESTS, run.stdout[-2000:]


@pytest.fixture
def kernels_here(monkeypatch):
    """The kernels run on ``DEV`` (under the interpreter the CPU stands for the GPU); yields their calls."""
    from weightsmith.adapters import _randlora_triton as rt

    monkeypatch.setattr(randlora, "KERNEL_DEVICES", (DEV,))
    monkeypatch.delenv(randlora.KERNEL_ENV, raising=False)
    calls: Counter[str] = Counter()
    for name in ("scaled_rows", "scalings_grad"):
        fn = getattr(rt, name)
        monkeypatch.setattr(rt, name, lambda *a, _fn=fn, _name=name: calls.update([_name]) or _fn(*a))
    return calls


def basis_slice(r, d, seed=0):
    """``s A`` as the adapter passes it: rows and columns of a wider shared basis (row stride > d)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r + 2, d + 40, generator=g) * 20.0)[:r, :d].to(DEV)


@runs_kernels
@pytest.mark.parametrize("r", [3, 1])  # not a power of two; one row a basis
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_scaled_rows_is_the_torch_path(kernels_here, dtype, r, monkeypatch):
    n, d = 4, 300  # d over two column blocks
    lam, gamma, _, _ = factors(n, r, d, 1, torch.float32, seed=2)
    lam, gamma, sA = lam.to(DEV), gamma.to(DEV), basis_slice(r, d)
    assert randlora.kernel_ok(lam, gamma, sA, 1.0)
    got = scaled_rows(lam, gamma, sA, 1.0, dtype)
    monkeypatch.setenv(randlora.KERNEL_ENV, "torch")
    want = scaled_rows(lam, gamma, sA, 1.0, dtype)
    assert got.dtype == dtype and got.shape == (n * r, d)
    if dtype == torch.float32 or DEV == "cuda":
        assert torch.equal(got, want)  # the same float32 products in the same order, one rounding
    else:  # the interpreter truncates float32 to bf16 where torch rounds to nearest: one bf16 step at most
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)


@runs_kernels
@pytest.mark.parametrize("r", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_scalings_grad_is_the_torch_path(kernels_here, dtype, r, monkeypatch):
    n, d = 4, 300
    lam, gamma, _, _ = factors(n, r, d, 1, torch.float32, seed=3)
    lam, gamma, sA = lam.to(DEV), gamma.to(DEV), basis_slice(r, d, seed=1)
    dAf = torch.randn(n * r, d).to(dtype).to(DEV)
    got = scalings_grad(dAf, sA, lam, gamma, 1.0)
    monkeypatch.setenv(randlora.KERNEL_ENV, "torch")
    want = scalings_grad(dAf, sA, lam, gamma, 1.0)
    for a, b in zip(got, want, strict=True):  # float32 sums in another order
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@runs_kernels
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_kernel_weight_path_step_is_the_torch_step(kernels_here, shape, monkeypatch):
    """A whole weight-path step (bf16 activations, float32 scalings) with the kernels and without."""
    torch.manual_seed(0)
    out_f, in_f = shape
    W0 = torch.randn(out_f, in_f).to(torch.bfloat16).to(DEV)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=(shape,))
    a = RandLoRA(rank=4, path="weight").create(W0.float(), ctx).to(DEV)
    with torch.no_grad():
        a.randlora_lambda.normal_()
    x = torch.randn(16, in_f).to(torch.bfloat16).to(DEV).requires_grad_()
    results = []
    for mode in ("auto", "torch"):
        monkeypatch.setenv(randlora.KERNEL_ENV, mode)
        x.grad = a.randlora_lambda.grad = a.randlora_gamma.grad = None
        y = a(x, W0, None)
        y.float().square().sum().backward()
        results.append((y.float(), x.grad.float(), a.randlora_lambda.grad, a.randlora_gamma.grad))
        assert dict(kernels_here) == {"scaled_rows": 1, "scalings_grad": 1}  # then no more with "torch"
    for got, want in zip(*results, strict=True):  # bf16 results: within a bf16 step (the interpreter's cast)
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_where_the_fused_kernels_apply(monkeypatch):
    monkeypatch.setattr(randlora, "triton_installed", lambda: True)
    monkeypatch.setattr(randlora, "KERNEL_DEVICES", ("cpu",))
    lam, gamma, A, _ = factors(2, 3, 8, 1, torch.float32)
    assert randlora.kernel_ok(lam, gamma, A, 1.0, torch.zeros(6, 8))
    assert not randlora.kernel_ok(lam, gamma, A, 2.0)  # the basis must carry s
    assert not randlora.kernel_ok(lam.double(), gamma.double(), A.double(), 1.0)
    assert not randlora.kernel_ok(lam, gamma, A.t().contiguous().t(), 1.0)  # rows not contiguous
    assert not randlora.kernel_ok(lam, gamma, A, 1.0, torch.zeros(8, 6).t())
    assert not randlora.kernel_ok(lam, gamma, A, 1.0, torch.zeros(6, 8, dtype=torch.float64))  # ∂Af's dtype
    monkeypatch.setattr(randlora, "KERNEL_DEVICES", ("cuda",))
    assert not randlora.kernel_ok(lam, gamma, A, 1.0)
    monkeypatch.setattr(randlora, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setenv(randlora.KERNEL_ENV, "torch")
    assert not randlora.kernel_ok(lam, gamma, A, 1.0)
    monkeypatch.setenv(randlora.KERNEL_ENV, "fast")
    with pytest.raises(WeightsmithError, match=randlora.KERNEL_ENV):
        randlora.kernel_ok(lam, gamma, A, 1.0)
