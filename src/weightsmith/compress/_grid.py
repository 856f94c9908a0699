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
    """Codes ``q`` [out, in] (uint8), ``scale`` and ``zero`` [out, groups] (float32), ``Ŵ = s (q − z)``.

    Any leading dims are carried through (a stack ``[L, out, in]`` of same-shaped weights, see
    :func:`quantize_rtn`); :meth:`split` cuts such a stack into one result a weight."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int  # 0: per-channel
    symmetric: bool

    def dequantize(self) -> Tensor:
        *lead, out_f, in_f = self.q.shape
        g = self.group_size or in_f
        q = self.q.to(torch.float32, copy=True).view(*lead, out_f, in_f // g, g)  # new: in place below
        return q.sub_(self.zero.unsqueeze(-1)).mul_(self.scale.unsqueeze(-1)).view(*lead, out_f, in_f)

    def split(self) -> list[QuantizedWeight]:
        """One result per weight of a stacked ``q`` [L, out, in]: the codes are views of the stack (every
        format packs them anew), the scales and zeros are copied so that each owns its storage (a checkpoint
        writer refuses tensors that share memory)."""
        keep = (self.bits, self.group_size, self.symmetric)
        parts = zip(self.q, self.scale, self.zero, strict=True)
        return [QuantizedWeight(q, s.clone(), z.clone(), *keep) for q, s, z in parts]

    @property
    def integer_zero(self) -> bool:
        return bool(torch.equal(self.zero, self.zero.round()))


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def check_bits(bits: int, option: str = "--bits") -> None:
    if not 2 <= int(bits) <= 8:
        raise WeightsmithError(f"{option} {bits}: weight quantisation supports 2 to 8 bits")


def grouped(W: Tensor, group_size: int) -> Tensor:
    """``W`` [..., out, in] as [..., out, groups, group_size] (``group_size = 0``: one group of ``in``)."""
    *lead, out_f, in_f = W.shape
    g = group_size or in_f
    if in_f % g:
        raise WeightsmithError(f"group size {g} does not divide the input size {in_f}")
    return W.reshape(*lead, out_f, in_f // g, g)


def minmax_params(Wg: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [..., groups] from the range of each group of ``Wg`` [..., groups, g]."""
    # min and max are exact, so both ways give the same values: one pass on CUDA; on the CPU, where aminmax
    # is not vectorised (about 7 times slower than amax + amin on one thread), two
    lo, hi = torch.aminmax(Wg, dim=-1) if Wg.is_cuda else (Wg.amin(-1), Wg.amax(-1))
    hi, lo = hi.clamp_min(0), lo.clamp_max(0)
    if symmetric:
        scale = torch.maximum(hi, -lo) / (qmax(bits) / 2)
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero group: any scale; 1 (NaN too)
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    scale = (hi - lo) / qmax(bits)
    scale = torch.where(scale > 0, scale, 1.0)
    zero = (-lo / scale).round().clamp(0, qmax(bits))
    return scale, zero


def codes(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / s + z), 0, 2^b − 1) for ``Wg`` [..., groups, g] (float; ``z`` may be real)."""
    c = Wg / scale.unsqueeze(-1)
    return c.add_(zero.unsqueeze(-1)).round_().clamp_(0, qmax(bits))  # in place: the same roundings


def fake_quant(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """s (q − z): the grid value nearest to each weight of ``Wg`` [..., groups, g]."""
    return codes(Wg, scale, zero, bits).sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))


def quantize_rtn(W: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of every group of ``W`` [..., out, in]."""
    return rtn_with_dequant(W, bits, group_size, symmetric, dequant=False)[0]


def rtn_with_dequant(
    W: Tensor, bits: int, group_size: int, symmetric: bool, dequant: bool = True
) -> tuple[QuantizedWeight, Tensor | None]:
    """:func:`quantize_rtn` and, if ``dequant``, ``Ŵ = s (q − z)`` [..., out, in] in float32 taken from the
    float codes before they become uint8 (bit-identical to :meth:`QuantizedWeight.dequantize`: the codes are
    small integers, exact in both types; it saves a uint8 → float32 pass)."""
    Wg = grouped(W.float(), group_size)
    scale, zero = minmax_params(Wg, bits, symmetric)
    c = codes(Wg, scale, zero, bits)
    qw = QuantizedWeight(c.to(torch.uint8).reshape(W.shape), scale, zero, bits, group_size, symmetric)
    if not dequant:
        return qw, None
    return qw, c.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).reshape(W.shape)
