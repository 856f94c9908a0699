"""Grouped LoRA for sibling layers reading one input (weightsmith.adapters.lora_group, issue 14).

The grouped step is checked against the per-layer LoRA path (itself checked against PEFT elsewhere) on a
tiny Llama: loss, every LoRA gradient and the gradient of the input embeddings. The fall-backs (another
input, dropout, a second adapter, members skipped or called out of order) must give the per-layer results.
"""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith import adapters
from weightsmith.adapters import lora_group
from weightsmith.adapters.lora import LoRA

torch.set_num_threads(1)
TARGETS = "re:.*(q|k|v|o|gate|up|down)_proj"


@contextmanager
def grouping(on: bool) -> Iterator[None]:
    before = lora_group.GROUP_SIBLINGS
    lora_group.GROUP_SIBLINGS = on
    try:
        yield
    finally:
        lora_group.GROUP_SIBLINGS = before


@contextmanager
def count_group_runs() -> Iterator[list[int]]:
    runs: list[int] = []
    original = lora_group._LoRAGroup.forward

    def counted(ctx: Any, base_out: None, x: Tensor, scales: tuple[float, ...], *tensors: Tensor) -> Any:
        runs.append(len(scales))
        return original(ctx, base_out, x, scales, *tensors)

    lora_group._LoRAGroup.forward = staticmethod(counted)  # type: ignore[method-assign]
    try:
        yield runs
    finally:
        lora_group._LoRAGroup.forward = original  # type: ignore[method-assign]


def perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def tiny_llama(dtype: torch.dtype = torch.float32, config: Any = None, **lora: Any) -> nn.Module:
    """Two Llama blocks with ``config`` (LoRA rank 4 and ``lora`` options when None) on all 7 projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    adapters.adapt(model, config or LoRA(rank=4, alpha=8.0, **lora), targets=TARGETS)
    perturb(model)
    return model


def llama_step(model: nn.Module, ids: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    model.zero_grad(set_to_none=True)
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = [p.grad.float().clone() for p in adapters.adapter_parameters(model)]
    return out.loss.detach().float(), grads, emb.grad.float()


def assert_steps_close(
    a: tuple[Tensor, list[Tensor], Tensor], b: tuple[Tensor, list[Tensor], Tensor], tol: float
) -> None:
    def rel(u: Tensor, v: Tensor) -> float:
        return float((u - v).norm() / v.norm().clamp_min(1e-30))

    assert rel(a[0], b[0]) <= tol, "loss differs"
    assert len(a[1]) == len(b[1])
    for i, (u, v) in enumerate(zip(a[1], b[1], strict=True)):
        assert rel(u, v) <= tol, f"LoRA gradient {i} differs: {rel(u, v)}"
    assert rel(a[2], b[2]) <= tol, f"input-embedding gradient differs: {rel(a[2], b[2])}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_llama_step_equals_per_layer(dtype: torch.dtype, tol: float) -> None:
    model = tiny_llama(dtype)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with grouping(False), count_group_runs() as runs:
        ref = llama_step(model, ids)
    assert runs == []
    with count_group_runs() as runs:
        first = llama_step(model, ids)  # learns which siblings share an input: still per layer
        assert runs == []
        grouped = llama_step(model, ids)
    assert sorted(runs) == [2, 2, 3, 3], "q/k/v and gate/up of both blocks run grouped"
    assert_steps_close(first, ref, 0.0)
    assert_steps_close(grouped, ref, tol)
    assert ref[2].norm() > 0 and all(g.norm() > 0 for g in ref[1])


def test_learn_siblings_groups_the_first_step_and_changes_nothing() -> None:
    """The probe forward of a training loop: afterwards the first step already runs grouped (so a run
    resumed from a checkpoint computes what an uninterrupted one does), and the probe leaves the random
    state, the training mode and the parameters as they were."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    params = [p.detach().clone() for p in model.parameters()]
    state = torch.random.get_rng_state()
    model.train()
    assert lora_group.learn_siblings(model, lambda: model(input_ids=ids))
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    with count_group_runs() as runs:
        llama_step(model, ids)
    assert sorted(runs) == [2, 2, 3, 3]
    with grouping(False):
        assert not lora_group.learn_siblings(model, lambda: pytest.fail("no probe when grouping is off"))


def test_grouped_under_autocast_matches_per_layer() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with grouping(False):
            ref = llama_step(model, ids)
        llama_step(model, ids)
        with count_group_runs() as runs:
            got = llama_step(model, ids)
    assert len(runs) == 4
    assert_steps_close(got, ref, 3e-2)
    for p in adapters.adapter_parameters(model):
        assert p.grad is not None and p.grad.dtype == torch.float32


