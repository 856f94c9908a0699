"""NOLA: LoRA's factors as linear combinations of frozen random bases; only the mixing coefficients train.

Koohpayegani, Navaneet, Nooralinejad, Kolouri & Pirsiavash, "NOLA: Compressing LoRA using Linear
Combination of Random Basis", ICLR 2024, arXiv:2310.02556.

    ΔW = s · A B,   A = Σ_{i=1..k} α_i A_i  ([out, r]),   B = Σ_{j=1..l} β_j B_j  ([r, in])

with ``s = alpha / r``. The bases ``A_i``, ``B_j`` are drawn from U(-1, 1)/sqrt(k) (resp. sqrt(l)) as in
the authors' code and are never stored: they come from ``ctx.shared`` (seeded by the adapter's seed),
so a saved NOLA adapter holds ``k + l`` numbers per layer. Layers of the same shape share one set of
bases (each layer keeps its own coefficients); the authors draw a fresh seed per layer instead, which
costs memory but no file space. Initialisation: ``α = 0`` (so ``ΔW = 0``) and ``β ~ N(0, 1/in)``,
which gives ``B`` the variance of LoRA's Kaiming-uniform down-projection; the authors' GPT-2 code
reaches the same start with zero coefficients plus a frozen Kaiming offset added to ``B``.
``basis="orthogonal"`` makes the k bases ``A_i`` (and the l ``B_j``) orthonormal as vectors of
``R^{out·r}`` (``R^{r·in}``), scaled to the same entry variance (``_bases``; a tight frame when k > out·r).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._bases import check_basis, draw_basis
from ._core import Adapter, AdapterConfig, AdapterContext, check_rank, shared_cast
from .lora import lora_forward


def nola_basis(count: int, rows: int, cols: int) -> Callable[[torch.Generator], Tensor]:
    """Factory for ``count`` random ``[rows, cols]`` matrices, entries U(-1, 1) / sqrt(count)."""

    def make(g: torch.Generator) -> Tensor:
        return (torch.rand(count, rows, cols, generator=g) * 2 - 1) / math.sqrt(count)

    return make


class NOLAAdapter(Adapter):
    """Trainable ``alpha`` [k], ``beta`` [l]; shared ``A_basis`` [k, out, r], ``B_basis`` [l, r, in]."""

    A_basis: Tensor
    B_basis: Tensor

    def __init__(self, A_basis: Tensor, B_basis: Tensor, beta: Tensor, scaling: float) -> None:
        super().__init__()
        self.hold(A_basis=A_basis, B_basis=B_basis)
        self.alpha = nn.Parameter(torch.zeros(A_basis.shape[0], device=beta.device))
        self.beta = nn.Parameter(beta)
        self.scaling = scaling

    def factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``A = Σ α_i A_i`` [out, r] and ``B = Σ β_j B_j`` [r, in], mixed in ``dtype`` when given.

        The mixing reads every basis (k · out · r numbers) per call, which dominates NOLA's step;
        in half precision it reads a copy cast once for all layers (half the bytes).
        """
        if dtype is None:
            return torch.einsum("k,kor->or", self.alpha, self.A_basis), torch.einsum(
                "l,lri->ri", self.beta, self.B_basis
            )
        k, out_f, r = self.A_basis.shape
        A = torch.mv(shared_cast(self.A_basis, dtype).view(k, -1).t(), self.alpha.to(dtype))
        B = torch.mv(shared_cast(self.B_basis, dtype).view(self.beta.shape[0], -1).t(), self.beta.to(dtype))
        return A.view(out_f, r), B.view(r, -1)

    def delta(self, W0: Tensor) -> Tensor:
        A, B = self.factors()
        return (A @ B) * self.scaling

    def low_rank(self) -> tuple[Tensor, Tensor]:
        A, B = self.factors()
        return A * self.scaling, B

    # alone on a layer, the base product x W0ᵀ runs inside the LoRA node (see lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        A, B = self.factors(x.dtype)
        return lora_forward(base_out, x, B, A, self.scaling, W0)


@register_config("nola", kind="adapter")
class NOLA(AdapterConfig):
    """``rank`` r of the LoRA factors; ``num_basis_A`` k and ``num_basis_B`` l; scaling ``alpha / rank``;
    ``basis``: "random" (the paper's uniform draw) or "orthogonal" (``_bases``)."""

    default_lr: ClassVar[float] = 5e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, num_basis_A=16, num_basis_B=12, alpha=4.0)

    rank: int = 8
    num_basis_A: int = 1024
    num_basis_B: int = 1024
    alpha: float = 8.0
    basis: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        check_basis(self.basis, "nola")

    def create(self, W0: Tensor, ctx: AdapterContext) -> NOLAAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "NOLA")
        if self.num_basis_A < 1 or self.num_basis_B < 1:
            raise ctx.error("NOLA needs num_basis_A >= 1 and num_basis_B >= 1")
        k, l = self.num_basis_A, self.num_basis_B
        sh, bs = ctx.shared, self.basis  # U(-1, 1) / sqrt(n) has variance 1 / (3 n)
        A_basis = draw_basis(sh, "nola.A", bs, (k, out_f, r), 1 / (3 * k), nola_basis(k, out_f, r))
        B_basis = draw_basis(sh, "nola.B", bs, (l, r, in_f), 1 / (3 * l), nola_basis(l, r, in_f))
        beta = torch.randn(l, generator=ctx.generator()) / math.sqrt(in_f)
        return NOLAAdapter(A_basis, B_basis, beta.to(W0.device), self.alpha / r)
