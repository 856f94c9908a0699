"""LoHa: the Hadamard (element-wise) product of two low-rank matrices, full rank for a LoRA-size budget.

Hyeon-Woo, Ye-Bin & Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", ICLR 2022, arXiv:2108.06098 (eq. 2), as adapted to fine-tuning by LyCORIS (Yeh et al.,
"Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024):

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a [out, r],  W1b, W2b [r, in],   s = alpha / r

``rank(ΔW) ≤ r²`` while ``2r(out + in)`` numbers train. Initialisation (PEFT's): Kaiming-uniform
``W1a, W1b, W2a`` and ``W2b = 0``, so ``ΔW = 0``. The PEFT tensor names are ``hada_w1_a`` etc.

Fast path: the Hadamard product of two rank-r products is itself a product of face-splitting
(row-wise Khatri-Rao) factors, ``(W1a W1b) ⊙ (W2a W2b) = (W1a • W2a)(W1b ∗ W2b)`` with
``(W1a • W2a)[o, i·r+j] = W1a[o, i] W2a[o, j]`` and ``(W1b ∗ W2b)[i·r+j, c] = W1b[i, c] W2b[j, c]``
(Slyusar, 1999), so when ``r²(out + in) < out · in`` the forward pass is a LoRA of rank r² and no
dense ``out × in`` matrix is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import (
    Adapter,
    AdapterConfig,
    AdapterContext,
    check_dropouts,
    check_rank,
    load_peft_tensors,
    pattern_value,
)
from .lora import lora_forward


def kaiming(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """PEFT's default init for LyCORIS factors: ``kaiming_uniform_(a=sqrt(5))`` of a [rows, cols] matrix."""
    t = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
    return t


def face_split_rows(A1: Tensor, A2: Tensor) -> Tensor:
    """``[o, i·r + j] = A1[o, i] · A2[o, j]`` for A1, A2 [out, r]: the row-wise Khatri-Rao product."""
    return (A1.unsqueeze(2) * A2.unsqueeze(1)).reshape(A1.shape[0], -1)


def face_split_cols(B1: Tensor, B2: Tensor) -> Tensor:
    """``[i·r + j, c] = B1[i, c] · B2[j, c]`` for B1, B2 [r, in]: the column-wise Khatri-Rao product."""
    return (B1.unsqueeze(1) * B2.unsqueeze(0)).reshape(-1, B1.shape[1])


class LoHaAdapter(Adapter):
    """Trainable ``hada_w1_a``, ``hada_w2_a`` [out, r] and ``hada_w1_b``, ``hada_w2_b`` [r, in]."""

    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "hada_w1_a": "hada_w1_a",
        "hada_w1_b": "hada_w1_b",
        "hada_w2_a": "hada_w2_a",
        "hada_w2_b": "hada_w2_b",
    }

    def __init__(self, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float) -> None:
        super().__init__()
        self.hada_w1_a = nn.Parameter(w1a)
        self.hada_w1_b = nn.Parameter(w1b)
        self.hada_w2_a = nn.Parameter(w2a)
        self.hada_w2_b = nn.Parameter(w2b)
        self.scaling = scaling
        out_f, r = w1a.shape
        self.factored = r * r * (out_f + w1b.shape[1]) < out_f * w1b.shape[1]

    def delta(self, W0: Tensor) -> Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def low_rank(self) -> tuple[Tensor, Tensor]:
        B = face_split_rows(self.hada_w1_a, self.hada_w2_a) * self.scaling
        return B, face_split_cols(self.hada_w1_b, self.hada_w2_b)

    # factored and alone on a layer, the base product x W0ᵀ runs inside the LoRA node (lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        if not self.factored:
            base = F.linear(x, W0) if base_out is None else base_out
            return base + F.linear(x, self.delta(W0).to(x.dtype))
        B = face_split_rows(self.hada_w1_a, self.hada_w2_a)
        A = face_split_cols(self.hada_w1_b, self.hada_w2_b)
        return lora_forward(base_out, x, A, B, self.scaling, W0)

    def peft_state(self) -> dict[str, Tensor]:
        return {k: self.get_parameter(a).detach() for k, a in self.PEFT_NAMES.items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, self.PEFT_NAMES)


@register_config("loha", kind="adapter")
class LoHa(AdapterConfig):
    """``rank`` r of each of the two factors (ΔW has rank ≤ r²); scaling ``alpha / r`` (PEFT: 8 and 8)."""

    peft_type: ClassVar[str | None] = "LOHA"
    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=3, alpha=6.0)

    rank: int = 8
    alpha: float = 8.0
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoHaAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "LoHa")
        g = ctx.generator()
        w1a, w1b, w2a = kaiming(out_f, r, g), kaiming(r, in_f, g), kaiming(out_f, r, g)
        dev = W0.device
        return LoHaAdapter(
            w1a.to(dev), w1b.to(dev), w2a.to(dev), torch.zeros(r, in_f, device=dev), self.alpha / r
        )

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> LoHa:
        # use_effective_conv2d only concerns convolutions; weightsmith adapts linear layers
        check_dropouts(peft_config, ("rank_dropout", "module_dropout"), "LoHa")
        return cls(
            rank=int(pattern_value(peft_config, "rank_pattern", module, peft_config.get("r", 8))),
            alpha=float(pattern_value(peft_config, "alpha_pattern", module, peft_config.get("alpha", 8))),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "LOHA",
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "use_effective_conv2d": False,
            "init_weights": True,
        }
