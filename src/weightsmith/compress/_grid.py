"""The integer grid every weight quantiser here lands on: ``Ŵ = s · (q − z)`` per row and group.

``q`` are unsigned codes in ``[0, 2^b − 1]``; ``s`` (scale) and ``z`` (zero point) are per output row and
per group of ``group_size`` consecutive input columns (``group_size = 0``: one group per row, i.e.
per-channel). Symmetric grids fix ``z = 2^(b−1)`` and ``s = max|w| / ((2^b − 1) / 2)`` (the convention of
compressed-tensors' min-max observer); asymmetric grids take ``s = (max − min) / (2^b − 1)`` and
``z = round(−min / s)`` over the group range extended to include 0 ("Quantizing deep convolutional networks
for efficient inference", Krishnamoorthi, 2018, eq. 2-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WeightsmithError


@dataclass
class QuantizedWeight:
    """Codes ``q`` [out, in] (uint8), ``scale`` and ``zero`` [out, groups] (float32), ``Ŵ = s (q − z)``."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int  # 0: per-channel
    symmetric: bool

    def dequantize(self) -> Tensor:
        out_f, in_f = self.q.shape
        g = self.group_size or in_f
        q = self.q.float().view(out_f, in_f // g, g)
        return ((q - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)).view(out_f, in_f)

    @property
    def integer_zero(self) -> bool:
        return bool(torch.equal(self.zero, self.zero.round()))


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def check_bits(bits: int, option: str = "--bits") -> None:
    if not 2 <= int(bits) <= 8:
        raise WeightsmithError(f"{option} {bits}: weight quantisation supports 2 to 8 bits")


def grouped(W: Tensor, group_size: int) -> Tensor:
    """``W`` [out, in] as [out, groups, group_size] (``group_size = 0``: one group of ``in``)."""
    out_f, in_f = W.shape
    g = group_size or in_f
    if in_f % g:
        raise WeightsmithError(f"group size {g} does not divide the input size {in_f}")
    return W.reshape(out_f, in_f // g, g)


def minmax_params(Wg: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [..., groups] from the range of each group of ``Wg`` [..., groups, g]."""
    hi = Wg.amax(-1).clamp_min(0)
    lo = Wg.amin(-1).clamp_max(0)
    if symmetric:
        scale = torch.maximum(hi, -lo) / (qmax(bits) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    scale = (hi - lo) / qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (-lo / scale).round().clamp(0, qmax(bits))
    return scale, zero


def codes(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / s + z), 0, 2^b − 1) for ``Wg`` [..., groups, g] (float; ``z`` may be real)."""
    return (Wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, qmax(bits))


def fake_quant(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """s (q − z): the grid value nearest to each weight of ``Wg`` [..., groups, g]."""
    return (codes(Wg, scale, zero, bits) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def quantize_rtn(W: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of every group."""
    Wg = grouped(W.float(), group_size)
    scale, zero = minmax_params(Wg, bits, symmetric)
    q = codes(Wg, scale, zero, bits).reshape(W.shape)
    return QuantizedWeight(q.to(torch.uint8), scale, zero, bits, group_size, symmetric)
