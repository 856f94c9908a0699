"""BOFT's step (issue 14): the dense-group, copy-free path against the previous math, written out here.

The previous adapter rotated x by index gathers (``x[..., p⁻¹]``), a grouped block product whose result
was copied back into row order, autograd through ``linalg.solve`` for the Cayley blocks and a separate
output scaling ``y * s``. The new path (``_Butterfly``: the Cayley blocks as dense groups with the
permutations folded in, a hand-written Cayley gradient; ``_ButterflyLinear``: one batched product per
factor into a row buffer, one GEMM, one scaling, a hand-written backward) must give the same outputs
and gradients: in float64 to 1e-10, in bfloat16 as close to a float64 truth as the previous path was.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_capture_safe import HostSyncWatch, cpu_graphs, graphed_equals_eager  # noqa: F401 (fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith.adapters import boft
from weightsmith.adapters._core import AdapterContext, SharedBases
from weightsmith.adapters.boft import BOFT, butterfly_plan, column_dots

torch.set_num_threads(1)


def make(out_f: int, in_f: int, b: int, m: int, path: str = "auto", dtype: Any = torch.float64):
    W0 = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=((out_f, in_f),))
    a = BOFT(block_size=b, n_butterfly_factor=m, path=path).create(W0.float(), ctx)
    a = a.double() if dtype == torch.float64 else a
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a.boft_R.copy_(0.5 * torch.randn(a.boft_R.shape, generator=g, dtype=torch.float64))
        a.boft_s.copy_(1 + 0.3 * torch.randn(a.boft_s.shape, generator=g, dtype=torch.float64))
    return a, W0.to(dtype)


def previous(a: boft.BOFTAdapter, W0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The previous activation path, op for op: Cayley by ``solve_ex``, each factor as gather, per-block
    product, gather; ``F.linear`` then ``* s`` in the activations' dtype."""
    S = a.boft_R.float() if a.boft_R.dtype == torch.bfloat16 else a.boft_R
    m, k, b, _ = S.shape
    Q = (0.5 * (S - S.transpose(-1, -2))).reshape(m * k, b, b)
    eye = torch.eye(b, dtype=S.dtype).expand_as(Q)
    R = torch.linalg.solve_ex(eye + Q, eye - Q, left=False).result.reshape(m, k, b, b).to(x.dtype)
    inv = torch.argsort(a.perms, dim=1)
    z = x
    for i in range(m - 1, -1, -1):
        u = z[..., inv[i]]
        u = torch.einsum("...kc,kcd->...kd", u.reshape(*u.shape[:-1], k, b), R[i]).reshape(u.shape)
        z = u[..., a.perms[i]]
    y = F.linear(z, W0.to(z.dtype))
    return y * a.boft_s.view(-1).to(y.dtype)


def grads(a, W0, x, fn, seed=5):
    y = fn(a, W0, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    leaves = [t for t in (x, a.boft_R, a.boft_s, W0) if t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, leaves, g)]


# (out, in, b, m): m = 1; three factors folded into their 16-wide groups; 8-blocks in 48-wide groups
# (factor 2 folded, factor 3 copied into block order); 64-blocks, one per group (factor 2 copied)
SHAPES = [(20, 48, 4, 1), (24, 64, 4, 3), (16, 96, 8, 3), (10, 256, 64, 2)]


