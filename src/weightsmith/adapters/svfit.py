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
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ..linalg import svd
from ._core import Adapter, AdapterConfig, AdapterContext, check_rank


class SVFitAdapter(Adapter):
    """Trainable ``sigma`` [r]; frozen ``U`` [out, r], ``V`` [in, r] and the initial values ``sigma0``."""

    U: Tensor
    V: Tensor
    sigma0: Tensor

    def __init__(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        super().__init__()
        self.hold(U=U, V=V, sigma0=S.clone())
        self.sigma = nn.Parameter(S.clone())

    def delta(self, W0: Tensor) -> Tensor:
        return (self.U * (self.sigma - self.sigma0)) @ self.V.T

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return self.U * (self.sigma - self.sigma0), self.V.T

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        dt = x.dtype
        h = F.linear(x, self.V.T.to(dt)) * (self.sigma - self.sigma0).to(dt)
        return base_out + F.linear(h, self.U.to(dt))


def energy_rank(S: Tensor, energy: float) -> int:
    """Smallest r with ``Σ_{i<=r} σ_i² >= energy · Σ σ_i²``."""
    cum = torch.cumsum(S.double() ** 2, 0)
    return int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1


@register_config("svfit", kind="adapter")
class SVFit(AdapterConfig):
    """``rank``: number of top singular values to train (None: all); or ``energy`` in (0, 1] to choose it."""

    default_lr: ClassVar[float] = 5e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=8)

    rank: int | None = None
    energy: float | None = None

    def create(self, W0: Tensor, ctx: AdapterContext) -> SVFitAdapter:
        limit = min(W0.shape)
        if self.rank is not None and self.energy is not None:
            raise ctx.error("SVFit takes rank or energy, not both")
        U, S, Vh = svd(W0)
        if self.energy is not None:
            if not 0.0 < self.energy <= 1.0:
                raise ctx.error(f"SVFit energy must be in (0, 1], got {self.energy}")
            r = min(energy_rank(S, self.energy), limit)
        else:
            r = limit if self.rank is None else self.rank
        check_rank(r, W0, ctx, "SVFit")
        return SVFitAdapter(U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].T.contiguous())
