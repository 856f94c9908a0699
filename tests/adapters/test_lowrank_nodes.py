"""VeRA, SVFit and LoLDU on LoRA's fused node, and SVFit's / LoLDU's weight-space path (issue 14).

Each path is checked against its paper's equation written with plain autograd ops (no code of the
adapter), output and every gradient:

- VeRA (Kopiczko et al., 2024): ``y = x W0ᵀ + (((x Aᵀ) ⊙ d) Bᵀ) ⊙ b`` (``ΔW = Λ_b B Λ_d A``);
- SVFit (Sun et al., 2024): ``ΔW = U_r diag(σ - σ_r) V_rᵀ``;
- LoLDU (Shi et al., 2024): ``ΔW = P L_r diag(σ z - σ0 z0) U_r``.

Also: the path choice counted by hand, the grouped q/k/v and gate/up node against the per-layer step
(VeRA's stacked ``A`` is the shared slice repeated), bf16 autocast, bad options, and ATen op counts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_group_family import grouped_vs_per_layer  # grouped step against the per-layer step
from test_lora_fused import step_ops  # top-level ATen ops of one forward + backward
from test_lora_group import tiny_llama
from torch import Tensor, nn

from weightsmith import adapters
from weightsmith.adapters import AdapterContext, SharedBases, lora_group
from weightsmith.adapters.frozen_a import choose_frozen_a_path, frozen_a_costs, frozen_a_route
from weightsmith.adapters.loldu import LoLDU
from weightsmith.adapters.svfit import SVFit
from weightsmith.adapters.vera import VeRA
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def make(config: Any, shape: tuple[int, int], dtype: torch.dtype = torch.float64) -> tuple[Any, Tensor]:
    """An adapter on a random [out, in] weight with every parameter perturbed (so ΔW ≠ 0)."""
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=(shape,))
    a = config.create(W0.float(), ctx).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return a, W0


def reference(a: Any, W0: Tensor, x: Tensor) -> Tensor:
    """The paper's equation, term by term, with autograd's own gradients."""
    if hasattr(a, "vera_lambda_d"):
        A = a.vera_A[: a.rank, : a.in_f]
        B = a.vera_B[: a.out_f, : a.rank]
        return x @ W0.T + ((x @ A.T) * a.vera_lambda_d) @ B.T * a.vera_lambda_b
    if hasattr(a, "Vh"):  # SVFit
        dW = a.U @ torch.diag(a.sigma - a.sigma0) @ a.Vh
    else:  # LoLDU
        dW = a.PL @ torch.diag(a.sigma * a.z - a.sigma0 * a.z0) @ a.U
    return x @ (W0 + dW).T


def run(a: Any, W0: Tensor, x: Tensor, fn: Any) -> list[Tensor]:
    """Output and the gradients of ``x`` and of every adapter parameter after one backward."""
    for p in (*a.parameters(), x):
        p.grad = None
    y = fn(a, W0, x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).to(y.dtype).view(y.shape))
    assert x.grad is not None
    return [y.detach(), x.grad.clone(), *(p.grad.clone() for p in a.parameters())]


def assert_close(got: list[Tensor], want: list[Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for i, (u, v) in enumerate(zip(got, want, strict=True)):
        err = float((u.double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
        assert err <= tol, f"output/gradient {i}: relative error {err}"


DIAG = {"svfit": SVFit, "loldu": LoLDU}


@pytest.mark.parametrize("method", sorted(DIAG))
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_diag_paths_equal_the_paper_equation(
    method: str, shape: tuple[int, int], rank: Any, path: str
) -> None:
    a, W0 = make(DIAG[method](rank=rank, path=path), shape)
    x = torch.randn(2, 15, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    k = min(shape) if rank is None else rank
    assert choose_frozen_a_path(path, x, W0, None, torch.zeros(shape[0], k)) == path
    # full rank: ∂B = (gᵀ x) Aᵀ; rank 3: ∂B = gᵀ (x Aᵀ)
    assert frozen_a_route(30, *shape, k) == ("G" if rank is None else "rows")
    want = run(a, W0, x, reference)
    assert_close(run(a, W0, x, lambda a, W, x: a(x, W, None)), want, 1e-10)
    # a given base_out (several adapters on the layer) takes the activation path
    assert_close(run(a, W0, x, lambda a, W, x: a(x, W, x @ W.T)), want, 1e-10)


@pytest.mark.parametrize("config", [SVFit(path="weight"), LoLDU(path="weight"), VeRA(rank=8, path="weight")])
def test_weight_path_under_bf16_autocast(config: Any) -> None:
    a, W0 = make(config, (24, 16), torch.float32)
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    want = run(a, W0, x, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(a, W0, x, lambda a, W, x: a(x, W.to(torch.bfloat16), None))
    assert got[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[1:])
    assert_close(got, want, 3e-2)


def test_diag_costs_worked_by_hand() -> None:
    # N=2 rows, W [3, 4], k=1, training with an input gradient:
    # activation: x Aᵀ 2·4 + h Bᵀ 2·3 + x W0ᵀ 24 = 38; ∂B = gᵀ h 6; g B 6 + · A 8 + g W0 24  -> 82
    # weight: W 3·4 + x Wᵀ 24 = 36; ∂B min(G 24 + G Aᵀ 12, x Aᵀ 8 + gᵀ h 6) = 14; ∂x 24      -> 74
    assert frozen_a_costs(2, 3, 4, 1, True, True) == (82, 74)
    assert frozen_a_costs(2, 3, 4, 1, False, False) == (38, 36)
    # the benchmark's shapes (4096 tokens of a 2048-wide Llama): the weight path for training at full
    # rank and at rank 16 (SVFit, LoLDU) and at VeRA's 256, the activation path for one token without
    # gradients
    for k in (2048, 256, 16):
        act, weight = frozen_a_costs(4096, 2048, 2048, k, True, True)
        assert weight < act
    act, weight = frozen_a_costs(1, 2048, 2048, 16, False, False)
    assert act < weight


def test_auto_path_follows_shapes_and_flags() -> None:
    a, W0 = make(SVFit(), (24, 16), torch.float32)  # full rank 16
    B = a.U * (a.sigma - a.sigma0)
    big = torch.randn(64, 16, requires_grad=True)
    assert choose_frozen_a_path("auto", big, W0, None, B) == "weight"
    with torch.no_grad():
        assert choose_frozen_a_path("auto", big[:2], W0, None, B) == "activation"  # generation
    assert choose_frozen_a_path("weight", big, W0, big @ W0.T, B) == "activation"  # base_out given
    assert choose_frozen_a_path("weight", big, W0.clone().requires_grad_(True), None, B) == "activation"


@pytest.mark.parametrize("config", [SVFit, LoLDU, VeRA])
def test_bad_path_is_a_user_error(config: Any) -> None:
    with pytest.raises(WeightsmithError, match="path"):
        config(path="dense")


@pytest.mark.parametrize("method", sorted(DIAG))
def test_through_the_core_auto_equals_merged(method: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24))
    adapters.adapt(m, DIAG[method](), targets="re:.*")
    with torch.no_grad():
        for p in adapters.adapter_parameters(m):
            p.add_(torch.randn(p.shape) * 0.3)
    x = torch.randn(4, 8, 16, requires_grad=True)
    y = m(x)  # 32 rows at full rank 16: the weight path
    layer: Any = m[0]
    a = layer.adapters["default"]
    B = torch.zeros(24, 16, requires_grad=True)
    assert choose_frozen_a_path(a.path, x, layer.weight(), None, B) == "weight"
    with torch.no_grad():
        want = F.linear(x, a.merge(layer.weight()), layer.base.bias)
        layer.merge("default")
        torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- VeRA


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_vera_paths_equal_the_paper_equation(shape: tuple[int, int], path: str) -> None:
    a, W0 = make(VeRA(rank=5, path=path), shape)
    x = torch.randn(2, 7, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    want = run(a, W0, x, reference)
    assert_close(run(a, W0, x, lambda a, W, x: a(x, W, None)), want, 1e-10)
    assert_close(run(a, W0, x, lambda a, W, x: a(x, W, x @ W.T)), want, 1e-10)


def capture_group_tensors() -> Any:
    """Wrap the grouped node's forward to record the ``(W0, A, B)`` triples it is given."""
    seen: list[tuple[Tensor, ...]] = []
    original = lora_group._LoRAGroup.forward

    def spy(ctx: Any, base_out: None, x: Tensor, scales: tuple[float, ...], *tensors: Tensor) -> Any:
        seen.append(tensors)
        return original(ctx, base_out, x, scales, *tensors)

    return seen, original, spy


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_vera_grouped_step_equals_per_layer_and_stacks_the_shared_A(dtype: torch.dtype, tol: float) -> None:
    model = tiny_llama(dtype, VeRA(rank=4, path="activation"))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    seen, original, spy = capture_group_tensors()
    lora_group._LoRAGroup.forward = staticmethod(spy)  # type: ignore[method-assign]
    try:
        assert grouped_vs_per_layer(model, ids, tol) == [2, 2, 3, 3], "q/k/v and gate/up of both blocks"
    finally:
        lora_group._LoRAGroup.forward = original  # type: ignore[method-assign]
    assert len(seen) == 4
    shared_A = model.model.layers[0].self_attn.q_proj.adapters["default"].vera_A
    for tensors in seen:
        for A in tensors[1::3]:  # every member's A is the shared slice A[:r, :in]
            assert A.shape == (4, 32)
            assert torch.equal(A, shared_A[:4, :32].to(A.dtype))


