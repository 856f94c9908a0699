"""HRA: Householder reflection adaptation, an orthogonal multiplicative update of low rank.

Yuan, Liu & Xu, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024, arXiv:2405.17484.

    W' = W0 H,   H = Π_{i=1..r} (I - 2 u_i u_iᵀ / ‖u_i‖²)        (u_i ∈ R^in, the columns of ``hra_u``)

so ``ΔW = W0 (H - I)`` has rank ≤ r. Initialisation (PEFT's): r/2 Kaiming-uniform vectors, each
repeated twice, so adjacent reflections cancel and ``H = I`` (r must be even). PEFT's ``apply_GS``
(Gram-Schmidt, ``H = I - 2 Q Qᵀ``) is left out: it can never equal I, and on PEFT's paired init it
divides by zero. The fast path reflects the activations,
``x Hᵀ``, with r rank-1 updates and never forms an [in, in] matrix; unmerge applies ``Hᵀ = H⁻¹``.
The paper's orthogonality regulariser ``λ ‖I - ÛᵀÛ‖_F²`` (Û: the normalised u_i) is ``regularizer()``
when ``ortho_lambda > 0``; PEFT does not implement it. ``r·in`` numbers train per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext


class HRAAdapter(Adapter):
    """Trainable ``hra_u`` [in, r]."""

    def __init__(self, u: Tensor, ortho_lambda: float) -> None:
        super().__init__()
        self.hra_u = nn.Parameter(u)
        self.ortho_lambda = ortho_lambda

    def directions(self) -> Tensor:
        """Unit reflection vectors [in, r]."""
        return self.hra_u / self.hra_u.norm(dim=0)

    def _reflect_rows(self, M: Tensor, reverse: bool) -> Tensor:
        """``M H`` (reverse=False) or ``M Hᵀ`` (reverse=True) for row vectors M [..., in]."""
        U = self.directions().to(M.dtype)
        order = range(U.shape[1] - 1, -1, -1) if reverse else range(U.shape[1])
        for i in order:
            ui = U[:, i]
            M = M - 2 * (M @ ui)[..., None] * ui
        return M

    def delta(self, W0: Tensor) -> Tensor:
        return self._reflect_rows(W0, reverse=False) - W0

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        z = self._reflect_rows(x, reverse=True)  # (W0 H) x = W0 (Hᵀ applied to x as a row: x Hᵀ)
        return base_out + F.linear(z - x, W0.to(x.dtype))

    def merge(self, W0: Tensor) -> Tensor:
        return self._reflect_rows(W0, reverse=False)

    def unmerge(self, W_merged: Tensor) -> Tensor:
        return self._reflect_rows(W_merged, reverse=True)

    def regularizer(self) -> Tensor | None:
        if self.ortho_lambda <= 0:
            return None
        U = self.directions()
        eye = torch.eye(U.shape[1], device=U.device, dtype=U.dtype)
        return self.ortho_lambda * ((eye - U.T @ U) ** 2).sum()


@register_config("hra", kind="adapter")
@dataclass(frozen=True)
class HRA(AdapterConfig):
    """``rank`` r reflections (even; PEFT default 8); ``ortho_lambda`` λ of the orthogonality regulariser."""

    rank: int = 8
    ortho_lambda: float = 0.0
    seed: int = 0

    @classmethod
    def example(cls) -> HRA:
        return cls(rank=4)

    def create(self, W0: Tensor, ctx: AdapterContext) -> HRAAdapter:
        in_f = W0.shape[1]
        r = self.rank
        if r < 2 or r % 2 or r > in_f:
            raise ctx.error(
                f"HRA rank must be even and in 2..{in_f} (identity init pairs reflections), got {r}"
            )
        half = torch.empty(in_f, r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=ctx.generator())
        return HRAAdapter(torch.repeat_interleave(half, 2, dim=1).to(W0.device), self.ortho_lambda)