class Siblings(nn.Module):
    """q, k, v read ``x`` unless told otherwise; ``order`` and ``inputs`` pick who is called on what."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, 8), nn.Linear(d, 6, bias=False), nn.Linear(d, 10)
        self.order = "qkv"
        self.other = ""  # names called on a different tensor (x + 0)

    def forward(self, x: Tensor) -> Tensor:
        alt = x + 0
        outs = [getattr(self, n)(alt if n in self.other else x) for n in self.order]
        return torch.cat([o.reshape(-1) for o in outs])


def sib_step(m: Siblings, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = m(xi)
    (y * torch.arange(y.numel(), dtype=y.dtype).sin()).sum().backward()
    params = adapters.adapter_parameters(m)
    grads = [
        torch.full_like(p, -123.0) if p.grad is None else p.grad.clone() for p in params
    ]  # -123: no grad
    return y.detach(), grads, xi.grad


def siblings(**lora: Any) -> Siblings:
    torch.manual_seed(0)
    m = Siblings()
    adapters.adapt(m, LoRA(rank=3, alpha=6.0, **lora))
    perturb(m)
    return m


def assert_equal(a: tuple[Tensor, list[Tensor], Tensor], b: tuple[Tensor, list[Tensor], Tensor]) -> None:
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(u, v) for u, v in zip(a[1], b[1], strict=True))
    assert torch.equal(a[2], b[2])


def test_group_math_by_hand() -> None:
    """The node against the equations written out: y_i = x W_iᵀ + s (x A_iᵀ) B_iᵀ + b_i, autograd of those."""
    m = siblings()
    x = torch.randn(5, 12)
    sib_step(m, x)
    with count_group_runs() as runs:
        got = sib_step(m, x)
    assert runs == [3]
    xi = x.clone().requires_grad_(True)
    params = []
    outs = []
    for n in "qkv":
        layer = getattr(m, n)
        a = layer.adapters["default"]
        A, B = a.A.detach().clone().requires_grad_(True), a.B.detach().clone().requires_grad_(True)
        params += [A, B]
        y = xi @ layer.base.weight.T + a.scaling * (xi @ A.T) @ B.T
        outs.append(y if layer.base.bias is None else y + layer.base.bias)
    y = torch.cat([o.reshape(-1) for o in outs])
    (y * torch.arange(y.numel(), dtype=y.dtype).sin()).sum().backward()
    torch.testing.assert_close(got[0], y.detach(), rtol=1e-6, atol=1e-6)
    for u, p in zip(got[1], params, strict=True):
        torch.testing.assert_close(u, p.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], xi.grad, rtol=1e-5, atol=1e-6)


def test_group_node_gradcheck() -> None:
    """The hand-written backward against finite differences (float64), every input differentiable."""
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x = t(2, 3, 5)
    tensors = (t(4, 5), t(2, 5), t(4, 2), t(3, 5), t(1, 5), t(3, 1))
    assert torch.autograd.gradcheck(
        lambda x, *ts: lora_group._LoRAGroup.apply(None, x, (0.7, 1.3), *ts), (x, *tensors)
    )


@pytest.mark.parametrize(
    "order,other,groups",
    [
        ("qkv", "k", [3, 2]),  # k reads another tensor: the cached k is dropped, later q and v grouped
        ("qv", "", [3, 2]),  # k skipped: its cached output is never handed out, then q and v are grouped
        ("kqv", "", []),  # out of order: the plan's leader comes second, k must not be computed twice
        ("qkvq", "", [3, 3]),  # q called twice on one input
    ],
)
def test_fallbacks_give_per_layer_results(order: str, other: str, groups: list[int]) -> None:
    m = siblings()
    x = torch.randn(2, 3, 12)
    sib_step(m, x)  # learn q, k, v
    m.order, m.other = order, other
    with grouping(False):
        ref = sib_step(m, x)
    with count_group_runs() as runs:
        got = sib_step(m, x)
        again = sib_step(m, x)  # after a miss the plan is learnt again
        third = sib_step(m, x)
    assert runs[: len(groups)] == groups, runs
    for out in (got, again, third):
        assert_steps_close(out, ref, 1e-6)
    if other:  # the members that fell back ran the per-layer kernels: bitwise equal outputs
        n_q = 2 * 3 * 8
        assert torch.equal(got[0][n_q:], ref[0][n_q:])


def test_dropout_in_training_is_per_layer_and_exact() -> None:
    m = siblings(dropout=0.3)
    x = torch.randn(4, 12)
    outs = []
    for on in (False, True, True):
        torch.manual_seed(7)
        with grouping(on), count_group_runs() as runs:
            outs.append(sib_step(m, x))
        assert runs == []
    assert_equal(outs[1], outs[0])
    assert_equal(outs[2], outs[0])
    m.eval()  # dropout off: the group runs again
    sib_step(m, x)
    with count_group_runs() as runs:
        sib_step(m, x)
    assert runs == [3]


def test_second_adapter_on_one_layer_leaves_it_per_layer() -> None:
    m = siblings()
    adapters.adapt(m, LoRA(rank=2, alpha=2.0, seed=5), targets="k", name="extra")
    perturb(m, seed=9)
    x = torch.randn(4, 12)
    with grouping(False):
        ref = sib_step(m, x)
    sib_step(m, x)
    with count_group_runs() as runs:
        got = sib_step(m, x)
    assert runs == [2]  # q and v; k has two adapters
    assert_steps_close(got, ref, 1e-6)
    n_q = 4 * 8
    assert torch.equal(got[0][n_q : n_q + 4 * 6], ref[0][n_q : n_q + 4 * 6])


def test_in_place_change_and_merge_are_seen() -> None:
    m = siblings()
    x = torch.randn(4, 12)
    sib_step(m, x)
    sib_step(m, x)
    with torch.no_grad():
        m.v.adapters["default"].B.mul_(2)  # between steps: nothing cached survives the forward
    with grouping(False):
        ref = sib_step(m, x)
    assert_steps_close(sib_step(m, x), ref, 1e-6)
    adapters.merge_adapters(m)
    with count_group_runs() as runs:
        merged = sib_step(m, x)[0]
    assert runs == []
    torch.testing.assert_close(merged, ref[0], rtol=1e-5, atol=1e-5)
    adapters.unmerge_adapters(m)
    sib_step(m, x)
    with count_group_runs() as runs:
        assert_steps_close(sib_step(m, x), ref, 1e-6)
    assert runs == [3]


def test_no_grad_inference_copy_and_pickle() -> None:
    m = siblings()
    x = torch.randn(4, 12)
    with grouping(False):
        ref = m(x).detach()
    with torch.no_grad():
        m(x)
        with count_group_runs() as runs:
            torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
        assert runs == [3]
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    twin = copy.deepcopy(m)
    assert twin.q.siblings is twin.v.siblings and twin.q.siblings is not m.q.siblings
    for net in (twin, pickle.loads(pickle.dumps(m))):
        net(x)
        with count_group_runs() as runs:
            torch.testing.assert_close(net(x), ref, rtol=1e-6, atol=1e-6)
        assert runs == [3]
    adapters.remove_adapters(m)
    assert not any(isinstance(h.__self__, lora_group.SiblingGroup) for h in m._forward_pre_hooks.values()
                   if hasattr(h, "__self__"))  # fmt: skip
    torch.testing.assert_close(m(x), m(x))


def test_activation_checkpointing_recomputes_per_layer() -> None:
    """A recomputed forward must save what the first one saved: under saved-tensor hooks nothing groups."""
    from torch.utils.checkpoint import checkpoint

    m = siblings()
    x = torch.randn(4, 12)
    with grouping(False):
        ref = sib_step(m, x)
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with count_group_runs() as runs:
            y = checkpoint(m, xi, use_reentrant=False)
            (y * torch.arange(y.numel(), dtype=y.dtype).sin()).sum().backward()
        assert runs == []
        assert torch.equal(y.detach(), ref[0]) and torch.equal(xi.grad, ref[2])


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def block_ops(grouped: bool) -> Counter[str]:
    model = tiny_llama()
    block = model.model.layers[0]
    x = torch.randn(1, 6, 32, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(6)[None])
    with grouping(grouped):
        block(x, position_embeddings=pos)[0].sum().backward()  # learns the plan
        with _Count() as c:
            out = block(x, position_embeddings=pos)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
    return c.ops


def test_grouping_saves_gemms_and_adds_per_block() -> None:
    before, after = block_ops(False), block_ops(True)
    gemms = ("mm", "addmm", "bmm")
    n_before, n_after = sum(before[g] for g in gemms), sum(after[g] for g in gemms)
    # forward: q/k/v 9 -> 7 GEMMs, gate/up 6 -> 5; backward: 15 -> 11 and 10 -> 8 (one dx, one dA GEMM)
    assert n_before - n_after == 9, (before, after)
    assert after["add"] <= before["add"] - 3, (before["add"], after["add"])  # the summed input gradients
