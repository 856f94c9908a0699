"""LoLDU: Lower-Diag-Upper decomposition of the weight; train only the diagonal and one scale.

Shi, Wei, Wu, Ran, Sun, He & Yang, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", 2024, arXiv:2410.13618.

LU with partial pivoting gives ``W0 = P L diag(z0) U`` (L unit lower, U unit upper). Keeping the first r
columns of L and rows of U:

    W' = W_res + σ · P L_r diag(z) U_r,   W_res = W0 - σ0 · P L_r diag(z0) U_r
    =>  ΔW = P L_r (σ diag(z) - σ0 diag(z0)) U_r

``z`` [r] (init ``z0``, the top-left pivots) and the scalar ``σ`` (init ``sigma_init``; the authors' code
starts it at ``lora_alpha / rank``) train: ``r + 1`` numbers per layer. ``rank=None`` keeps the full
decomposition (``min(out, in)``), the reference code's default for 768-wide models. ``P`` is folded
into ``L`` as a row permutation (``P L_r``) instead of a dense ``[out, out]`` matrix as in the reference
code; the factors are rebuilt from W0 on load (not saved). A zero pivot keeps ``z0 = 0`` for that row;
the residual absorbs whatever the truncated product does not represent, so ΔW stays exact.

``ΔW = B A`` with ``A = U_r`` frozen and ``B = P L_r diag(c)``, ``c = σ z - σ0 z0`` (``-σ0 z0`` held): the
same two exact paths as SVFit, chosen per call by counted multiply-adds (``path``,
:func:`~weightsmith.adapters.frozen_a.frozen_diag_forward`): LoRA's fused node with these ``A``, ``B``
(``c`` from :class:`~weightsmith.adapters.frozen_a.Coefficients`, one kernel), or ``x (W0 + ΔW)ᵀ`` with ΔW
built once per call, ``B`` not formed and ``c`` formed inside the node's own passes, ``∂z = σ ∂c`` and
``∂σ = z · ∂c`` where ``∂c`` is summed (on CUDA with Triton: the launches of SVFit's node;
docs/adapters-frozen-a-step.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, check_path, check_rank
from .frozen_a import Coefficients, frozen_diag_forward, frozen_diag_group_terms
from .lora_group import GroupTerms


def ldu(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(P L, z, U1)`` with ``W = (P L) diag(z) U1``: L unit lower [out, k], U1 unit upper [k, in]."""
    P, L, U = torch.linalg.lu(W.double())
    z = torch.diagonal(U)
    U1 = U / torch.where(z == 0, torch.ones_like(z), z)[:, None]
    return (P @ L).float(), z.float(), U1.float()


class LoLDUAdapter(Adapter):
    """Trainable ``z`` [r] and ``sigma`` (scalar); frozen ``PL`` [out, r], ``U`` [r, in], ``z0`` and
    ``m0 = -σ0 z0`` (re-made from ``z0`` whenever the module moves, so it is ``z0``'s in every dtype)."""

    PL: Tensor
    U: Tensor
    z0: Tensor
    m0: Tensor

    needs_base_out: ClassVar[bool] = False  # both paths compute x W0ᵀ themselves

    def __init__(self, PL: Tensor, z0: Tensor, U: Tensor, sigma_init: float, path: str = "auto") -> None:
        super().__init__()
        check_path(path, "LoLDU")
        self.path = path
        self.sigma0 = float(sigma_init)
        self.hold(PL=PL, U=U, z0=z0.clone(), m0=z0 * -self.sigma0)
        self.z = nn.Parameter(z0.clone())
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init), device=z0.device))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoLDUAdapter:  # type: ignore[override]
        super()._apply(fn, recurse)
        self.m0 = self.z0 * -self.sigma0  # from the moved z0: no float32 rounding carried into float64
        return self

    def diag(self) -> Tensor:
        """``c = σ z - σ0 z0``."""
        c: Tensor = Coefficients.apply(self.sigma, self.z, self.m0)
        return c

    def delta(self, W0: Tensor) -> Tensor:
        return (self.PL * self.diag()) @ self.U

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return self.PL * self.diag(), self.U

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return frozen_diag_forward(x, W0, base_out, self.PL, self.z, self.U, self.path, self.sigma, self.m0)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms | None:
        return frozen_diag_group_terms(self.path, x, W0, self.PL, self.diag(), self.U)


@register_config("loldu", kind="adapter")
class LoLDU(AdapterConfig):
    """``rank`` r of the kept LDU factors (None: all); ``sigma_init`` starts the trainable scale σ.
    ``path``: "auto" (per call, the exact computation with fewer multiply-adds), "activation" (LoRA's node
    with ``A = U_r``, ``B = P L_r diag(c)``) or "weight" (``x (W0 + ΔW)ᵀ``, ΔW built once per call)."""

    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=8)

    rank: int | None = None
    sigma_init: float = 1.0
    path: str = "auto"

    def __post_init__(self) -> None:
        check_path(self.path, "LoLDU")

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoLDUAdapter:
        r = min(W0.shape) if self.rank is None else self.rank
        check_rank(r, W0, ctx, "LoLDU")
        PL, z, U = ldu(W0)
        return LoLDUAdapter(
            PL[:, :r].contiguous(), z[:r].contiguous(), U[:r].contiguous(), self.sigma_init, self.path
        )
