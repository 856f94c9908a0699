"""SVFit's and LoLDU's weight path: ``ΔW = L diag(c) R`` without forming ``B = L diag(c)`` (issue 14).

The node (:class:`weightsmith.adapters.frozen_a._FrozenDiagWeight`) is checked against the previous
node's math written out here with autograd ops (``B = L ⊙ c``, ``W = W0 + B R``, ``y = x Wᵀ``): output
and every gradient, in float64 (to rounding) and bfloat16 (no further from float64 truth than the
previous math), on each way of taking ``∂c`` (``G`` route; ``rows`` route ending in [out, k] or [k, in];
the row dot over [N, k]) and with either factor scaled. At the benchmark's shapes (a 1.1B Llama block,
4096 tokens, on fake tensors: shapes only) it counts the GEMMs (the same five) and the memory traffic of
everything else (less than half). Capture safety with tests/adapters/test_capture_safe.py's tools: no
host read in a step, no host tensor in a forward on fake CUDA, and a whole graphed step equal to eager
steps on its CPU model of a CUDA graph. Also: ``torch.compile(fullgraph=True)``, LoLDU's coefficient
node against the product rule, VeRA still on its own node.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_capture_safe import HostSyncWatch, cpu_graphs, graphed_equals_eager  # noqa: F401 (fixture)
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from weightsmith.adapters import _core, frozen_a
from weightsmith.adapters.frozen_a import _rows_dot, frozen_a_route, frozen_diag_forward
from weightsmith.adapters.loldu import LoLDU, LoLDUAdapter
from weightsmith.adapters.svfit import SVFit, SVFitAdapter
from weightsmith.adapters.vera import VeRA

torch.set_num_threads(1)


def previous(x: Tensor, W0: Tensor, L: Tensor, c: Tensor, R: Tensor) -> Tensor:
    """The previous weight path, written out: ``B = L ⊙ c`` in the parameters' dtype, cast to the
    activations' dtype, ``W = W0 + B R``, ``y = x Wᵀ`` (autograd takes ``∂B`` back to ``c``)."""
    dt = x.dtype
    B = L * c
    return x @ torch.addmm(W0.to(dt), B.to(dt), R.to(dt)).T


def factors(shape: tuple[int, int], k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(sum(shape) + k)
    out_f, in_f = shape
    W0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    L = torch.randn(out_f, k, generator=g, dtype=torch.float64) / k**0.5
    R = torch.randn(k, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    c = torch.randn(k, generator=g, dtype=torch.float64)
    return W0, L, R, c


def run(fn: Any, x: Tensor, W0: Tensor, L: Tensor, c: Tensor, R: Tensor) -> list[Tensor]:
    x, c = x.detach().requires_grad_(True), c.detach().requires_grad_(True)
    y = fn(x, W0, L, c, R)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape).to(y.dtype))
    assert x.grad is not None and c.grad is not None
    return [y.detach(), x.grad, c.grad]


