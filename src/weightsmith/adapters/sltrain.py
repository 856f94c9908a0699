"""SLTrain: a low-rank plus a sparse update, the sparse support drawn uniformly at random and fixed.

Han, Li, Huang, Hong, Takeda, Jawanpuria & Mishra, "SLTrain: a sparse plus low-rank approach for
parameter and memory efficient pretraining", NeurIPS 2024, arXiv:2406.02214.

    ΔW = (α / r) B A + S,   B [out, r], A [r, in],   S with support I (|I| = round(δ · out · in)) and values V

The paper parameterises the whole weight this way for pre-training; as an adapter it is the update of
a frozen W0. ``A`` is Kaiming-uniform, ``B = 0``; the paper draws V ~ U(±1/√in), here ``V = 0`` so
that ``ΔW = 0`` at the start. The support is sampled without replacement from a generator seeded by
(seed, weight name) and rebuilt on load, so a file holds ``r (out + in) + |I|`` numbers per layer and
no indices. The fast path (``_SparseLowRank``, one autograd node) scatters the values into a dense
``[out, in]`` buffer, adds ``(α/r) B A`` in place and runs one product: ``torch.sparse`` has no bfloat16
CUDA kernel, and at a density of a few percent a dense tensor-core product is as fast as a sparse one.
Backward forms ``∂ΔW = gᵀ x`` once and gathers ``∂V`` from it; ``∂B``, ``∂A`` are thin products.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, amp_apply, autocast_off, check_rank


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
    """``base_out + x ΔWᵀ`` with ``ΔW = s B A + scatter(V at flat)``; hand-written backward."""

    @staticmethod
    def forward(
        ctx: Any, base_out: Tensor, x: Tensor, A: Tensor, B: Tensor, V: Tensor, flat: Tensor, s: float
    ) -> Tensor:
        out_f, in_f = B.shape[0], A.shape[1]
        A_c, B_c = A.to(x.dtype), B.to(x.dtype)
        dW = torch.zeros(out_f * in_f, dtype=x.dtype, device=x.device).index_put_((flat,), V.to(x.dtype))
        dW = dW.view(out_f, in_f).addmm_(B_c, A_c, alpha=s)
        x2 = x.reshape(-1, in_f)
        y = torch.addmm(base_out.reshape(-1, out_f), x2, dW.t())
        ctx.save_for_backward(x2, dW, A_c, B_c, flat)
        ctx.s, ctx.x_shape, ctx.dtypes = s, x.shape, (A.dtype, B.dtype, V.dtype)
        return y.view(base_out.shape)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, dW, A_c, B_c, flat = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = torch.mm(g2, dW).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        G = torch.mm(g2.t(), x2)  # ∂ΔW, [out, in]
        dA = torch.mm(B_c.t(), G).mul_(ctx.s).to(ctx.dtypes[0]) if ctx.needs_input_grad[2] else None
        dB = torch.mm(G, A_c.t()).mul_(ctx.s).to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
        dV = G.view(-1)[flat].to(ctx.dtypes[2]) if ctx.needs_input_grad[4] else None
        return g, dx, dA, dB, dV, None, None


class SLTrainAdapter(Adapter):
    """Trainable ``A`` [r, in], ``B`` [out, r] and ``values`` [|I|]; frozen support ``index`` [2, |I|]."""

    index: Tensor
    flat: Tensor

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

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        args = (self.A, self.B, self.values, self.flat, self.scaling)
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
