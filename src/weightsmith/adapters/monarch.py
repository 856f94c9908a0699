"""Monarch: the update as a product of two block-diagonal matrices interleaved with a fixed permutation.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra & Ré, "Monarch: Expressive Structured Matrices
for Efficient and Accurate Training", ICML 2022, arXiv:2204.00595.

    M = P_2 L P_1 R,  R = diag(R_1..R_k), R_a [q, p] (in = k p),  L = diag(L_1..L_l), L_c [s, k b] (out = l s)

with ``q = b l``. ``P_1`` regroups R's output ``(k, q)`` as ``(k b, l)`` and transposes it, ``P_2`` writes
L's output ``(l, s)`` in ``(s, l)`` order (the layout of the authors' ``blockdiag_butterfly_multiply``).
Equivalently, after permuting rows and columns, ``M`` splits into ``l × k`` blocks of size ``[s, p]``,
each of rank ≤ b (``block_rank``; b = 1 is the paper's Monarch). That gives the paper's analytic
projection of a dense matrix onto Monarch matrices: the best rank-b approximation (SVD) of every block,
computed in :func:`monarch_project` (the authors' code handles square matrices with b = 1 only).

As an adapter ``ΔW`` is a Monarch matrix. ``init="project"`` starts the factors at the projection of
W0 and trains ``ΔW = M(L, R) - M(L_0, R_0)`` (the frozen ``L_0, R_0`` are rebuilt from W0 on load);
``init="zero"`` starts ``L = 0`` and R random. ``b (k·out + l·in)`` numbers train (k = l = nblocks).

Fast path: ``M`` has rank at most ``k q = k b l``, and :func:`monarch_factors` writes it exactly as a
thin product ``Lf Rf`` (block-diagonal ``R`` as ``[k q, in]``, ``P_2 L P_1`` as ``[out, k q]``; 16 columns
for the defaults), so a step is one LoRA-shaped product; with ``init="project"`` the frozen factors are
concatenated along that rank (negated), so ``M(L, R) - M(L_0, R_0)`` is still a single product.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..linalg import svd
from ._core import Adapter, AdapterConfig, AdapterContext
from .lora import lora_forward


def monarch_multiply(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """``x Mᵀ`` for ``x`` [..., in], ``R`` [k, q, p], ``L`` [l, s, k b]; returns [..., l s]."""
    k, q, p = R.shape
    l, s, kb = L.shape
    h = torch.einsum("kqp,...kp->...kq", R, x.reshape(*x.shape[:-1], k, p))
    h = h.reshape(*x.shape[:-1], kb, l).transpose(-1, -2)  # P_1: (k q) -> (k b, l) -> (l, k b)
    y = torch.einsum("lsr,...lr->...sl", L, h)  # P_2: output in (s, l) order
    return y.reshape(*x.shape[:-1], s * l)


def monarch_dense(R: Tensor, L: Tensor) -> Tensor:
    """The dense ``[out, in]`` matrix ``M``."""
    k, _, p = R.shape
    return monarch_multiply(torch.eye(k * p, dtype=R.dtype, device=R.device), R, L).T


def monarch_factors(R: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    """``(Lf [out, k q], Rf [k q, in])`` with ``Lf @ Rf == monarch_dense(R, L)`` (rows of Rf: (a, t, c))."""
    k, q, p = R.shape
    l, s, kb = L.shape
    # block-diagonal by diag_embed (one copy per factor, run every step): Rf[(a, t), (b, π)] = R[a, t, π] δ_ab
    # and Lf[(σ, c), (r, d)] = L[c, σ, r] δ_cd
    Rf = torch.diag_embed(R.permute(1, 2, 0), dim1=0, dim2=2).reshape(k * q, k * p)
    Lf = torch.diag_embed(L.permute(1, 2, 0), dim1=1, dim2=3).reshape(s * l, kb * l)
    return Lf, Rf


def monarch_project(W: Tensor, nblocks: int, block_rank: int = 1) -> tuple[Tensor, Tensor]:
    """Factors ``(R, L)`` of the Monarch matrix nearest to ``W`` in Frobenius norm (k = l = nblocks).

    ``M[(σ, c), (a, π)]`` (row ``σ l + c``, column ``a p + π``) restricted to one ``(c, a)`` is the block
    ``Σ_t L[c, :, a b + t] R[a, c + t l, :]ᵀ`` of rank ≤ b, and the blocks are independent, so the
    optimum is the truncated SVD of each block, split as ``U √S`` and ``√S Vᵀ``.
    """
    out_f, in_f = W.shape
    k = l = nblocks
    b = block_rank
    s, p = out_f // l, in_f // k
    blocks = W.float().reshape(s, l, k, p).permute(1, 2, 0, 3)  # [c, a, s, p]
    U, S, Vh = svd(blocks)
    root = S[..., :b].sqrt()
    Ub = U[..., :b] * root[..., None, :]  # [c, a, s, b]
    Vb = Vh[..., :b, :] * root[..., :, None]  # [c, a, b, p]
    L = Ub.permute(0, 2, 1, 3).reshape(l, s, k * b)  # L[c, :, a b + t]
    R = Vb.permute(1, 2, 0, 3).reshape(k, b * l, p)  # R[a, t l + c, :]
    return R.contiguous(), L.contiguous()


class MonarchAdapter(Adapter):
    """Trainable ``R`` [k, b l, p], ``L`` [l, s, k b]; frozen ``R0``, ``L0`` if projected."""

    R0: Tensor
    L0: Tensor
    Lf0: Tensor
    Rf0: Tensor

    def __init__(self, R: Tensor, L: Tensor, project: bool) -> None:
        super().__init__()
        self.R = nn.Parameter(R.clone())
        self.L = nn.Parameter(L.clone())
        self.project = project
        if project:
            self.hold(R0=R.clone(), L0=L.clone())
            Lf0, Rf0 = monarch_factors(R, L)
            self.hold(
                Lf0=-Lf0,  # negated: subtracted from M(L, R)
                Rf0=Rf0,
            )

    def delta(self, W0: Tensor) -> Tensor:
        M = monarch_dense(self.R, self.L)
        return M - monarch_dense(self.R0, self.L0) if self.project else M

    def low_rank(self) -> tuple[Tensor, Tensor]:
        Lf, Rf = monarch_factors(self.R, self.L)
        if self.project:
            return torch.cat([Lf, self.Lf0], 1), torch.cat([Rf, self.Rf0])
        return Lf, Rf

    # alone on a layer, the base product x W0ᵀ runs inside the LoRA node (see lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        Lf, Rf = self.low_rank()
        return lora_forward(base_out, x, Rf, Lf, 1.0, W0)


@register_config("monarch", kind="adapter")
class Monarch(AdapterConfig):
    """``nblocks`` blocks per factor (divides both sides); ``block_rank`` b; ``init``: "project" | "zero"."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(nblocks=4, block_rank=2)

    nblocks: int = 4
    block_rank: int = 1
    init: str = "project"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("project", "zero"):
            raise ValueError(f"Monarch init must be 'project' or 'zero', got {self.init!r}")

    def create(self, W0: Tensor, ctx: AdapterContext) -> MonarchAdapter:
        out_f, in_f = W0.shape
        nb, b = self.nblocks, self.block_rank
        if nb < 1 or out_f % nb or in_f % nb:
            raise ctx.error(f"Monarch nblocks {nb} must divide both sides", tuple(W0.shape))
        if b < 1 or b > min(out_f // nb, in_f // nb):
            raise ctx.error(f"Monarch block_rank {b} exceeds the block size", tuple(W0.shape))
        if self.init == "project":
            R, L = monarch_project(W0, nb, b)
            return MonarchAdapter(R, L, project=True)
        p = in_f // nb
        bound = 1.0 / math.sqrt(p)  # Kaiming-uniform (a = sqrt(5)) bound for a [.., p] block
        R = (torch.rand(nb, b * nb, p, generator=ctx.generator()) * 2 - 1) * bound
        L = torch.zeros(nb, out_f // nb, nb * b)
        return MonarchAdapter(R.to(W0.device), L.to(W0.device), project=False)
