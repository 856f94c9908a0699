"""Monarch projection as a compression: each dense weight replaced by the nearest Monarch matrix.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra & Ré, "Monarch: Expressive Structured Matrices for
Efficient and Accurate Training", ICML 2022 (arXiv 2204.00595), Sec. 3.3 and the dense-to-sparse (D2S)
fine-tuning of Sec. 5.3: a dense ``W`` is projected onto Monarch matrices ``M = P_2 L P_1 R`` (``R``, ``L``
block-diagonal with ``nblocks`` blocks) by

    M* = argmin_M ‖W − M‖_F,

whose analytic solution splits ``W`` (after the permutations) into ``nblocks × nblocks`` independent blocks
of size ``[out / nblocks, in / nblocks]`` and keeps the best rank-``block_rank`` approximation of each
(the projection lives in :func:`weightsmith.adapters.monarch.monarch_project`; b = 1 is the paper's
Monarch). The factors hold ``b · nblocks · (out + in)`` numbers, as many as a rank ``b · nblocks``
truncated SVD, but the product can have rank up to ``b · nblocks²``.

``--format weightsmith`` stores the two block-diagonal factors of every layer as ``P.R`` [k, b l, p] and
``P.L`` [l, s, k b] (the permutations ``P_1``, ``P_2`` are fixed by this layout and not stored), with
each layer's ``[nblocks, block_rank]`` in ``compression.json``; :func:`monarch_linears` rebuilds a
:class:`MonarchLinear` per layer, which multiplies by the factors and never forms ``M``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..adapters.monarch import monarch_dense, monarch_multiply, monarch_project
from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer
from ._lowrank import FactoredConfig, check_at_least, swap_linears


@dataclass
class MonarchWeight:
    """``M = P_2 L P_1 R`` with ``R`` [k, b l, p] and ``L`` [l, s, k b] (``adapters/monarch.py``'s layout)."""

    R: Tensor
    L: Tensor

    def dequantize(self) -> Tensor:
        return monarch_dense(self.R, self.L)

    @property
    def params(self) -> int:
        return self.R.numel() + self.L.numel()

    @property
    def layout(self) -> list[int]:
        """``[nblocks, block_rank]``: what :func:`monarch_linears` needs to rebuild the layer."""
        nb = int(self.R.shape[0])
        return [nb, int(self.R.shape[1]) // nb]


def monarch_params(shape: tuple[int, int], nblocks: int, block_rank: int) -> int:
    """Numbers stored by the Monarch factors of an ``[out, in]`` weight: ``b · nblocks · (out + in)``."""
    return block_rank * nblocks * (shape[0] + shape[1])


@register_config("monarch", kind="compress")
class MonarchCompress(FactoredConfig):
    """Nearest Monarch matrix (``nblocks`` blocks per factor, dividing both sides of every weight;
    ``block_rank`` b, the rank of each of the ``nblocks²`` blocks). Data-free."""

    verb: ClassVar[str] = "projected"
    held: ClassVar[str] = "Monarch factors"
    stored_as: ClassVar[str] = "the two block-diagonal factors of every layer"
    dense_as: ClassVar[str] = "the projected dense weights"
    nblocks: int = 4
    block_rank: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("monarch", 1, nblocks=self.nblocks, block_rank=self.block_rank)

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Refuse an ``nblocks`` that does not divide a weight, or a ``block_rank`` above the block size."""
        nb, b = self.nblocks, self.block_rank
        for ly in layers:
            out_f, in_f = ly.shape
            if out_f % nb or in_f % nb:
                raise WeightsmithError(
                    f"monarch option nblocks={nb} does not divide both sides of '{ly.name}' {ly.shape}"
                )
            if b > min(out_f, in_f) // nb:
                raise WeightsmithError(
                    f"monarch option block_rank={b} exceeds the {out_f // nb}x{in_f // nb} blocks "
                    f"of '{ly.name}'"
                )

    def quantize(self, W: Tensor, stats: InputStats | None) -> MonarchWeight:  # type: ignore[override]
        R, L = monarch_project(W, self.nblocks, self.block_rank)
        return MonarchWeight(R, L)


class MonarchLinear(nn.Module):
    """``y = x Mᵀ + bias`` with ``M = P_2 L P_1 R`` applied factor by factor (``monarch_multiply``)."""

    def __init__(self, R: Tensor, L: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.R = nn.Parameter(R.detach().clone())
        self.L = nn.Parameter(L.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = monarch_multiply(x, self.R.to(x.dtype), self.L.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def monarch_linears(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap every projected ``nn.Linear`` (by weight name) for a :class:`MonarchLinear`, in place.

    ``spec``: :class:`MonarchWeight` values (the real factors) or ``[nblocks, block_rank]`` lists
    (zero-filled factors of that layout, to load a saved state dict into: ``P.R``, ``P.L``, ``P.bias``)."""

    def make(name: str, lin: nn.Linear, w: Any) -> nn.Module:
        dtype, device = lin.weight.dtype, lin.weight.device
        if isinstance(w, MonarchWeight):
            R, L = w.R, w.L
        else:
            nb, b = (int(v) for v in w)
            out_f, in_f = lin.weight.shape
            if nb < 1 or b < 1 or out_f % nb or in_f % nb:
                raise WeightsmithError(f"'{name}' {(out_f, in_f)}: no Monarch layout nblocks={nb}, b={b}")
            R = torch.zeros(nb, b * nb, in_f // nb)
            L = torch.zeros(nb, out_f // nb, nb * b)
        return MonarchLinear(R.to(device, dtype), L.to(device, dtype), None if lin.bias is None else lin.bias)

    return swap_linears(model, spec, make, "hold Monarch factors")


def monarch_tensors(path: str, w: MonarchWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """The weightsmith-format tensors of one projected layer (module ``path``): ``P.R`` and ``P.L``."""
    return {f"{path}.R": w.R.cpu().to(dtype).contiguous(), f"{path}.L": w.L.cpu().to(dtype).contiguous()}
