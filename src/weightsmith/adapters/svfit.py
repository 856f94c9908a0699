"""SVFit: train the top-r singular values of the pre-trained weight, keep its singular vectors frozen.

Sun, Wei, Wu, Shi, He, Ma, Xie & Yang, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
Models Using Singular Values", 2024, arXiv:2409.05926.

    W0 = W_r + W_e,   W_r = U_r diag(σ_r) V_rᵀ (best rank-r approximation),   W_e the frozen residual
    W' = U_r diag(σ) V_rᵀ + W_e,   σ trainable, initialised to σ_r   =>   ΔW = U_r diag(σ - σ_r) V_rᵀ

``r`` numbers train per layer. ``rank=None`` trains every singular value (``min(out, in)``); for a
768-wide square layer that is 1/16 of LoRA r=8's 2·8·768 parameters, which is the ratio the paper's
abstract quotes. ``energy`` instead picks the smallest r whose singular values hold that fraction of
``Σ σ_i²`` (the paper keeps the values that "capture over 99% of the matrix's information").
``U_r``, ``V_r`` and ``σ_r`` are rebuilt from W0 by SVD on load (not saved); ΔW is unchanged by the
SVD's sign choices. The paper has no public code; this follows the equations above.

The update is ``ΔW = B A`` with ``A = V_rᵀ`` [k, in] frozen and ``B = U_r diag(σ - σ_r)`` [out, k]
computed from the trainable vector; like LoLDU and VeRA it runs on the cheaper of two exact paths, LoRA's
fused node or the weight-space node (:mod:`weightsmith.adapters.frozen_a`; there ``B`` is never formed:
the narrower factor is scaled for the build and ``∂σ`` is ``diag(U_rᵀ (gᵀ x) V_r)``,
:func:`~weightsmith.adapters.frozen_a.frozen_diag_forward`). At ``σ = σ_r`` both give exactly ``x W0ᵀ``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..linalg import as_compute, economy_svd
from ._core import Adapter, AdapterConfig, AdapterContext, check_path, check_rank
from .frozen_a import frozen_diag_forward, frozen_diag_group_terms
from .lora_group import GroupTerms


class SVFitAdapter(Adapter):
    """Trainable ``sigma`` [r]; frozen ``U`` [out, r], ``Vh`` [r, in] and the initial values ``sigma0``."""

    U: Tensor
    Vh: Tensor
    sigma0: Tensor

    needs_base_out: ClassVar[bool] = False  # both paths compute x W0ᵀ themselves

    def __init__(self, U: Tensor, S: Tensor, Vh: Tensor, path: str = "auto") -> None:
        super().__init__()
        check_path(path, "SVFit")
        self.path = path
        self.hold(U=U, Vh=Vh, sigma0=S.clone())
        self.sigma = nn.Parameter(S.clone())

    def delta(self, W0: Tensor) -> Tensor:
        return (self.U * (self.sigma - self.sigma0)) @ self.Vh

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return self.U * (self.sigma - self.sigma0), self.Vh

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return frozen_diag_forward(x, W0, base_out, self.U, self.sigma - self.sigma0, self.Vh, self.path)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms | None:
        return frozen_diag_group_terms(self.path, x, W0, self.U, self.sigma - self.sigma0, self.Vh)


def energy_rank(S: Tensor, energy: float) -> int:
    """Smallest r with ``Σ_{i<=r} σ_i² >= energy · Σ σ_i²``."""
    cum = torch.cumsum(S.double() ** 2, 0)
    return int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1


@register_config("svfit", kind="adapter")
class SVFit(AdapterConfig):
    """``rank``: number of top singular values to train (None: all); or ``energy`` in (0, 1] to choose it.
    ``path``: "auto" (per call, the exact computation with fewer multiply-adds), "activation" (LoRA's node
    with ``A = V_rᵀ``, ``B = U_r diag(σ - σ_r)``) or "weight" (``x (W0 + ΔW)ᵀ``, ΔW built once per call)."""

    default_lr: ClassVar[float] = 5e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=8)

    rank: int | None = None
    energy: float | None = None
    path: str = "auto"

    def __post_init__(self) -> None:
        check_path(self.path, "SVFit")

    def create(self, W0: Tensor, ctx: AdapterContext) -> SVFitAdapter:
        limit = min(W0.shape)
        if self.rank is not None and self.energy is not None:
            raise ctx.error("SVFit takes rank or energy, not both")
        # on CUDA from the float64 Gram's eigenvectors (much faster than cuSOLVER's SVD at model sizes);
        # the update U diag(σ − σ0) Vᵀ is exact whatever the factors' rounding
        U, S, Vh = economy_svd(as_compute(W0))
        if self.energy is not None:
            if not 0.0 < self.energy <= 1.0:
                raise ctx.error(f"SVFit energy must be in (0, 1], got {self.energy}")
            r = min(energy_rank(S, self.energy), limit)
        else:
            r = limit if self.rank is None else self.rank
        check_rank(r, W0, ctx, "SVFit")
        return SVFitAdapter(U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous(), self.path)
