"""LoRA: low-rank adaptation, ``W' = W0 + s · B A`` with ``B`` zero at init.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.
The rank-stabilised scaling ``s = alpha / sqrt(r)`` (instead of ``alpha / r``) is from Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ..linalg import mm_float32
from ._core import Adapter, AdapterConfig, AdapterContext, amp_apply, autocast_off, check_rank, copy_peft


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _cast(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``scale · t`` in ``dtype``: one kernel (the scaling rides on the cast)."""
    if scale == 1.0:
        return t.to(dtype)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def _mm_to(a: Tensor, b: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``scale · a b`` in ``dtype`` (a parameter's gradient, float32 while ``a``, ``b`` are 16-bit).

    On CUDA the GEMM writes float32 itself (:func:`~weightsmith.linalg.mm_float32`); elsewhere one cast,
    fused with the scaling.
    """
    if a.dtype == dtype:
        c = torch.mm(a, b)
    elif a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        c = mm_float32(a, b)
    else:
        return _cast(torch.mm(a, b), dtype, scale)
    return c if scale == 1.0 else c.mul_(scale)


class _LoRALinear(torch.autograd.Function):
    """``y = base + s · (x Aᵀ) Bᵀ`` with ``base = x W0ᵀ`` computed here (``base_out`` None) or given.

    One autograd node instead of a dozen (casts, products, scaling, additions). With ``base_out`` None
    the node owns the base product, so the input gradient ``dx = g W0 + s (g B) A`` is one small GEMM
    plus the base GEMM accumulating into it (``addmm_``, β = 1: the sum happens in the GEMM's epilogue)
    instead of two full-size products and an elementwise add; likewise the forward runs the small
    ``h (sB)ᵀ`` first and lets the base GEMM add onto it. ``s`` is folded into the one-kernel cast of
    ``B`` (``Bs = s · B``), so ``g Bs`` already carries it for ``dx`` and ``dA``; ``dB = s · gᵀ h`` takes
    it in its cast to float32. Parameters may be float32 while activations are bfloat16; gradients
    come back in the parameters' dtype. Call it through :func:`amp_apply` (autocast).
    """

    @staticmethod
    def forward(
        ctx: Any, base_out: Tensor | None, x: Tensor, W0: Tensor | None, A: Tensor, B: Tensor, s: float
    ) -> Tensor:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        A_c, Bs = A.to(dt), _cast(B, dt, s)
        h = torch.mm(x2, A_c.t())
        W: Tensor | None = None
        if base_out is None:
            if W0 is None:
                raise TypeError("_LoRALinear needs W0 when base_out is None")
            W = W0.to(dt)
            y = torch.mm(h, Bs.t()).addmm_(x2, W.t())
            out_shape = (*x.shape[:-1], W.shape[0])
        else:
            y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, Bs.t())
            out_shape = tuple(base_out.shape)
        ctx.save_for_backward(x2, h, A_c, Bs, W)
        ctx.s, ctx.x_shape = s, x.shape
        ctx.dtypes = (W0.dtype if W0 is not None else dt, A.dtype, B.dtype)
        return y.view(out_shape)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, A_c, Bs, W = ctx.saved_tensors
        need_base, need_x, need_W, need_A, need_B = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])
        gB = torch.mm(g2, Bs) if need_x or need_A else g2  # s · g B (unused otherwise)
        dx = dW = dA = dB = None
        if need_x:
            dx = torch.mm(gB, A_c)
            dx = (dx if W is None else dx.addmm_(g2, W)).view(ctx.x_shape)
        if need_W and W is not None:
            dW = _mm_to(g2.t(), x2, ctx.dtypes[0])
        if need_A:
            dA = _mm_to(gB.t(), x2, ctx.dtypes[1])
        if need_B:
            dB = _mm_to(g2.t(), h, ctx.dtypes[2], ctx.s)
        return g if need_base else None, dx, dW, dA, dB, None


def lora_forward(
    base_out: Tensor | None, x: Tensor, A: Tensor, B: Tensor, s: float, W0: Tensor | None = None
) -> Tensor:
    """``base_out + s · x Aᵀ Bᵀ`` for activations of any leading shape (the LoRA fast path).

    With ``base_out`` None, ``W0`` ([out, in]) is required and the base product ``x W0ᵀ`` is computed in
    the same autograd node (see :class:`_LoRALinear`).
    """
    return amp_apply(_LoRALinear, base_out, x, W0, A, B, s)


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

    embedding = False  # on an nn.Embedding (PEFT then names the factors lora_embedding_A/B)
    # alone on a layer, LoRA computes x W0ᵀ itself (base_out None), fused with its own products
    needs_base_out: ClassVar[bool] = False

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

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        if base_out is None and self.dropout.training and isinstance(self.dropout, nn.Dropout):
            base_out = F.linear(x, W0)  # the base sees x, the adapter dropout(x): two inputs, no fused dx
        return lora_forward(base_out, self.dropout(x), self.A, self.B, self.scaling, W0)

    def embed(self, ids: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        rows = F.embedding(ids, self.B.to(base_out.dtype))
        return base_out + F.linear(rows, self.A.T.to(base_out.dtype)) * self.scaling

    def _peft_views(self) -> dict[str, Tensor]:
        # PEFT: lora_A.weight [r, in], lora_B.weight [out, r]; on embeddings ΔW = (B_e A_e)ᵀ with
        # lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]
        if self.embedding:
            return {"lora_embedding_A": self.B.data.T, "lora_embedding_B": self.A.data.T}
        return {"lora_A.weight": self.A.data, "lora_B.weight": self.B.data}

    def peft_state(self) -> dict[str, Tensor] | None:
        return {k: v.detach().float().contiguous() for k, v in self._peft_views().items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        copy_peft(state, self._peft_views())


@register_config("lora", kind="adapter")
class LoRA(AdapterConfig):
    """Rank ``r``; scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).

    ``init``: "default" (Kaiming-uniform A, as PEFT) or "gaussian" (A ~ N(0, 1/r²)); B starts at zero.
    """

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, alpha=8.0)
    peft_type: ClassVar[str | None] = "LORA"

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

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoRAAdapter:
        check_rank(self.rank, W0, ctx)
        A, B = lora_init(W0, self.rank, ctx, gaussian=self.init == "gaussian")
        adapter = LoRAAdapter(A, B, lora_scaling(self.alpha, self.rank, self.rslora), self.dropout)
        adapter.embedding = ctx.kind == "embedding"
        return adapter

    @classmethod
    def peft_claims(cls, peft_config: Mapping[str, Any]) -> bool:
        return not peft_config.get("use_dora")

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> LoRA:
        return cls(
            rank=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout") or 0.0),
            rslora=bool(peft_config.get("use_rslora")),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": False,
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
        }
