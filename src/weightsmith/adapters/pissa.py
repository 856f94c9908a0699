"""PiSSA: LoRA initialised from the principal singular triplets of ``W0``.

Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", 2024, arXiv:2404.02948.

With ``W0 = U S Vᵀ``, ``A0 = sqrt(S_r / s) V_rᵀ`` and ``B0 = U_r sqrt(S_r / s)`` (``s`` the LoRA
scaling), the paper trains ``B A`` from ``(B0, A0)`` on top of the frozen residual
``W_res = W0 - s B0 A0``. Here ``W0`` is left untouched and the adapter carries the frozen
principal part instead: ``ΔW = s (B A - B0 A0)``. The function and the gradients are the same,
the adapter is exactly zero at init, unmerging is exact, and a saved adapter is plain LoRA of rank
``2r`` (``[B, -B0] [A; A0]``), which is what PEFT's ``subtract_mutated_init`` produces on save.
``A0, B0`` are not saved: they are recomputed from ``W0`` when loading.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..linalg import rsvd, svd
from ._core import Adapter, AdapterConfig, AdapterContext, check_rank
from .lora import lora_forward, lora_scaling


class PiSSAAdapter(Adapter):
    A0: Tensor
    neg_B0: Tensor

    def __init__(self, A0: Tensor, B0: Tensor, scaling: float) -> None:
        super().__init__()
        self.A = nn.Parameter(A0.clone())
        self.B = nn.Parameter(B0.clone())
        self.hold(A0=A0, neg_B0=-B0)  # held negated: the rank-2r factor [B, -B0] is one cat per step
        self.scaling = scaling

    def delta(self, W0: Tensor) -> Tensor:
        return (self.B @ self.A + self.neg_B0 @ self.A0) * self.scaling

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.B, self.neg_B0], 1) * self.scaling, torch.cat([self.A, self.A0], 0)

    # alone on a layer, the base product x W0ᵀ runs inside the LoRA node (see lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        A, B = torch.cat([self.A, self.A0], 0), torch.cat([self.B, self.neg_B0], 1)
        return lora_forward(base_out, x, A, B, self.scaling, W0)


@register_config("pissa", kind="adapter")
class PiSSA(AdapterConfig):
    """LoRA (rank, alpha, rslora) from the top-``rank`` SVD of ``W0``; ``niter > 0``: randomized SVD."""

    default_lr: ClassVar[float] = 2e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, alpha=8.0)

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    niter: int = 0
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> PiSSAAdapter:
        check_rank(self.rank, W0, ctx)
        s = lora_scaling(self.alpha, self.rank, self.rslora)
        if self.niter > 0:
            U, S, Vh = rsvd(W0, self.rank, n_iter=self.niter, generator=ctx.generator(W0.device))
        else:
            U, S, Vh = svd(W0)
            U, S, Vh = U[:, : self.rank], S[: self.rank], Vh[: self.rank]
        root = (S / s).sqrt()
        return PiSSAAdapter(root.unsqueeze(1) * Vh, U * root, s)