def rel(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def new(x: Tensor, W0: Tensor, L: Tensor, c: Tensor, R: Tensor) -> Tensor:
    return frozen_diag_forward(x, W0, None, L, c, R, "weight")


# (shape, k, rows): the G route, the rows route ending in [out, k] / [k, in], and the row dot over [N, k]
CASES = {
    "G, L scaled": ((12, 20), 12, 30),
    "G, R scaled": ((20, 12), 12, 30),
    "G, square": ((16, 16), 16, 40),
    "rows [out, k]": ((12, 20), 3, 30),
    "rows [k, in]": ((20, 12), 3, 30),
    "row dot [N, k]": ((20, 12), 3, 6),
    "row dot, L scaled": ((12, 20), 3, 6),
}


def test_cases_take_the_ways_they_name() -> None:
    for name, ((out_f, in_f), k, n) in CASES.items():
        route = frozen_a_route(n, out_f, in_f, k)
        assert route == ("G" if name.startswith("G") else "rows"), name
        assert _rows_dot(n, out_f, in_f, k) == name.startswith("row dot"), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_equals_the_previous_math(case: str) -> None:
    shape, k, n = CASES[case]
    W0, L, R, c = factors(shape, k, torch.float64)
    x = torch.randn(n // 2, 2, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    want = run(previous, x, W0, L, c, R)
    for u, v in zip(run(new, x, W0, L, c, R), want, strict=True):
        assert rel(u, v) < 1e-12


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_is_as_close_to_float64_as_the_previous_math(case: str) -> None:
    """bf16 activations and frozen weight, float32 factors and ``c`` (the benchmark's setting): each output
    and gradient is as far from the float64 result as the previous math's, up to rounding (which operand
    of a GEMM is rounded to bf16 differs: 1.5x + 2e-3 at these tiny sizes; equal at [200, 120]), and
    within 2%."""
    shape, k, n = CASES[case]
    W0, L, R, c = factors(shape, k, torch.float64)
    W0 = W0.to(torch.bfloat16)
    L, R, c = L.float(), R.float(), c.float()
    x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    truth = run(previous, x.double(), W0.double(), L.double(), c.double(), R.double())
    old = run(previous, x, W0, L, c, R)
    got = run(new, x, W0, L, c, R)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for i, (u, v, t) in enumerate(zip(got, old, truth, strict=True)):
        assert rel(u, t) <= 1.5 * rel(v, t) + 2e-3 and rel(u, t) < 2e-2, (i, rel(u, t), rel(v, t))


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_adapter_under_autocast_equals_the_previous_math(method: str) -> None:
    """Through the adapter (float32 parameters, ``x`` float32 under bf16 autocast, cast once inside)
    against the previous math on the bf16 casts; ``c`` is SVFit's ``σ - σ_r`` / LoLDU's ``σ z - σ0 z0``."""
    W0, L, R, _ = factors((20, 12), 12, torch.float64)
    L, R, W0 = L.float(), R.float(), W0.float()
    a: Any
    if method == "svfit":
        a = SVFitAdapter(L, torch.rand(12) + 0.5, R, path="weight")
        with torch.no_grad():
            a.sigma.mul_(1.3)
    else:
        a = LoLDUAdapter(L, torch.rand(12) + 0.5, R, 0.7, path="weight")
        with torch.no_grad():
            a.z.mul_(1.3)
            a.sigma.fill_(0.9)
    x = torch.randn(3, 10, 12, requires_grad=True)

    def adapter() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a(x, W0, None)  # type: ignore[no-any-return]

    def written_out() -> Tensor:
        c = a.sigma - a.sigma0 if method == "svfit" else a.sigma * a.z - a.sigma0 * a.z0
        return previous(x.to(torch.bfloat16), W0.to(torch.bfloat16), L, c, R)

    results = []
    for fn in (adapter, written_out):
        for p in (x, *a.parameters()):
            p.grad = None
        y = fn()
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in a.parameters())])
    assert len(results[0]) == (3 if method == "svfit" else 4)
    for u, v in zip(*results, strict=True):
        assert u.dtype == v.dtype and rel(u, v) < 1e-2


# ------------------------------------------------------------- the benchmark's shapes, on fake tensors

# a block of the 1.1B Llama of benchmarks/bench_adapters.py (hidden 2048, MLP 5632, 4 KV heads of 64)
BLOCK = {"q": (2048, 2048), "k": (256, 2048), "v": (256, 2048), "o": (2048, 2048)}
BLOCK |= {"gate": (5632, 2048), "up": (5632, 2048), "down": (2048, 5632)}
GEMMS = ("mm", "addmm")
VIEWS = {"view", "t", "_unsafe_view", "reshape", "transpose", "slice", "expand", "unsqueeze", "alias",
         "detach", "as_strided", "empty", "ones_like", "select", "squeeze", "sym_size"}  # fmt: skip


