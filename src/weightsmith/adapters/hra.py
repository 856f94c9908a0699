"""HRA: Householder reflection adaptation, an orthogonal multiplicative update of low rank.

Yuan, Liu & Xu, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024, arXiv:2405.17484.

    W' = W0 H,   H = Π_{i=1..r} (I - 2 u_i u_iᵀ / ‖u_i‖²)        (u_i ∈ R^in, the columns of ``hra_u``)

so ``ΔW = W0 (H - I)`` has rank ≤ r. Initialisation (PEFT's): r/2 Kaiming-uniform vectors, each
repeated twice, so adjacent reflections cancel and ``H = I`` (r must be even). PEFT's ``apply_GS``
(Gram-Schmidt, ``H = I - 2 Q Qᵀ``) is left out: it can never equal I, and on PEFT's paired init it
divides by zero. Unmerge applies ``Hᵀ = H⁻¹``.

Fast path: the compact WY form of a product of reflections (Schreiber & Van Loan, "A storage-efficient
WY representation for products of Householder transformations", 1989; the closed form of T is from
Joffrain et al., "Accumulating Householder transformations, revisited", 2006):

    H = I - U T Uᵀ,   T⁻¹ = striu(UᵀU) + ½ diag(UᵀU)      (U = ``hra_u`` unnormalised, T upper triangular)

so ``x (W0 H)ᵀ = base_out - (x U Tᵀ)(W0 U)ᵀ``: two thin products like LoRA of rank r plus one ``W0 U``
(a GEMM with r columns), no [tokens, in] intermediate and no second pass through W0.
The paper's orthogonality regulariser ``λ ‖I - ÛᵀÛ‖_F²`` (Û: the normalised u_i) is ``regularizer()``
when ``ortho_lambda > 0``; PEFT does not implement it. ``r·in`` numbers train per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import Adapter, AdapterConfig, AdapterContext, amp_apply, autocast_off, copy_peft


class _HouseholderWY(torch.autograd.Function):
    """``y = base_out + (x Cᵀ)(W0 U)ᵀ``, ``C = -T Uᵀ = S⁻¹ Uᵀ``, ``S = -T⁻¹ = (UᵀU) ⊙ M``; backward by hand.

    ``M`` = -(strict upper ones + ½ I) folds the minus sign into S, so no op is spent on negation.
    """

    @staticmethod
    def forward(ctx: Any, base_out: Tensor, x: Tensor, U: Tensor, W0: Tensor, M: Tensor) -> Tensor:
        ctx.u_dtype = U.dtype
        if U.dtype not in (torch.float32, torch.float64):
            U = U.float()  # the small r x r algebra never in half precision
        M = M.to(U.dtype)
        S = torch.mm(U.t(), U).mul_(M)  # [r, r] upper triangular, = -T⁻¹
        C = torch.linalg.solve_triangular(S, U.t(), upper=True)  # -T Uᵀ, [r, in]
        C_c, U_c = C.to(x.dtype), U.to(W0.dtype)
        Wu = torch.mm(W0, U_c).to(x.dtype)  # W0 U, [out, r]
        x2 = x.reshape(-1, x.shape[-1])
        b = torch.mm(x2, C_c.t())  # -x U Tᵀ
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), b, Wu.t())
        ctx.save_for_backward(x2, b, C_c, Wu, U, S, C, W0, M)
        ctx.x_shape = x.shape
        return y.view(base_out.shape)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, b, C_c, Wu, U, S, C, W0, M = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gb = torch.mm(g2, Wu)
        dx = torch.mm(gb, C_c).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        dWu = torch.mm(g2.t(), b).to(W0.dtype)  # [out, r]
        dW0 = torch.mm(dWu, U.t().to(W0.dtype)) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[2]:
            return g, dx, None, dW0, None
        dC = torch.mm(gb.t(), x2).to(U.dtype)  # [r, in]
        Z = torch.linalg.solve_triangular(S.t(), dC, upper=False)  # S⁻ᵀ dC; dS = -Z Cᵀ
        K = torch.mm(Z, C.t()).mul_(M)  # -dS ⊙ M = -d(UᵀU)
        dU = torch.addmm(torch.mm(W0.t(), dWu).to(U.dtype).add_(Z.t()), U, K + K.t(), alpha=-1)
        return g, dx, dU.to(ctx.u_dtype), dW0, None


class HRAAdapter(Adapter):
    """Trainable ``hra_u`` [in, r]."""

    wy_mask: Tensor

    def __init__(self, u: Tensor, ortho_lambda: float) -> None:
        super().__init__()
        self.hra_u = nn.Parameter(u)
        self.ortho_lambda = ortho_lambda
        r = u.shape[1]
        mask = -(torch.ones(r, r).triu(1) + 0.5 * torch.eye(r))
        self.hold(wy_mask=mask.to(u.device))

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
        return amp_apply(_HouseholderWY, base_out, x, self.hra_u, W0, self.wy_mask)

    def merge(self, W0: Tensor) -> Tensor:
        return self._reflect_rows(W0, reverse=False)

    def unmerge(self, W_merged: Tensor) -> Tensor:
        return self._reflect_rows(W_merged, reverse=True)

    def peft_state(self) -> dict[str, Tensor] | None:
        return {"hra_u": self.hra_u.detach().float().contiguous()}  # PEFT's hra_u is [in, r] as well

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        copy_peft(state, {"hra_u": self.hra_u.data})

    def regularizer(self) -> Tensor | None:
        if self.ortho_lambda <= 0:
            return None
        U = self.directions()
        eye = torch.eye(U.shape[1], device=U.device, dtype=U.dtype)
        return self.ortho_lambda * ((eye - U.T @ U) ** 2).sum()


@register_config("hra", kind="adapter")
class HRA(AdapterConfig):
    """``rank`` r reflections (even; PEFT default 8); ``ortho_lambda`` λ of the orthogonality regulariser."""

    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4)
    peft_type: ClassVar[str | None] = "HRA"

    rank: int = 8
    ortho_lambda: float = 0.0
    seed: int = 0

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> HRA:
        if peft_config.get("apply_GS"):
            raise WeightsmithError(
                "PEFT HRA adapters with apply_GS=true (Gram-Schmidt-orthogonalised reflections) cannot be "
                "imported: weightsmith's HRA applies the reflections as trained "
                "(see docs/adapters-methods.md); nothing was loaded"
            )
        return cls(rank=int(peft_config["r"]))

    def to_peft(self) -> dict[str, Any]:
        return {"peft_type": "HRA", "r": self.rank, "apply_GS": False, "init_weights": True}

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
