"""Hydra: a parallel LoRA branch plus a sequential LoRA branch on the layer's output.

Kim, Yang, Kim, Hong & Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", 2023, arXiv:2309.06922.

    h = W0 x + s · B_p A_p x + s · B_s A_s (W0 x)     =>     ΔW = s · (B_p A_p + B_s A_s W0)

``A_p`` [r, in], ``B_p`` [out, r] (parallel branch, sees the layer's input) and ``A_s`` [r, out],
``B_s`` [out, r] (sequential branch, sees the layer's output). As in the authors' code, the ``A`` are
Xavier-uniform and the ``B`` zero (``ΔW = 0``); their per-branch biases are left out (ours adapts
weights only), and the sequential branch here reads ``W0 x`` without the base bias where theirs also
maps the bias (their merge adds ``s · B_s A_s b0`` to it). ΔW depends on W0, so ``unmerge`` solves
``W' = (I + s B_s A_s) W0 + s B_p A_p`` for W0 through the r×r Woodbury system.
The fast path feeds the base output (bias-free, per the core's contract) to the sequential branch and
never forms the dense update. ``r (in + out) + 2 r out`` numbers train.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, check_rank


class HydraAdapter(Adapter):
    """Trainable ``A_p``, ``B_p`` (parallel) and ``A_s``, ``B_s`` (sequential)."""

    def __init__(self, A_p: Tensor, A_s: Tensor, out_f: int, scale: float) -> None:
        super().__init__()
        r = A_p.shape[0]
        self.A_p = nn.Parameter(A_p)
        self.B_p = nn.Parameter(torch.zeros(out_f, r, device=A_p.device))
        self.A_s = nn.Parameter(A_s)
        self.B_s = nn.Parameter(torch.zeros(out_f, r, device=A_p.device))
        self.scale = scale

    def delta(self, W0: Tensor) -> Tensor:
        return self.scale * (self.B_p @ self.A_p + self.B_s @ (self.A_s @ W0))

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        dt = x.dtype
        par = F.linear(F.linear(x, self.A_p.to(dt)), self.B_p.to(dt))
        seq = F.linear(F.linear(base_out, self.A_s.to(dt)), self.B_s.to(dt))  # base_out = x W0ᵀ, no bias
        return base_out + self.scale * (par + seq)

    def unmerge(self, W_merged: Tensor) -> Tensor:
        s = self.scale
        A_s, B_s = self.A_s.double(), self.B_s.double()
        R = W_merged.double() - s * (self.B_p.double() @ self.A_p.double())
        # (I + s B A)^-1 R = R - s B (I_r + s A B)^-1 A R
        eye = torch.eye(A_s.shape[0], dtype=R.dtype, device=R.device)
        return (R - s * B_s @ torch.linalg.solve(eye + s * A_s @ B_s, A_s @ R)).to(W_merged.dtype)


@register_config("hydra", kind="adapter")
class Hydra(AdapterConfig):
    """``rank`` r of both branches; ``scale`` s multiplies both (the authors' ``scale``)."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4)

    rank: int = 8
    scale: float = 1.0
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> HydraAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "Hydra")
        g = ctx.generator()
        A_p = nn.init.xavier_uniform_(torch.empty(r, in_f), generator=g)
        A_s = nn.init.xavier_uniform_(torch.empty(r, out_f), generator=g)
        return HydraAdapter(A_p.to(W0.device), A_s.to(W0.device), out_f, self.scale)
