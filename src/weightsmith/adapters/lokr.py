"""LoKr: the update as one Kronecker product of a small and a (possibly low-rank) larger factor.

Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022, arXiv:2212.10650
(eq. 4), in the LyCORIS form (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", ICLR 2024) that PEFT implements:

    ΔW = s · W1 ⊗ W2,   W1 [a, c],  W2 [b, d],   out = a·b,  in = c·d,   s = alpha / r

``(a, b)`` and ``(c, d)`` factor ``out`` and ``in``: with ``decompose_factor = f > 0`` dividing the
size, ``(f, size / f)``; otherwise the divisor pair closest to a square among divisors ``≤ f`` (``f = -1``:
no bound), smaller first. ``W2 = W2a W2b`` (rank r) when ``r < max(b, d) / 2``, and with
``decompose_both`` also ``W1 = W1a W1b`` when ``r < max(a, c) / 2``; else they are full matrices.
Initialisation (PEFT's): ``W1`` (or ``W1a``) zero, the other factors Kaiming-uniform, so ``ΔW = 0``.

Fast path: ``(W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ)`` for ``x`` viewed as ``X`` [c, d] (row-major), so the
forward pass costs ``tokens · (a·c·d + a·b·d)`` instead of a dense ``out × in`` product
(Van Loan, "The ubiquitous Kronecker product", 2000).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import Adapter, AdapterConfig, AdapterContext, check_dropouts, load_peft_tensors, pattern_value
from .loha import kaiming


def factor_pair(size: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = size``: ``(factor, size // factor)`` if ``factor > 0`` divides ``size``,
    else the pair with the smallest ``m + n`` among divisors ``m ≤ factor`` (any for -1; only 1 for
    other values ≤ 0), smaller first. The same pairs as PEFT's ``factorization``."""
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    bound = size if factor == -1 else max(factor, 1)
    best = min((m + size // m, m) for m in range(1, min(bound, size) + 1) if size % m == 0)[1]
    return min(best, size // best), max(best, size // best)


@dataclass(frozen=True)
class KronShapes:
    """``W1`` [a, c], ``W2`` [b, d] and whether each is a low-rank product."""

    a: int
    b: int
    c: int
    d: int
    w1_low_rank: bool
    w2_low_rank: bool


def kron_shapes(out_f: int, in_f: int, rank: int, factor: int, decompose_both: bool) -> KronShapes:
    a, b = factor_pair(out_f, factor)
    c, d = factor_pair(in_f, factor)
    return KronShapes(a, b, c, d, decompose_both and rank < max(a, c) / 2, rank < max(b, d) / 2)


class LoKrAdapter(Adapter):
    """W1: ``lokr_w1`` [a, c] or ``lokr_w1_a`` [a, r] @ ``lokr_w1_b`` [r, c]; W2 likewise (``lokr_w2``...)."""

    def __init__(self, shapes: KronShapes, tensors: dict[str, Tensor], scaling: float) -> None:
        super().__init__()
        self.shapes = shapes
        self.scaling = scaling
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t))
        self.peft_names = {n: n for n in tensors}

    def w1(self) -> Tensor:
        if self.shapes.w1_low_rank:
            return self.get_parameter("lokr_w1_a") @ self.get_parameter("lokr_w1_b")
        return self.get_parameter("lokr_w1")

    def w2(self) -> Tensor:
        if self.shapes.w2_low_rank:
            return self.get_parameter("lokr_w2_a") @ self.get_parameter("lokr_w2_b")
        return self.get_parameter("lokr_w2")

    def delta(self, W0: Tensor) -> Tensor:
        return torch.kron(self.w1(), self.w2()) * self.scaling

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        s = self.shapes
        w1, w2 = self.w1().to(x.dtype), self.w2().to(x.dtype)
        X = x.reshape(*x.shape[:-1], s.c, s.d)
        Y = torch.matmul(torch.matmul(w1, X), w2.T)  # [..., a, b]
        return base_out + Y.reshape(base_out.shape) * self.scaling

    def peft_state(self) -> dict[str, Tensor]:
        return {k: self.get_parameter(a).detach() for k, a in self.peft_names.items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, self.peft_names)


@register_config("lokr", kind="adapter")
class LoKr(AdapterConfig):
    """``rank`` r of the low-rank factors; scaling ``alpha / r``; ``decompose_factor`` f and
    ``decompose_both`` choose the Kronecker shapes as PEFT does (PEFT defaults: r=8, alpha=8, f=-1)."""

    peft_type: ClassVar[str | None] = "LOKR"
    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=2, alpha=4.0, decompose_both=True)

    rank: int = 8
    alpha: float = 8.0
    decompose_factor: int = -1
    decompose_both: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise WeightsmithError(f"LoKr rank must be at least 1, got {self.rank}")

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoKrAdapter:
        out_f, in_f = W0.shape
        s = kron_shapes(out_f, in_f, self.rank, self.decompose_factor, self.decompose_both)
        g, r = ctx.generator(), self.rank
        t: dict[str, Tensor] = {}
        if s.w1_low_rank:
            t["lokr_w1_a"], t["lokr_w1_b"] = torch.zeros(s.a, r), kaiming(r, s.c, g)
        else:
            t["lokr_w1"] = torch.zeros(s.a, s.c)
        if s.w2_low_rank:
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(s.b, r, g), kaiming(r, s.d, g)
        else:
            t["lokr_w2"] = kaiming(s.b, s.d, g)
        return LoKrAdapter(s, {k: v.to(W0.device) for k, v in t.items()}, self.alpha / r)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> LoKr:
        check_dropouts(peft_config, ("rank_dropout", "module_dropout"), "LoKr")
        # rank_dropout_scale only matters with rank_dropout during training; use_effective_conv2d
        # only for convolutions, which weightsmith does not adapt.
        return cls(
            rank=int(pattern_value(peft_config, "rank_pattern", module, peft_config.get("r", 8))),
            alpha=float(pattern_value(peft_config, "alpha_pattern", module, peft_config.get("alpha", 8))),
            decompose_factor=int(peft_config.get("decompose_factor", -1)),
            decompose_both=bool(peft_config.get("decompose_both", False)),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "LOKR",
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "rank_dropout_scale": False,
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "use_effective_conv2d": False,
            "init_weights": True,
        }
