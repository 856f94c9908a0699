"""LoKr's one-node paths (weightsmith.adapters.lokr, issue 14) against the paper's equation written out.

Reference: Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022 (eq. 4) in
PEFT's LyCORIS form, ``y = x (W0 + s W1 ⊗ W2)ᵀ`` with ``W2 = W2a W2b`` (and ``W1 = W1a W1b`` with
``decompose_both``), the dense ``torch.kron`` built and differentiated by autograd; and PEFT 0.21's LoKr
layer on the same input. Each exact path (activation, weight) in each order (inner first, outer first) must
give the same output and gradients: float32 tight, bfloat16 loose; the path choice must follow the
multiply-adds counted by hand; and a training step must run without activation-sized copies, with the GEMM
count written out below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_lora_group import _Count
from torch import Tensor, nn

from weightsmith import adapters
from weightsmith.adapters import lokr
from weightsmith.adapters.lokr import LoKr, _KronLinear, _KronWeight, inner_first, kron_shapes, lokr_costs
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def adapted(config: LoKr, out_f: int, in_f: int, dtype: torch.dtype = torch.float32) -> Any:
    """A bias-free linear layer with LoKr attached and every factor random (W1 is zero at init)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(dtype)
    adapters.adapt(model, config, targets=["0"])
    with torch.no_grad():
        for p in model[0].adapters["default"].parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return model[0]


def ref_forward(layer: Any, x: Tensor) -> Tensor:
    """The paper's equation: the dense update ``s · kron(W1, W2)`` added to ``W0``, then one linear map."""
    a = layer.adapters["default"]
    W = layer.weight().float() + torch.kron(a.w1(), a.w2()) * a.scaling
    return F.linear(x, W.to(x.dtype))


def step(fn: Callable[[Tensor], Tensor], layer: Any, x: Tensor) -> list[Tensor]:
    """Output, input gradient and every factor's gradient of a weighted sum of the outputs."""
    params = list(layer.adapters["default"].parameters())
    for p in params:
        p.grad = None
    xi = x.detach().clone().requires_grad_(True)
    y = fn(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.detach().float(), xi.grad.float()] + [p.grad.float() for p in params]


def rel(u: Tensor, v: Tensor) -> float:
    return float((u - v).norm() / v.norm().clamp_min(1e-30))


def forced(layer: Any, path: str, inner: bool) -> Callable[[Tensor], Tensor]:
    """The layer with its adapter's path ("activation" or "weight") and order (inner first or not) fixed."""
    a = layer.adapters["default"]

    def run(x: Tensor) -> Tensor:
        a.choose_path = lambda *_: path
        keep = lokr.inner_first
        lokr.inner_first = lambda _s: inner  # type: ignore[assignment]
        try:
            return layer(x)  # type: ignore[no-any-return]
        finally:
            del a.choose_path
            lokr.inner_first = keep

    return run


# (config, out, in): W2 low rank (PEFT's default form), both low rank, both full, a fixed factor, out != in
CASES = {
    "w2_low_rank": (LoKr(rank=2, alpha=4.0), 24, 36),
    "both_low_rank": (LoKr(rank=1, alpha=2.0, decompose_both=True), 36, 24),
    "full": (LoKr(rank=8, alpha=8.0), 12, 16),
    "factor": (LoKr(rank=2, alpha=3.0, decompose_factor=4), 20, 24),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["activation", "weight"])
