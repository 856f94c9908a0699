"""LoRA: low-rank adaptation, ``W' = W0 + s · B A`` with ``B`` zero at init.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.
The rank-stabilised scaling ``s = alpha / sqrt(r)`` (instead of ``alpha / r``) is from Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_rank(rank: int, W0: Tensor, ctx: AdapterContext) -> None:
    limit = min(W0.shape)
    if rank < 1 or rank > limit:
        raise ctx.error(f"rank {rank} is not in 1..{limit} (the smaller side of the matrix)", tuple(W0.shape))


def lora_init(W0: Tensor, rank: int, ctx: AdapterContext, gaussian: bool = False) -> tuple[Tensor, Tensor]:
    """``A`` [r, in] random, ``B`` [out, r] zero: PEFT's default (Kaiming-uniform A with a=sqrt(5)).

    For embeddings the random factor is ``A`` ~ N(0, 1) as well, so ``B A = 0`` at init.
    """
    out_f, in_f = W0.shape
    g = ctx.generator()
    A = torch.empty(rank, in_f)
    if ctx.kind == "embedding":
        A.normal_(generator=g)
    elif gaussian:
        A.normal_(std=1.0 / rank, generator=g)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
    return A.to(W0.device), torch.zeros(out_f, rank, device=W0.device)


class LoRAAdapter(Adapter):
    """``ΔW = s · B A``; the fast path is ``base_out + s · (x Aᵀ) Bᵀ``."""

    def __init__(self, A: Tensor, B: Tensor, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, W0: Tensor) -> Tensor:
        return (self.B @ self.A) * self.scaling

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return self.B * self.scaling, self.A

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        h = F.linear(self.dropout(x), self.A.to(x.dtype))
        return base_out + F.linear(h, self.B.to(x.dtype)) * self.scaling

    def embed(self, ids: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        rows = F.embedding(ids, self.B.to(base_out.dtype))
        return base_out + F.linear(rows, self.A.T.to(base_out.dtype)) * self.scaling


@register_config("lora", kind="adapter")
@dataclass(frozen=True)
class LoRA(AdapterConfig):
    """rank ``r``; scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``); ``init``: "default" | "gaussian"."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    seed: int = 0
    supports_embedding = True

    def __post_init__(self) -> None:
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"LoRA init must be 'default' or 'gaussian', got {self.init!r}")

    @classmethod
    def example(cls) -> LoRA:
        return cls(rank=4, alpha=8.0)

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoRAAdapter:
        check_rank(self.rank, W0, ctx)
        A, B = lora_init(W0, self.rank, ctx, gaussian=self.init == "gaussian")
        return LoRAAdapter(A, B, lora_scaling(self.alpha, self.rank, self.rslora), self.dropout)
