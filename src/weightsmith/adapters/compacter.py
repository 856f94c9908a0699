"""Compacter: the update as a sum of Kronecker products with shared "slow" and low-rank "fast" factors.

Karimi Mahabadi, Henderson & Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
NeurIPS 2021, arXiv:2106.04647 (PHM layers: Zhang et al., ICLR 2021, arXiv:2102.08597).

    ΔW = Σ_{i=1..n} A_i ⊗ B_i,   A_i [n, n] shared by all layers ("slow"),   B_i = s_i t_iᵀ ("fast")

with ``s_i`` [out/n, r] and ``t_i`` [in/n, r] per layer (LPHM, r = 1 in the paper). Compacter puts such
PHM layers in a bottleneck adapter; here the PHM matrix is the additive update of the adapted weight
itself (an adapter of the same family as LoRA), so there is no bottleneck or non-linearity.
Initialisation follows the authors' code: ``A`` ~ N(0, 0.01²), ``t`` Glorot-uniform; ``s`` starts at
zero so ``ΔW = 0``. Trainable numbers: ``n³`` once (shared) plus ``r (out + in)`` per layer.

The core has no shared *trainable* tensors, so the first layer created owns ``A`` as its parameter
(saved once, under that layer) and every other layer holds a plain reference to the same tensor.
The update has rank at most ``n² r`` (16 for the defaults); :meth:`CompacterAdapter.low_rank` writes it
exactly as a thin product, ``Lf [out, n² r]`` with ``Lf[(a, k), (i, b, ρ)] = A_i[a, b] s_i[k, ρ]`` and
``Rf [n² r, in]`` with ``Rf[(i, b, ρ), (b, l)] = t_i[l, ρ]``, so the fast path costs a LoRA of that rank.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..linalg import seeded_generator
from ._core import Adapter, AdapterConfig, AdapterContext, check_rank
from .lora import lora_forward


class CompacterAdapter(Adapter):
    """Trainable ``phm_s`` [n, out/n, r], ``phm_t`` [n, in/n, r]; ``phm_rule`` [n, n, n] (own or shared)."""

    def __init__(self, rule: nn.Parameter, owner: bool, s: Tensor, t: Tensor) -> None:
        super().__init__()
        if owner:
            self.phm_rule = rule
        else:
            self.__dict__["phm_rule"] = rule  # a reference, not registered: saved and moved by its owner
        self.phm_s = nn.Parameter(s)
        self.phm_t = nn.Parameter(t)

    def delta(self, W0: Tensor) -> Tensor:
        A = self.phm_rule.to(self.phm_s.device)
        B = self.phm_s @ self.phm_t.transpose(1, 2)  # [n, out/n, in/n]
        n, p, q = B.shape
        return torch.einsum("iab,ikl->akbl", A, B).reshape(n * p, n * q)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        A, s, t = self.phm_rule.to(self.phm_s.device), self.phm_s, self.phm_t
        n, q, r = t.shape
        Lf = torch.einsum("iab,ikr->akibr", A, s).reshape(n * s.shape[1], n * n * r)
        # Rf[(i, b, ρ), (c, l)] = t_i[l, ρ] δ_bc: t repeated on the block diagonal by one diag_embed
        Rf = torch.diag_embed(t.permute(0, 2, 1).unsqueeze(-1).expand(n, r, q, n), dim1=1, dim2=3)
        Rf = Rf.reshape(n * n * r, n * q)
        return Lf, Rf

    # alone on a layer, the base product x W0ᵀ runs inside the LoRA node (see lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        Lf, Rf = self.low_rank()
        return lora_forward(base_out, x, Rf, Lf, 1.0, W0)


def glorot_uniform(shape: tuple[int, int, int], g: torch.Generator) -> Tensor:
    bound = math.sqrt(6.0 / (shape[1] + shape[2]))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


@register_config("compacter", kind="adapter")
class Compacter(AdapterConfig):
    """``phm_dim`` n (divides both sides); ``rank`` r of the fast weights; ``shared_slow_weights``: one A."""

    default_lr: ClassVar[float] = 3e-3
    example_opts: ClassVar[dict[str, Any]] = dict(phm_dim=4, rank=2)

    phm_dim: int = 4
    rank: int = 1
    phm_init_range: float = 0.01
    shared_slow_weights: bool = True
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> CompacterAdapter:
        out_f, in_f = W0.shape
        n, r = self.phm_dim, self.rank
        if n < 1 or out_f % n or in_f % n:
            raise ctx.error(f"Compacter phm_dim {n} must divide both sides", tuple(W0.shape))
        check_rank(r, W0, ctx, "Compacter", limit=min(out_f, in_f) // n)

        def make_rule(g: torch.Generator) -> nn.Parameter:
            A = torch.randn(n, n, n, generator=g) * self.phm_init_range
            return nn.Parameter(A.to(W0.device))

        g = ctx.generator()
        created: list[bool] = []

        def first_rule(key: str) -> nn.Parameter:
            created.append(True)
            return make_rule(seeded_generator(ctx.shared.key_seed(key)))

        if self.shared_slow_weights:
            key = f"compacter.phm_rule.{n}"
            rule = ctx.shared.group(key, lambda: first_rule(key))
        else:
            created.append(True)
            rule = make_rule(g)
        t = glorot_uniform((n, in_f // n, r), g).to(W0.device)
        s = torch.zeros(n, out_f // n, r, device=W0.device)
        return CompacterAdapter(rule, bool(created), s, t)
