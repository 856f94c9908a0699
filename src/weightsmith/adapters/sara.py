"""SaRA: train the smallest-magnitude ("temporarily ineffective") weights as a sparse update, kept
low-rank by a nuclear-norm penalty.

Hu, Zhang, Yi, Huang, Wang & Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive
Sparse Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633.

    I  = the k entries of smallest |W0|     (k = ⌈density · out · in⌉, or rank_budget · (out + in))
    ΔW = scatter_I(V),   V ∈ R^k trainable, V = 0 at the start
    L  = L_task + λ Σ_layers ‖ΔW‖_*          (nuclear norm: the sum of ΔW's singular values)

The paper finds that the smallest 10-20 % of a pre-trained model's weights by magnitude barely affect
its output, so re-training exactly those entries adds task knowledge while the effective weights (and
the model's prior) stay untouched. ``rank_budget`` sizes the support like a LoRA of that rank
(``r (out + in)`` entries), for comparisons at equal trainable parameters. The support is a function
of ``W0`` (ties broken by position), so a saved adapter holds only ``V`` and is rebuilt on load.

Not implemented: the paper's progressive re-selection (entries that become effective during training
are frozen and new ineffective ones are selected); its result depends on the training trajectory, so
it could not be rebuilt from ``W0`` and would need the support saved beside ``V``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext


def ineffective_support(W0: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` entries of smallest |W0| (ties broken by position), sorted."""
    order = torch.argsort(W0.detach().abs().flatten().float(), stable=True)
    return order[:k].sort().values


class SaRAAdapter(Adapter):
    """Trainable ``values`` [k] on the frozen support ``flat`` [k] of the ``[out, in]`` weight."""

    flat: Tensor

    def __init__(self, flat: Tensor, shape: tuple[int, int], nuclear: float) -> None:
        super().__init__()
        self.shape = shape
        self.values = nn.Parameter(torch.zeros(flat.numel(), device=flat.device))
        self.hold(flat=flat)
        self.nuclear = nuclear

    def _dense(self, dtype: torch.dtype) -> Tensor:
        dW = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype, device=self.values.device)
        return dW.index_put((self.flat,), self.values.to(dtype)).view(self.shape)

    def delta(self, W0: Tensor) -> Tensor:
        return self._dense(self.values.dtype)

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        return base_out + F.linear(x, self._dense(x.dtype))

    def regularizer(self) -> Tensor | None:
        if self.nuclear == 0:
            return None
        return self.nuclear * torch.linalg.svdvals(self._dense(torch.float32)).sum()


@register_config("sara", kind="adapter")
class SaRA(AdapterConfig):
    """``density``: fraction of each matrix trained (the smallest |W0|); ``rank_budget`` > 0 instead trains
    ``r (out + in)`` entries (a LoRA of rank r's count); ``nuclear``: λ of the nuclear-norm penalty."""

    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(density=0.1, nuclear=1e-3)

    density: float = 0.1
    rank_budget: int = 0
    nuclear: float = 1e-4

    def create(self, W0: Tensor, ctx: AdapterContext) -> SaRAAdapter:
        out_f, in_f = W0.shape
        if self.rank_budget < 0:
            raise ctx.error(f"SaRA rank_budget must be >= 0, got {self.rank_budget}")
        if self.rank_budget == 0 and not 0.0 < self.density <= 1.0:
            raise ctx.error(f"SaRA density must be in (0, 1], got {self.density}")
        if self.nuclear < 0:
            raise ctx.error(f"SaRA nuclear (λ) must be >= 0, got {self.nuclear}")
        numel = out_f * in_f
        k = self.rank_budget * (out_f + in_f) if self.rank_budget else math.ceil(self.density * numel)
        if k > numel:
            raise ctx.error(
                f"SaRA rank_budget {self.rank_budget} asks for {k} entries of {numel}", (out_f, in_f)
            )
        return SaRAAdapter(ineffective_support(W0, k).to(W0.device), (out_f, in_f), self.nuclear)