def test_the_shapes_cover_folded_and_copied_factors():
    plans = {s: [f[0] for f in butterfly_plan(s[3], s[1] // s[2], s[2])] for s in SHAPES}
    assert plans[SHAPES[1]] == [True, True, True]
    assert plans[SHAPES[2]] == [True, True, False]
    assert plans[SHAPES[3]] == [True, False]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_new_path_equals_the_previous_one_in_float64(shape, path):
    out_f, in_f, b, m = shape
    a, W0 = make(out_f, in_f, b, m, path)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    got, want = grads(a, W0, x, lambda a, W0, x: a(x, W0, None)), grads(a, W0, x, previous)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    # merge / unmerge run on the same dense groups: x W'ᵀ is the forward, unmerge gives W0 back
    with torch.no_grad():
        Wm = a.merge(W0)
        torch.testing.assert_close(x.detach() @ Wm.T, want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.unmerge(Wm), W0, rtol=1e-10, atol=1e-10)


def test_trainable_base_and_frozen_input_gradients():
    """A trainable W0 gets ``(g s)ᵀ x R``; an input without a gradient and a frozen scale get none."""
    a, W0 = make(12, 32, 4, 2, "activation")
    W0.requires_grad_()
    x = torch.randn(7, 32, dtype=torch.float64, requires_grad=True)
    got, want = grads(a, W0, x, lambda a, W0, x: a(x, W0, None)), grads(a, W0, x, previous)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    a.boft_s.requires_grad_(False)
    x.requires_grad_(False)
    W0.requires_grad_(False)
    got, want = grads(a, W0, x, lambda a, W0, x: a(x, W0, None)), grads(a, W0, x, previous)
    assert len(got) == 2
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)


def test_hand_written_gradients_pass_gradcheck():
    a, W0 = make(6, 96, 8, 3, "activation")  # factors 1, 2 folded, 3 copied (48-wide groups)
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    W0.requires_grad_()

    def f(x, W0, R, s):
        E = boft._Butterfly.apply(R, a.eye_b, a.eye_g, a.plan, torch.float64)
        return boft._ButterflyLinear.apply(None, x, W0, s, E, a.plan)

    assert [p[0] for p in a.plan] == [True, True, False]
    assert torch.autograd.gradcheck(f, (x, W0, a.boft_R, a.boft_s), fast_mode=True)


def errors(a, W0, x, fn, truth):
    got = grads(a, W0, x, fn)
    return [float((g.double() - t).norm() / t.norm()) for g, t in zip(got, truth, strict=True)]


@pytest.mark.parametrize("shape", [(96, 128, 4, 1), (64, 128, 4, 2), (48, 128, 32, 2)])
def test_bf16_is_as_close_to_the_float64_truth_as_the_previous_path(shape):
    out_f, in_f, b, m = shape
    a, W0 = make(out_f, in_f, b, m, "activation")
    x = torch.randn(64, in_f, dtype=torch.float64, requires_grad=True)
    truth = grads(a, W0, x, previous)
    a16, W16 = make(out_f, in_f, b, m, "activation", dtype=torch.bfloat16)  # float32 parameters
    x16 = x.detach().bfloat16().requires_grad_()
    new, old = (
        errors(a16, W16, x16, lambda a, W0, x: a(x, W0, None), truth),
        errors(a16, W16, x16, previous, truth),
    )
    for n, o in zip(new, old, strict=True):  # y, dx, dR, ds
        assert n <= 1.2 * o, (new, old)


def test_cpu_bf16_autocast_gives_the_previous_outputs():
    a, W0 = make(40, 64, 4, 2, "activation", dtype=torch.float32)
    x = torch.randn(2, 9, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = grads(a, W0, x, lambda a, W0, x: a(x, W0, None)), grads(a, W0, x, previous)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.05 * float(w.abs().max()))


def test_column_dots_by_hand_both_ways():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    b = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    assert column_dots(a, b, batched=False).tolist() == [5.0, -2.0]  # 1·2 + 3·1, 2·1 - 1·4
    g, y = torch.randn(33, 96, dtype=torch.bfloat16), torch.randn(33, 96, dtype=torch.bfloat16)
    want = (g.double() * y.double()).sum(0)
    for batched in (False, True):  # 96 = 2 x 48: the diagonals of 48 x 48 blocks of gᵀ y
        got = column_dots(g, y, batched)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    g, y = g.double(), y.double()
    torch.testing.assert_close(column_dots(g, y, True), want, rtol=1e-12, atol=1e-12)


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple) else (out,)
        size = max((t.numel() for t in outs if isinstance(t, torch.Tensor)), default=0)
        self.ops.append((func.overloadpacket.__name__, size))
        return out


NO_KERNEL = {"view", "t", "transpose", "expand", "reshape", "_unsafe_view", "unsqueeze", "permute", "select",
             "slice", "detach", "alias", "diagonal", "empty", "empty_like", "as_strided"}  # fmt: skip


def test_step_ops_at_the_benchmark_shape():
    """gate_proj of the 1.1B benchmark (5632 x 2048, b = 4, m = 1), 16 tokens, bf16: the whole forward
    and backward is 19 ops (the previous path: 34), none of them a copy of x, x R or y."""
    a, W0 = make(5632, 2048, 4, 1, "activation", dtype=torch.bfloat16)
    x = torch.randn(16, 2048, dtype=torch.bfloat16, requires_grad=True)
    leaves, g = [x, a.boft_R, a.boft_s], torch.ones(16, 5632, dtype=torch.bfloat16)
    counts = {}
    for name, fn in (("new", lambda: a(x, W0, None)), ("previous", lambda: previous(a, W0, x))):
        with Ops() as watch:
            y = fn()
            torch.autograd.grad(y, leaves, g)
        ops = [(n, size) for n, size in watch.ops if n not in NO_KERNEL]
        counts[name] = collections.Counter(n for n, _ in ops)
        copies = [n for n, size in ops if n in ("clone", "copy_", "_to_copy", "index") and size >= 16 * 2048]
        if name == "new":
            assert copies == []
    assert sum(counts["new"].values()) == 19 and sum(counts["previous"].values()) >= 34
    assert counts["new"]["bmm"] == 5 and counts["new"]["mm"] == 2  # x R, dx, dE, two for the Cayley gradient


def test_a_step_has_no_host_sync():
    a, W0 = make(24, 64, 4, 3, "activation", dtype=torch.float32)
    x = torch.randn(6, 64, requires_grad=True)
    with HostSyncWatch() as watch:
        a(x, W0, None).square().sum().backward()
    assert watch.found == []


def test_graphed_step_equals_eager_on_the_cpu_graph_model(cpu_graphs):  # noqa: F811 (fixture)
    graphed_equals_eager(BOFT(block_size=4, n_butterfly_factor=2), "cpu", cpu_graphs, layers=1)


def test_on_smollm2_layers_with_hamlet_activations(smollm2):
    """Real weights (SmolLM2-135M, dequantised from its Q4_1 GGUF) and real activations (the first 48
    tokens of the packaged Hamlet through the model): q_proj and down_proj of layer 0, m = 2 butterflies.
    float64: the new path equals the previous one; bf16: as close to the float64 truth."""
    from weightsmith.tasks import get_task

    model, tok = smollm2
    text = get_task("hamlet").lm_texts()[0][:400]
    ids = tok(text, return_tensors="pt").input_ids[:, :48]
    layer = model.model.layers[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_hook(lambda _m, args, _out, name=name: seen.__setitem__(name, args[0][0]))
        for name, mod in (("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj))
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for name, lin in (("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)):
        W = lin.weight.detach().double()
        out_f, in_f = W.shape
        a, _ = make(out_f, in_f, 4, 2, "activation")
        with torch.no_grad():
            a.boft_R.mul_(0.2)  # rotations of a trained adapter's size, not random orthogonal matrices
        x = seen[name].double().requires_grad_()
        truth = grads(a, W, x, previous)
        got = grads(a, W, x, lambda a, W0, x: a(x, W0, None))
        for g, t in zip(got, truth, strict=True):
            torch.testing.assert_close(g, t, rtol=1e-9, atol=1e-9 * float(t.abs().max()))
        a16 = a.float()
        x16 = x.detach().bfloat16().requires_grad_()
        W16 = W.bfloat16()
        new = errors(a16, W16, x16, lambda a, W0, x: a(x, W0, None), truth)
        old = errors(a16, W16, x16, previous, truth)
        for n, o in zip(new, old, strict=True):  # y, dx, dR, ds
            assert n <= 1.2 * o, (name, new, old)
