"""PST's step (issue 14): the one-node step (``PrunedWeight``) against the previous formula written out here
(forward values bit-equal, every gradient), in float32 and bfloat16; its count of weight-sized passes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith.adapters._core import AdapterContext, SharedBases
from weightsmith.adapters.pst_adapter import PST, PSTAdapter, straight_through
from weightsmith.compress._sparse import dropped, ranked_mask

torch.set_num_threads(1)


class Ops(TorchDispatchMode):
    """ATen ops with their output shapes, and those touching a tensor of at least ``big`` entries."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big, self.trace, self.heavy = big, [], Counter()  # type: ignore[var-annotated]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        self.trace.append((name, tuple(tuple(o.shape) for o in outs)))
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        free = ("view", "t", "detach", "expand", "empty", "_unsafe_view", "transpose", "as_strided")
        if name not in free and any(t.numel() >= self.big for t in outs + ins):
            self.heavy[name] += 1
        return out


def make(W0: torch.Tensor, **opts: Any) -> PSTAdapter:
    ctx = AdapterContext(name="w", index=0, seed=0, kind="linear", shared=SharedBases(0))
    a = PST(**opts).create(W0, ctx)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in a.parameters():  # (the ablation's scores are zero buffers: they stay zero)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return a


def previous_weight(a: PSTAdapter, W0: torch.Tensor, level: float) -> torch.Tensor:
    """The previous step written out: ``W = W0.float() + s (B A)``, ``S`` term by term, the fixed-size
    ``topk`` mask with the straight-through estimator, ``M ⊙ W`` in float32."""
    W = W0.float() + a.scaling * (a.B.float() @ a.A.float())
    free = W.detach().abs() / W0.detach().float().abs().mean().clamp_min(1e-30)
    S = free + a.score_B.float() @ a.score_A.float() + a.score_R.float()[:, None] + a.score_C.float()[None, :]
    most = dropped(tuple(W.shape), a.sparsity, a.scope)
    d = torch.tensor(dropped(tuple(W.shape), level, a.scope))
    return straight_through(ranked_mask(S.detach(), most, d, a.scope), S) * W


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "opts",
    [
        dict(sparsity=0.5, rank=4, alpha=8.0, score_rank=3, ramp=0.0),
        dict(sparsity=0.4, rank=2, alpha=3.0, score_rank=2, ramp=0.0, prune_scope="row"),  # s = 1.5
        dict(sparsity=0.5, rank=2, alpha=4.0, ramp=0.0, data_driven=False),
    ],
    ids=["layer", "row-s1.5", "magnitude"],
)
def test_step_equals_the_previous_formula(dtype, opts):
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(24, 40, generator=g).to(dtype)
    x, dy = torch.randn(6, 40, generator=g).to(dtype), torch.randn(6, 24, generator=g).to(dtype)
    a = make(W0, **opts)
    params = [p for p in a.parameters() if p.requires_grad]
    # a power-of-two s (the default 16 / 8 = 2): the addmm epilogue is bit-equal to s (B A) + W0; else
    # within an ulp (the mask of these scores is the same either way)
    exact: dict[str, Any] = dict(rtol=0, atol=0) if a.scaling in (1.0, 2.0, 4.0) else {}
    for level in (0.0, a.sparsity / 3, a.sparsity):
        a.level = level
        got = a(x, W0, None)
        want = F.linear(x, previous_weight(a, W0, level).to(dtype))
        torch.testing.assert_close(got, want, **exact)
        for u, v in zip(
            torch.autograd.grad((got.float() * dy.float()).sum(), params),
            torch.autograd.grad((want.float() * dy.float()).sum(), params),
            strict=True,
        ):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    merged, want_merged = a.merge(W0), previous_weight(a, W0, a.sparsity).detach()
    assert torch.equal(merged != 0, want_merged != 0)
    torch.testing.assert_close(merged, want_merged, **exact)


def test_step_gives_the_base_weight_its_gradient():
    """A trainable ``W0`` (not a usual set-up) gets ``∂L/∂W' ⊙ M``, as through the previous formula."""
    W0 = torch.randn(12, 20, generator=torch.Generator().manual_seed(2))
    a = make(W0, sparsity=0.5, rank=2, alpha=4.0, score_rank=2, ramp=0.0)
    W0a, W0b = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    G = torch.randn(12, 20)
    (a.pruned(W0a) * G).sum().backward()
    (previous_weight(a, W0b, a.sparsity) * G).sum().backward()
    torch.testing.assert_close(W0a.grad, W0b.grad, rtol=0, atol=0)


def test_weight_sized_passes_of_one_step():
    """Forward + backward of one bf16 layer: the weight-sized ops besides the selection (``ones``, ``topk``,
    ``scatter_``, as before), fewer than the previous formula's: 18 against 30, the 6 GEMMs with ``x`` and the
    LoRA/score factors included (docs/adapters-pst-step.md)."""
    W0 = (torch.randn(48, 64) * 0.02).bfloat16()
    a = make(W0, sparsity=0.5, rank=4, alpha=8.0, score_rank=4, ramp=0.0)
    x = torch.randn(8, 64).bfloat16()
    with Ops(W0.numel()) as new:
        a(x, W0, None).float().square().sum().backward()
    a.zero_grad(set_to_none=True)
    with Ops(W0.numel()) as old:
        F.linear(x, previous_weight(a, W0, a.sparsity).to(x.dtype)).float().square().sum().backward()
    selection = ("topk", "scatter_", "ones")
    before = sum(c for n, c in old.heavy.items() if n not in selection)
    after = {n: c for n, c in new.heavy.items() if n not in selection}
    assert before == 30, old.heavy
    assert after == dict(mm=6, mul=3, abs=2, addmm_=2, add_=2, mean=1, _to_copy=1, div_=1), new.heavy


def test_step_under_autocast_computes_in_float32():
    """Under autocast the node still builds ``W`` and ``S`` in float32 (autocast would hand its GEMMs bf16):
    the pruned weight equals the one without autocast, and only the layer's product runs in bf16."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(16, 24, generator=g)
    a = make(W0, sparsity=0.5, rank=2, alpha=4.0, score_rank=2, ramp=0.0)
    x = torch.randn(3, 24, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x, W0, None)
        Wp = a.pruned(W0)
    assert y.dtype == torch.bfloat16 and Wp.dtype == torch.float32
    torch.testing.assert_close(Wp, a.pruned(W0), rtol=0, atol=0)
    torch.testing.assert_close(y, F.linear(x.bfloat16(), a.pruned(W0).bfloat16()), rtol=0, atol=0)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in a.parameters())
