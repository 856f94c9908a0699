"""SLTrain: a low-rank plus a sparse update, the sparse support drawn uniformly at random and fixed.

Han, Li, Huang, Hong, Takeda, Jawanpuria & Mishra, "SLTrain: a sparse plus low-rank approach for
parameter and memory efficient pretraining", NeurIPS 2024, arXiv:2406.02214.

    ΔW = (α / r) B A + S,   B [out, r], A [r, in],   S with support I (|I| = round(δ · out · in)) and values V

The paper parameterises the whole weight this way for pre-training; as an adapter it is the update of
a frozen W0. ``A`` is Kaiming-uniform, ``B = 0``; the paper draws V ~ U(±1/√in), here ``V = 0`` so
that ``ΔW = 0`` at the start. The support is sampled without replacement from a generator seeded by
(seed, weight name) and rebuilt on load, so a file holds ``r (out + in) + |I|`` numbers per layer and
no indices. The fast path (``_SparseLowRank``, one autograd node) builds the dense weight and runs one
product: ``torch.sparse`` has no bfloat16 CUDA kernel, and at a density of a few percent a dense
tensor-core product is as fast as a sparse one. Alone on a layer (``base_out`` None) the node owns the
base product too: ``W_eff = W0 + S + (α/r) B A`` (a copy of ``W0``, the values added at the support by one
gather and one ``index_put_``, then ``addmm_``), ``y = x W_effᵀ`` and ``dx = g W_eff``: one GEMM each way
instead of two plus a full-size sum. Beside other adapters (``base_out`` given) it adds ``x ΔWᵀ``.
Backward forms ``∂ΔW = gᵀ x`` once and gathers ``∂V`` from it; ``∂B``, ``∂A`` are thin products.
In 16-bit activations the fused ``W_eff`` is rounded once to the activations' dtype, so an entry of
``ΔW`` below half a unit in the last place of ``W0``'s entry does not show in the output (as in a merged
16-bit model); the gradients, formed from ``gᵀ x``, are not affected.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, amp_apply, autocast_off, check_rank
from .lora import _mm_to


def random_support(numel: int, nnz: int, g: torch.Generator) -> Tensor:
    """``nnz`` distinct flat indices in ``[0, numel)``, uniform at random, sorted (no full permutation)."""
    if nnz * 4 >= numel:
        return torch.randperm(numel, generator=g)[:nnz].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < nnz:
        draw = torch.randint(0, numel, (nnz - picked.numel() + nnz // 8 + 16,), generator=g)
        picked = torch.cat([picked, draw]).unique()
    # a uniform subset of a uniform random set is uniform; unique() sorted it, so subsample at random
    keep = torch.randperm(picked.numel(), generator=g)[:nnz]
    return picked[keep].sort().values


class _SparseLowRank(torch.autograd.Function):
    """``x W_effᵀ`` with ``W_eff = W0 + ΔW`` (``base_out`` None) or ``base_out + x ΔWᵀ``, where
    ``ΔW = s B A + scatter(V at flat)``; hand-written backward. Only one ``[out, in]`` buffer is built and
    saved (``W_eff`` or ``ΔW``)."""

    @staticmethod
    def forward(
        ctx: Any,
        base_out: Tensor | None,
        x: Tensor,
        W0: Tensor,
        A: Tensor,
        B: Tensor,
        V: Tensor,
        flat: Tensor,
        s: float,
    ) -> Tensor:
        dt, out_f, in_f = x.dtype, B.shape[0], A.shape[1]
        A_c, B_c = A.to(dt), B.to(dt)
        if base_out is None:  # W_eff = W0 + S: one copy of W0, the values added at the support
            W = torch.empty(out_f, in_f, dtype=dt, device=x.device).copy_(W0)
            Wf = W.view(-1)
            Wf.index_put_((flat,), Wf[flat].add_(V))
        else:
            W = torch.zeros(out_f * in_f, dtype=dt, device=x.device).index_put_((flat,), V.to(dt))
            W = W.view(out_f, in_f)
        W.addmm_(B_c, A_c, alpha=s)
        x2 = x.reshape(-1, in_f)
        if base_out is None:
            y = torch.mm(x2, W.t())
        else:
            y = torch.addmm(base_out.reshape(-1, out_f), x2, W.t())
        ctx.save_for_backward(x2, W, A_c, B_c, flat)
        ctx.s, ctx.x_shape, ctx.fused = s, x.shape, base_out is None
        ctx.dtypes = (W0.dtype, A.dtype, B.dtype, V.dtype)
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, W, A_c, B_c, flat = ctx.saved_tensors
        need_base, need_x, need_W, need_A, need_B, need_V = ctx.needs_input_grad[:6]
        g2 = g.reshape(-1, g.shape[-1])
        dx = torch.mm(g2, W).view(ctx.x_shape) if need_x else None  # g W_eff, or g ΔW beside base_out
        dW0 = dA = dB = dV = None
        if need_A or need_B or need_V or (need_W and ctx.fused):
            G = torch.mm(g2.t(), x2)  # ∂ΔW = ∂W_eff, [out, in]
            dW0 = G.to(ctx.dtypes[0]) if need_W and ctx.fused else None
            dA = _mm_to(B_c.t(), G, ctx.dtypes[1], ctx.s) if need_A else None
            dB = _mm_to(G, A_c.t(), ctx.dtypes[2], ctx.s) if need_B else None
            dV = G.view(-1)[flat].to(ctx.dtypes[3]) if need_V else None
        return g if need_base else None, dx, dW0, dA, dB, dV, None, None


class SLTrainAdapter(Adapter):
    """Trainable ``A`` [r, in], ``B`` [out, r] and ``values`` [|I|]; frozen support ``index`` [2, |I|]."""

    index: Tensor
    flat: Tensor
    # alone on a layer SLTrain computes x W0ᵀ itself (base_out None): one GEMM with W0 + ΔW
    needs_base_out: ClassVar[bool] = False

    def __init__(self, A: Tensor, out_f: int, flat: Tensor, scaling: float) -> None:
        super().__init__()
        in_f = A.shape[1]
        self.shape = (out_f, in_f)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_f, A.shape[0], device=A.device))
        self.values = nn.Parameter(torch.zeros(flat.numel(), device=A.device))
        self.hold(index=torch.stack([flat // in_f, flat % in_f]).to(A.device), flat=flat.to(A.device))
        self.scaling = scaling

    def delta(self, W0: Tensor) -> Tensor:
        S = torch.zeros(self.shape, device=self.values.device, dtype=self.values.dtype)
        S = S.index_put((self.index[0], self.index[1]), self.values)
        return self.scaling * (self.B @ self.A) + S

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        args = (W0, self.A, self.B, self.values, self.flat, self.scaling)
        return amp_apply(_SparseLowRank, base_out, x, *args)


@register_config("sltrain", kind="adapter")
class SLTrain(AdapterConfig):
    """``rank`` r and ``alpha`` (scaling α/r) of the low-rank part; ``density`` δ of the sparse part."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, alpha=8.0, density=0.05)

    rank: int = 8
    alpha: float = 16.0
    density: float = 0.03
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> SLTrainAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "SLTrain")
        if not 0.0 <= self.density <= 1.0:
            raise ctx.error(f"SLTrain density must be in [0, 1], got {self.density}")
        g = ctx.generator()
        A = torch.empty(r, in_f)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        flat = random_support(out_f * in_f, round(self.density * out_f * in_f), g)
        return SLTrainAdapter(A.to(W0.device), out_f, flat, self.alpha / r)