@pytest.mark.parametrize("inner", [True, False], ids=["inner", "outer"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_every_path_equals_the_dense_equation(
    name: str, path: str, inner: bool, dtype: torch.dtype, tol: float
) -> None:
    config, out_f, in_f = CASES[name]
    layer = adapted(config, out_f, in_f, dtype)
    x = torch.randn(2, 5, in_f).to(dtype)
    got, ref = step(forced(layer, path, inner), layer, x), step(lambda t: ref_forward(layer, t), layer, x)
    assert len(got) == len(ref) >= 4
    for i, (u, v) in enumerate(zip(got, ref, strict=True)):
        assert rel(u, v) <= tol, (i, rel(u, v))
        assert v.norm() > 0


def test_nodes_gradcheck_in_float64() -> None:
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    x, W0, base = r(2, 3, 12), r(6, 12), r(2, 3, 6)  # out 6 = 2 x 3, in 12 = 3 x 4
    w1a, w1b, w2a, w2b = r(2, 1), r(1, 3), r(3, 2), r(2, 4)
    for inner in (True, False):
        for b in (None, base):  # the base product inside the node (W0 trainable too), or given
            assert torch.autograd.gradcheck(
                lambda *t, b=b, inner=inner: _KronLinear.apply(b, *t, 0.7, inner), (x, W0, w1a, w1b, w2a, w2b)
            )
        full = lambda x, w1, w2, inner=inner: _KronLinear.apply(base, x, None, w1, None, w2, None, 0.7, inner)  # noqa: E731
        assert torch.autograd.gradcheck(full, (x, r(2, 3), r(3, 4)))
        weight = lambda x, *t, inner=inner: _KronWeight.apply(None, x, W0.detach(), *t, 0.7, inner)  # noqa: E731
        assert torch.autograd.gradcheck(weight, (x, w1a, w1b, w2a, w2b))


def test_given_base_out_and_autocast() -> None:
    layer = adapted(LoKr(rank=2, alpha=4.0), 24, 36)
    a, W0 = layer.adapters["default"], layer.weight()
    x = torch.randn(7, 36)
    for inner in (True, False):  # several adapters on a layer: the core passes x W0ᵀ (plus the others)
        base = F.linear(x, W0) + 1.0
        assert a.choose_path(x, W0, base) == "activation"
        lokr.inner_first, keep = (lambda _s, i=inner: i), lokr.inner_first  # type: ignore[assignment]
        try:
            torch.testing.assert_close(a(x, W0, base), ref_forward(layer, x) + 1.0, rtol=1e-5, atol=1e-5)
        finally:
            lokr.inner_first = keep
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(layer, layer, x)
        ref = step(lambda t: ref_forward(layer, t.to(torch.bfloat16)), layer, x)
    assert got[0].dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in a.parameters())
    for u, v in zip(got, ref, strict=True):
        assert rel(u, v) <= 3e-2


def test_costs_by_hand_and_the_path_choice() -> None:
    # the benchmark's shapes (r=8, f=-1): 2048 = 32 x 64, 5632 = 64 x 88
    sq, gate, down = (kron_shapes(o, i, 8, -1, False) for o, i in ((2048, 2048), (5632, 2048), (2048, 5632)))
    assert (sq.a, sq.b, sq.c, sq.d) == (32, 64, 32, 64) and (gate.a, gate.b, gate.c, gate.d) == (
        64,
        88,
        32,
        64,
    )
    # inner first costs c b (d + a) per token, outer first a d (c + b)
    assert inner_first(sq) and inner_first(gate) and not inner_first(down)  # 32·88·128 < 64·64·120; swapped
    N, base, w = 4096, 4096 * 2048 * 2048, 2048 * 2048
    F_, S = 32 * 64 * 64, 32 * 32 * 64  # Z_t = X_t W2ᵀ (c d b), W1 Z_t (a c b)
    # activation: x W0ᵀ, Z, W1 Z; ∂Z (S), ∂W2 (F), ∂W1 (S); dx: ∂Z W2 (F) and g W0
    act = base + N * (F_ + S) + N * (S + F_ + S) + N * F_ + base
    # weight: W, x Wᵀ; Z again (F), ∂Z, ∂W2, ∂W1; W again, g W
    weight = w + base + N * (F_ + S + F_ + S) + w + base
    assert lokr_costs(N, sq, True, True) == (act, weight)  # the weight path saves N (F + S) - 2 out·in
    for tokens, cheaper in ((42, 0), (43, 1), (N, 1)):  # 2 out·in / (F + S) = 42.7
        costs = lokr_costs(tokens, sq, True, True)
        assert costs[cheaper] < costs[1 - cheaper]
    for (o, i), tokens, want in (
        ((2048, 2048), 4096, "weight"),  # a training batch
        ((5632, 2048), 4096, "weight"),
        ((2048, 5632), 4096, "weight"),
        ((2048, 2048), 4, "activation"),  # a few tokens (generation)
    ):
        layer = adapted(LoKr(), o, i, torch.bfloat16)
        x = torch.empty(tokens, i, dtype=torch.bfloat16, requires_grad=True)
        assert layer.adapters["default"].choose_path(x, layer.weight(), None) == want
    small = adapted(LoKr(rank=2), 24, 36)
    a, W0, x = small.adapters["default"], small.weight(), torch.empty(512, 36)
    assert a.choose_path(x, W0, torch.empty(512, 24)) == "activation"  # base_out given
    W0.requires_grad_(True)
    assert a.choose_path(x, W0, None) == "activation"  # a trainable base weight
    W0.requires_grad_(False)
    assert adapted(LoKr(path="weight"), 24, 36).adapters["default"].choose_path(x[:2], W0, None) == "weight"
    fixed = adapted(LoKr(path="activation"), 24, 36).adapters["default"]
    assert fixed.choose_path(x, W0, None) == "activation"
    with pytest.raises(WeightsmithError, match="LoKr path"):
        LoKr(path="dense")


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_training_step_has_no_activation_copies(path: str) -> None:
    layer = adapted(LoKr(rank=2, alpha=4.0), 24, 36)  # W1 [4, 6] full, W2 [6, 6] = W2a W2b
    x = torch.randn(5, 36, requires_grad=True)
    for inner in (True, False):
        with _Count() as c:
            y = forced(layer, path, inner)(x)
            y.backward(torch.ones_like(y))
        ops = c.ops
        assert ops["clone"] == ops["copy_"] == ops["add"] == ops["_to_copy"] == 0, ops
        # s W1 [4, 6] and s ∂W1 [4, 6]: the scaling rides on W1's cast and on the summed gradient
        assert (ops["mul"], ops["mul_"]) == (1, 1), ops
        # activation: W2 = W2a W2b, Z or U, the other Kronecker product, the base GEMM (addmm_); backward
        # ∂Z or ∂U, dx and g W0 accumulated (addmm_), ∂W2 and its two factors, ∂W1 (bmm) and its sum.
        # weight: W2 = W2a W2b, W (addcmul), x Wᵀ; backward W again, g W, Z or U again, ∂Z or ∂U, ∂W2 and
        # its two factors, ∂W1 (bmm) and its sum
        gemms = ops["mm"] + ops["addmm_"] + ops["bmm"]
        want = (11, 0) if path == "activation" else (9, 2)
        assert (gemms, ops["addcmul"], ops["sum"]) == (*want, 1), ops


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_both_paths_match_peft_outputs_and_gradients(path: str) -> None:
    """The peer: PEFT 0.21's LoKr layer on the same base weight, factors and input."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(36, 24, bias=False))
    pm = peft.get_peft_model(
        nn.Sequential(nn.Linear(36, 24, bias=False)), peft.LoKrConfig(target_modules=["0"], r=2, alpha=3)
    )
    pm.base_model.model[0].base_layer.weight.data.copy_(base[0].weight.data)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
    adapters.adapt(base, LoKr(rank=2, alpha=3, path=path), targets=["0"])
    a = base[0].adapters["default"]
    state = peft.get_peft_model_state_dict(pm)
    a.load_peft_state({k.split(".")[-1]: v for k, v in state.items()})
    x = torch.randn(3, 50, 36)  # 150 tokens: above either path's break-even point
    assert a.choose_path(x.requires_grad_(), base[0].weight(), None) == path
    ours = step(base[0], base[0], x)
    layer = pm.base_model.model[0]
    theirs_params = {n.split(".")[0]: p for n, p in layer.named_parameters() if p.requires_grad}
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    theirs = [y.detach(), xi.grad] + [theirs_params[n].grad for n, _ in a.named_parameters()]
    for i, (u, v) in enumerate(zip(ours, theirs, strict=True)):
        assert rel(u, v) <= 1e-5, (i, rel(u, v))