class Passes(TorchDispatchMode):
    """GEMMs (count, multiply-adds) and the bytes every other op reads and writes. A float32 copy of a
    bf16 GEMM's output is the CPU's stand-in for a GEMM that writes float32 on CUDA (``mm_float32``): not
    counted."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: collections.Counter[str] = collections.Counter()
        self.macs = self.bytes = 0
        self.outputs: list[tuple[str, torch.dtype, int]] = []
        self._gemm_out: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
        if name in GEMMS:
            a, b = args[-2:]
            self.gemms[name] += 1
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
            self._gemm_out.add(id(out))
        elif name == "_to_copy" and id(args[0]) in self._gemm_out:
            pass
        elif name not in VIEWS and isinstance(out, Tensor):
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.outputs.append((name, out.dtype, out.numel()))
        return out


def block_step(node: Any, tokens: int = 4096) -> list[Passes]:
    """One forward and backward of ``node(x, W0, L, c, R)`` per layer of :data:`BLOCK` (full rank: SVFit's
    and LoLDU's default), bf16 activations and weights, float32 factors and ``c``: shapes only."""
    found = []
    with FakeTensorMode():
        for out_f, in_f in BLOCK.values():
            k = min(out_f, in_f)
            L, R, c = torch.empty(out_f, k), torch.empty(k, in_f), torch.empty(k, requires_grad=True)
            W0 = torch.empty(out_f, in_f, dtype=torch.bfloat16)
            x = torch.empty(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
            node(x, W0, L, c, R).sum().backward()  # the casts of the frozen factors, made once
            g = torch.empty(tokens, out_f, dtype=torch.bfloat16)
            x.grad = c.grad = None
            with Passes() as p:
                node(x, W0, L, c, R).backward(g)
            found.append(p)
    return found


def previous_node(x: Tensor, W0: Tensor, L: Tensor, c: Tensor, R: Tensor) -> Tensor:
    """The node SVFit and LoLDU took before (VeRA's still): ``B = L ⊙ c`` formed, then ``W0 + B A``."""
    return frozen_a.frozen_a_forward(x, W0, None, L * c, R, "weight")


def test_benchmark_block_same_gemms_and_under_half_the_other_traffic() -> None:
    before, after = block_step(previous_node), block_step(new)
    for (name, (out_f, in_f)), b, a in zip(BLOCK.items(), before, after, strict=True):
        k = min(out_f, in_f)
        # W = W0 + ΔW (W0 in the epilogue), x Wᵀ, g W and two products for ∂c: the same multiply-adds
        assert a.gemms == b.gemms == {"addmm": 1, "mm": 4}, name
        assert a.macs == b.macs, name
        # weight-sized: the scaled narrower factor (bf16) and one float32 dot; no float32 wider factor
        big = [(op, dt) for op, dt, n in a.outputs if n >= k * min(out_f, in_f)]
        assert sorted(big, key=str) == [("mul", torch.bfloat16), ("mul_", torch.float32)], (name, big)
        assert not [o for o in a.outputs if o[1] == torch.float32 and o[2] > k * min(out_f, in_f, 4096)]
        assert a.bytes < b.bytes, name
    total_before, total_after = sum(p.bytes for p in before), sum(p.bytes for p in after)
    assert total_after < 0.5 * total_before, (total_before, total_after)


def test_only_the_wider_factor_is_cast_at_the_benchmark_shapes() -> None:
    """4096 rows of gate [5632, 2048]: ``L`` (U) cast once for the GEMMs, ``R`` read in float32 only; with
    fewer rows than either side the row dot casts both."""
    for tokens, cast_R in ((4096, False), (64, True)):
        with FakeTensorMode():
            L, R, c = torch.empty(5632, 2048), torch.empty(2048, 2048), torch.empty(2048, requires_grad=True)
            x = torch.empty(tokens, 2048, dtype=torch.bfloat16)
            new(x, torch.empty(5632, 2048, dtype=torch.bfloat16), L, c, R).sum().backward()
            assert (L in _core._CASTS) and ((R in _core._CASTS) == cast_R)


# ------------------------------------------------------------------------------ capture safety, VeRA

WEIGHT_PATH = {"svfit": SVFit(path="weight"), "loldu": LoLDU(path="weight")}
BLOCK_TOY = ((16, 24), (20, 16))  # test_capture_safe.step_model's layers


@pytest.mark.parametrize("method", sorted(WEIGHT_PATH))
@pytest.mark.parametrize("rows", [5, 20, 40])  # [16, 24] and [20, 16] at full rank: row dot, rows, G
def test_step_reads_nothing_back_to_the_host(method: str, rows: int) -> None:
    from test_capture_safe import forward_backward, step_model

    assert [
        (frozen_a_route(rows, o, i, min(o, i)), _rows_dot(rows, o, i, min(o, i))) for o, i in BLOCK_TOY
    ] == [[("rows", True), ("rows", False), ("G", False)][[5, 20, 40].index(rows)]] * 2
    net = step_model(WEIGHT_PATH[method])
    with HostSyncWatch() as watch:
        forward_backward(net, torch.randn(rows, 24))
    assert watch.found == []
    assert any(name == "addmm" for name, _ in watch.ops)  # the weight path ran


@pytest.mark.parametrize("method", sorted(WEIGHT_PATH))
def test_forward_on_fake_cuda_copies_nothing_from_the_host(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_capture_safe import HostCopyWatch, fake_cuda, step_model

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    net = step_model(WEIGHT_PATH[method])
    mode = fake_cuda(net)
    with mode, torch.no_grad(), HostCopyWatch():
        y = net(torch.randn(40, 24, device="cuda"))
    assert y.device.type == "cuda"


@pytest.mark.parametrize("method", sorted(WEIGHT_PATH))
def test_graphed_step_equals_eager_on_the_cpu_graph_model(method: str, cpu_graphs: Any) -> None:  # noqa: F811
    """Five AdamW steps of a tiny adapted Llama (16 rows: the row dot for q/o/gate/up/down, the rows route
    for k/v), one captured step replayed kernel by kernel against eager steps."""
    graphed_equals_eager(WEIGHT_PATH[method], "cpu", cpu_graphs, layers=1)


def test_vera_keeps_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """VeRA's ``B = Λ_b B Λ_d`` is not a column scaling of one frozen factor: it stays on the generic node."""
    calls = collections.Counter[str]()
    for cls in (frozen_a._FrozenAWeight, frozen_a._FrozenDiagWeight):
        original = cls.forward

        def spy(*args: Any, _name: str = cls.__name__, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(*args)

        monkeypatch.setattr(cls, "forward", staticmethod(spy))
    from test_capture_safe import step_model

    for cfg in (VeRA(rank=4, path="weight"), SVFit(path="weight")):
        step_model(cfg)(torch.randn(5, 24)).sum().backward()
    assert calls == {"_FrozenAWeight": 2, "_FrozenDiagWeight": 2}


def test_loldu_coefficients_equal_the_product_rule() -> None:
    """``c = σ z - σ0 z0`` in one node (``addcmul(-σ0 z0, z, σ)``): value and ``∂σ = z · ∂c``, ``∂z = σ ∂c``
    against the previous math (``σ z - σ0 z0`` with autograd's product rule)."""
    from weightsmith.adapters.frozen_a import Coefficients as _Coefficients

    g = torch.Generator().manual_seed(4)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    z, z0, dc = (torch.randn(7, dtype=torch.float64, generator=g) for _ in range(3))
    z.requires_grad_(True)
    got = _Coefficients.apply(sigma, z, z0 * -1.5)
    (got * dc).sum().backward()
    mine = [got.detach(), sigma.grad, z.grad]
    sigma.grad = z.grad = None
    want = sigma * z - 1.5 * z0
    (want * dc).sum().backward()
    for u, v in zip(mine, [want.detach(), sigma.grad, z.grad], strict=True):
        assert u is not None and v is not None
        torch.testing.assert_close(u, v, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda s, t: _Coefficients.apply(s, t, z0 * -1.5), (sigma, z))


def loldu_layer(
    shape: tuple[int, int], k: int, path: str, dtype: torch.dtype, device: str = "cpu"
) -> tuple[LoLDUAdapter, Tensor]:
    """A LoLDU adapter with random factors, ``σ0 = 0.7`` and ``z``, ``σ`` moved off their start."""
    W0, L, R, _ = factors(shape, k, torch.float64)
    z0 = torch.rand(k, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    a = LoLDUAdapter(L.float(), z0.float(), R.float(), 0.7, path=path).to(device, dtype)
    with torch.no_grad():
        a.z.mul_(torch.linspace(0.7, 1.3, k, dtype=dtype, device=device))
        a.sigma.fill_(0.9)
    return a, W0.to(device, dtype)


@pytest.mark.parametrize("path", ["weight", "activation"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loldu_float64_equals_the_previous_coefficients(case: str, path: str) -> None:
    """The adapter (held ``-σ0 z0``, one-kernel coefficients) against the previous math written out:
    ``c = σ z - σ0 z0`` by autograd's product rule, ``B = PL ⊙ c``, ``W0 + B U``; output and the gradients
    of ``x``, ``z`` and ``σ`` to 1e-12 in float64, on each way of taking ``∂c`` and on both paths."""
    a, W0, x = loldu_equals_previous(case, path)
    assert a.m0.dtype == torch.float64 and torch.equal(a.m0, a.z0 * -0.7)  # re-made from z0 on the move
    with torch.no_grad():
        assert rel(a(x, W0, None), previous(x, W0, a.PL, a.sigma * a.z - a.sigma0 * a.z0, a.U)) < 1e-12


def loldu_equals_previous(case: str, path: str, device: str = "cpu") -> tuple[LoLDUAdapter, Tensor, Tensor]:
    """One step of :func:`loldu_layer` in float64 against the previous math written out: output and the
    gradients of ``x``, ``z`` and ``σ`` to 1e-12; the adapter, ``W0`` and ``x`` for more checks."""
    shape, k, n = CASES[case]
    a, W0 = loldu_layer(shape, k, path, torch.float64, device)
    x = torch.randn(n, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device)
    g = torch.cos(torch.arange(n * shape[0], dtype=torch.float64)).view(n, shape[0]).to(device)
    results = []
    for fn in (
        lambda x: a(x, W0, None),
        lambda x: previous(x, W0, a.PL, a.sigma * a.z - a.sigma0 * a.z0, a.U),
    ):
        xr = x.clone().requires_grad_(True)
        a.zero_grad(set_to_none=True)
        y = fn(xr)
        y.backward(g)
        results.append([y.detach(), xr.grad, a.z.grad, a.sigma.grad])
    for u, v in zip(*results, strict=True):
        assert u is not None and v is not None and rel(u, v) < 1e-12
    return a, W0, x


def layer_step_kernels(
    adapter: Any, shape: tuple[int, int], tokens: int, launched: list[str] | None = None
) -> list[str]:
    """The ops one training step of one adapted layer dispatches (bf16 activations and weight, float32
    factors and parameters, gradients already allocated as in a graphed step), views and the CPU's float32
    copies of GEMM outputs (CUDA's GEMM writes float32 itself) left out; with ``launched`` (the list a
    recording ``_frozen_diag_triton._launch`` appends to) the Triton kernels of that step appended."""
    ops: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    out_f, in_f = shape
    W0 = torch.empty(out_f, in_f, dtype=torch.bfloat16)
    x = torch.empty(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    g = torch.empty(tokens, out_f, dtype=torch.bfloat16)
    adapter(x, W0, None).backward(g)  # allocates the gradients and the factors' casts
    if launched is not None:
        launched.clear()
    with Ops():
        adapter(x, W0, None).backward(g)
    kernels = [op for op in ops if op not in VIEWS | {"device", "_to_copy"}]  # _to_copy: the GEMM's float32
    return kernels + [f"triton:{name}" for name in launched or []]


@pytest.mark.parametrize("tokens", [64, 4096])  # the row dot; the benchmark's G / rows routes
def test_loldu_layer_step_is_svfits_plus_the_product_rule(tokens: int) -> None:
    """On the torch path (the CPU; CUDA without Triton or under ``torch.compile``), at the benchmark's
    shapes (one block), one LoLDU layer step dispatches SVFit's ops with ``σ - σ0`` replaced by the one
    ``addcmul``, plus what its second parameter needs: ``∂z = σ ∂c`` (mul), ``∂σ = z · ∂c`` (dot) and the
    accumulation of ``∂σ`` (add_). With Triton: :func:`test_loldu_step_launches_what_svfits_does`."""
    with FakeTensorMode():
        for out_f, in_f in BLOCK.values():
            k = min(out_f, in_f)
            L, R, s = torch.empty(out_f, k), torch.empty(k, in_f), torch.empty(k)
            sv = layer_step_kernels(SVFitAdapter(L, s, R, path="weight"), (out_f, in_f), tokens)
            ld = layer_step_kernels(LoLDUAdapter(L, s, R, 1.0, path="weight"), (out_f, in_f), tokens)
            assert sv[0] == "sub" and ld[0] == "addcmul", (sv, ld)
            extra = collections.Counter(ld[1:]) - collections.Counter(sv[1:])
            assert extra == {"dot": 1, "mul": 1, "add_": 1} and len(ld) == len(sv) + 3, (sv, ld)
            assert not collections.Counter(sv[1:]) - collections.Counter(ld[1:])


@pytest.mark.parametrize("config", [SVFit(path="weight"), LoLDU(path="weight")])
def test_weight_path_compiles_whole_to_the_eager_result(config: Any) -> None:
    """``torch.compile(fullgraph=True)`` (AOT autograd, no code generation) on each way of taking ``∂c``:
    15 rows of [48, 32] at full rank take the row dot, 40 the rows route, 200 the G route."""
    from test_lowrank_nodes import one_layer

    m = one_layer(config)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    assert [frozen_a_route(n, 48, 32, 32) + str(_rows_dot(n, 48, 32, 32)) for n in (15, 40, 200)] == [
        "rowsTrue", "rowsFalse", "GFalse"
    ]  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for n in (15, 40, 200):
        x = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
        results = []
        for net in (m, compiled):
            m.zero_grad(set_to_none=True)
            y = net(x)
            y.square().mean().backward()
            results.append([y.detach(), *(p.grad for p in m.parameters() if p.grad is not None)])
        assert len(results[1]) == 1 + sum(p.requires_grad for p in m.parameters())
        for u, v in zip(*results, strict=True):
            assert rel(u, v) < 1e-6


# ------------------------------------- LoLDU's coefficients inside the node's kernels (Triton on CUDA)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_triton = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()) or importlib.util.find_spec("triton") is None,
    reason="Triton kernels: on CUDA, or in test_triton_under_the_interpreter's child process",
)
TRITON_CHILD_TESTS = 14  # the runs_triton tests, parameters counted


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the Triton kernels launched (the real launches still run)."""
    from weightsmith.adapters import _frozen_diag_triton as kernels

    names: list[str] = []
    real = kernels._launch

    def spy(name: str, *args: Any, **meta: Any) -> None:
        names.append(name)
        real(name, *args, **meta)

    monkeypatch.setattr(kernels, "_launch", spy)
    return names


@pytest.mark.skipif(
    INTERPRETED or torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="only a GPU-less parent process with Triton spawns the child",
)
def test_triton_under_the_interpreter() -> None:
    """The Triton tests below on CPU tensors under Triton's interpreter (it must be set before Triton is
    imported: a child process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-k",
        "triton_and_",
        __file__,
    ]
    run = subprocess.run(
        cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == TRITON_CHILD_TESTS, run.stdout[-2000:]


@runs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(70, 130), (64, 128)], ids=["ragged", "whole-tiles"])
def test_triton_and_torch_kernels_agree(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """``scale`` against ``addcmul`` and the scaling (by columns and by rows, into bf16 and the parameters'
    dtype); ``diag_grad`` against ``mul``, ``sum``, ``σ ∂c`` and ``z · ∂c`` (rows and, through transposed
    views, columns), at several row splits."""
    from weightsmith.adapters import _frozen_diag_triton as kernels
    from weightsmith.adapters.frozen_a import _mul_to

    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEV, dtype)  # noqa: E731
    F, sigma = rnd(*shape), rnd(())
    for by_col, n in ((True, shape[1]), (False, shape[0])):
        z, m0 = rnd(n), rnd(n)
        for out in (dtype, torch.bfloat16):
            got = kernels.scale(F, z, sigma, m0, by_col, out)
            want = _mul_to(F, torch.addcmul(m0, z, sigma).unsqueeze(0 if by_col else 1), out)
            assert got.dtype == out
            # one bf16 unit: the interpreter truncates its casts to 16 bits (CUDA rounds as torch)
            tol = 2**-7 if out == torch.bfloat16 else 1e-15 if dtype == torch.float64 else 2e-7
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=1e-6)
    A, B = rnd(300, shape[1]), rnd(300, shape[1]).to(torch.bfloat16)  # B as the row dot's bf16 x Rᵀ
    for rows_t, cols_t in ((A, B), (A.t(), B.t())):  # column sums; row sums of the transposes
        z = rnd(rows_t.shape[1])
        dz, dsigma = kernels.diag_grad(rows_t, cols_t, z, sigma)
        dc = (rows_t.double() * cols_t.double()).sum(0)
        assert dz.dtype == dsigma.dtype == dtype and dsigma.shape == ()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(dz.double(), dc * sigma.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(dsigma.double(), z.double() @ dc, rtol=tol, atol=tol * 100)
    assert kernels.split_rows(300, 130) == (64, 5) and kernels.split_rows(2048, 2048) == (128, 16)


@runs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_and_float64_loldu_equals_the_previous_math(case: str, launches: list[str]) -> None:
    """The fused weight path (coefficients formed in the scaling kernel, ``∂z``, ``∂σ`` in the sums'
    kernels) against the previous math written out (``c = σ z - σ0 z0`` by autograd, ``B = PL ⊙ c``,
    ``W0 + B U``): output and the gradients of ``x``, ``z``, ``σ`` to 1e-12 in float64, every way of
    taking ``∂c``."""
    loldu_equals_previous(case, "weight", DEV)
    assert launches == ["scale", "partials", "finish"]


@runs_triton
@pytest.mark.parametrize("case", ["G, L scaled", "G, R scaled", "row dot [N, k]"])
def test_triton_and_bfloat16_loldu_equals_the_torch_ops(case: str, launches: list[str]) -> None:
    """Under bf16 autocast (float32 parameters): the fused path against the same node with the torch ops
    (``FUSED`` off), one upstream gradient: output and ``∂x`` (both read ``W``) within bf16 rounding of
    the scaled factor (the interpreter truncates its casts), ``∂z`` and ``∂σ`` (independent of ``W``) to
    float32 rounding (sums of exact products against sums of rounded ones)."""
    shape, k, n = CASES[case]
    a, W0 = loldu_layer(shape, k, "weight", torch.float32, DEV)
    x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(9)).to(DEV)
    results = []
    for fused in (True, False):
        frozen_a.FUSED = fused
        try:
            xr = x.clone().requires_grad_(True)
            a.zero_grad(set_to_none=True)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                y = a(xr, W0, None)
            y.backward(torch.cos(torch.arange(y.numel(), device=DEV)).view(y.shape).to(y.dtype))
            results.append([y.detach(), xr.grad, a.z.grad, a.sigma.grad])
        finally:
            frozen_a.FUSED = True
    assert launches == ["scale", "partials", "finish"]
    (y, dx, dz, ds), (y0, dx0, dz0, ds0) = results
    assert y.dtype == torch.bfloat16 and rel(y, y0) < 5e-3 and rel(dx, dx0) < 5e-3  # ~1e-3 measured
    assert rel(dz, dz0) < 1e-5 and rel(ds, ds0) < 1e-5


def test_loldu_step_launches_what_svfits_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the benchmark's shapes (one block, 64 and 4096 tokens: the row dot, the G and rows routes) with
    the Triton path taken (as on CUDA; launches recorded, not run: fake tensors), one LoLDU layer step
    launches as many kernels as SVFit's: the scaling kernel for ``sub`` and ``mul``, the two sums' kernels
    for ``mul_`` and ``sum``, plus the accumulation of the second parameter's gradient (``add_`` for
    ``σ``) and minus nothing else. SVFit's ops are unchanged (it takes no Triton path)."""
    pytest.importorskip("triton")  # the launches are faked, but their arguments name Triton's dtypes
    from weightsmith.adapters import _frozen_diag_triton as kernels

    launched: list[str] = []
    monkeypatch.setattr(frozen_a, "_fused", lambda *t: True)
    monkeypatch.setattr(kernels, "_launch", lambda name, *a, **k: launched.append(name))
    for tokens in (64, 4096):
        with FakeTensorMode():
            for out_f, in_f in BLOCK.values():
                k = min(out_f, in_f)
                L, R, s = torch.empty(out_f, k), torch.empty(k, in_f), torch.empty(k)
                sv = layer_step_kernels(SVFitAdapter(L, s, R, path="weight"), (out_f, in_f), tokens, launched)
                ld = layer_step_kernels(
                    LoLDUAdapter(L, s, R, 1.0, path="weight"), (out_f, in_f), tokens, launched
                )
                assert len(ld) == len(sv), (sv, ld)
                fused = {"triton:scale": 1, "triton:partials": 1, "triton:finish": 1, "add_": 1}
                assert collections.Counter(ld) - collections.Counter(sv) == fused, (sv, ld)
                assert collections.Counter(sv) - collections.Counter(ld) == {
                    "sub": 1,
                    "mul": 1,
                    "mul_": 1,
                    "sum": 1,
                }
                assert not [op for op in sv if op.startswith("triton")]
                assert "_local_scalar_dense" not in ld and "item" not in ld  # no host read: capture-safe
            assert not kernels.usable(L)  # a fake tensor never reaches a real launch