def test_vera_grouped_under_autocast() -> None:
    model = tiny_llama(config=VeRA(rank=4, path="activation"))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert len(grouped_vs_per_layer(model, ids, 3e-2)) == 4
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.adapter_parameters(model)
    )


@pytest.mark.parametrize("config", [SVFit, LoLDU, VeRA])
def test_grouped_on_the_activation_path_per_layer_on_the_weight_path(config: Any) -> None:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    # 12 rows at rank 4: "auto" counts the weight path cheaper for q [32, 32] and gate/up [48, 32], the
    # activation path for k/v [16, 32], which then run as one node (per block)
    for path, groups in (("activation", [2, 2, 3, 3]), ("weight", []), ("auto", [2, 2])):
        model = tiny_llama(torch.float64, config(rank=4, path=path))
        # float64: LoLDU's ∂σ = Σ z ⊙ ∂c is a sum of nearly cancelling terms, beyond float32 at 1e-5
        assert grouped_vs_per_layer(model, ids, 1e-10) == groups


# ---------------------------------------------------------------- op counts


def one_layer(config: Any) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 48, bias=False).requires_grad_(False))
    adapters.adapt(m, config, targets="re:.*")
    return m


def test_vera_activation_step_is_lora_node_without_dA_and_no_activation_elementwise() -> None:
    m = one_layer(VeRA(rank=4, path="activation"))
    x = torch.randn(2, 5, 32, requires_grad=True)
    ops = step_ops(m, x)
    # forward x Aᵀ, h Bᵀ, += x W0ᵀ; backward g B, (g B) A, += g W0, ∂B = gᵀ h (A frozen: no ∂A)
    assert ops["aten::mm"] + ops["aten::addmm_"] == 7, ops
    assert ops["aten::addmm_"] == 2, ops
    # before: ⊙ d and ⊙ b on the activations, their sums over the rows and the base-output sum
    assert "aten::linear" not in ops and "aten::add" not in ops and "aten::sum" not in ops, ops


@pytest.mark.parametrize("config", [SVFit(), LoLDU(), VeRA(rank=32)])
def test_weight_path_step_ops(config: Any) -> None:
    m = one_layer(config)  # rank 32 of a [48, 32] weight
    x = torch.randn(4, 16, 32, requires_grad=True)  # 64 rows: the weight path, ∂B = (gᵀ x) Aᵀ
    ops = step_ops(m, x)
    # W = W0 + B A (addmm), x Wᵀ, ∂x = g W, G = gᵀ x, G Aᵀ: five GEMMs (the activation path: seven, two
    # of them full-size products more); no product of the activations with a vector
    assert ops["aten::addmm"] == 1 and ops["aten::mm"] == 4, ops
    assert "aten::linear" not in ops and "aten::addmm_" not in ops, ops


@pytest.mark.parametrize("config", [SVFit(rank=4, path="weight"), VeRA(rank=4, path="weight")])
def test_weight_path_compiles_to_the_eager_result(config: Any) -> None:
    """``torch.compile`` (graph capture and AOT autograd, no code generation) of the weight path."""
    m = one_layer(config)
    with torch.no_grad():
        for p in adapters.adapter_parameters(m):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    x = torch.randn(3, 5, 32)
    torch._dynamo.reset()
    results = []
    for net in (m, torch.compile(m, backend="aot_eager")):
        m.zero_grad(set_to_none=True)
        y = net(x)
        y.square().mean().backward()
        results.append([y.detach(), *(p.grad for p in adapters.adapter_parameters(m) if p.grad is not None)])
    assert len(results[0]) == 1 + len(list(adapters.adapter_parameters(m)))  # every gradient is there
    assert_close(results[1], results[0], 1e-6)
