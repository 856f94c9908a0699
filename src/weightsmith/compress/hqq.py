"""HQQ: data-free half-quadratic optimisation of the zero point with a sparsity-promoting loss.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023. With the scale ``s``
of the min-max grid fixed, HQQ minimises ``‖W − s (Q(W/s + z) − z)‖_p^p`` with ``p < 1`` (outlier errors
cost little, so the bulk of the weights is fitted well). Splitting the error off as ``W_e`` and
alternating (half-quadratic splitting, ``β`` growing by ``κ`` each step):

    W_q = clamp(round(W / s + z))                                   (codes)
    W_e = shrink_p(W − s (W_q − z), β),  shrink_p(x, β) = sign(x) · relu(|x| − |x|^(p−1) / β)
    z   = mean_group(W_q − (W − W_e) / s)                           (closed form)

and it stops when the reconstruction error stops falling. A fractional ``z`` is what the paper keeps; the
compressed-tensors format needs an integer one, so with ``integer_zero`` (the default) ``z`` is rounded at
the end and each group's scale is refitted by least squares, ``s = ⟨W, q − z⟩ / ‖q − z‖²``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats
from ._core import CompressConfig
from ._grid import QuantizedWeight, codes, grouped, minmax_params, qmax


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft-threshold, the proximal step of β/2‖x − y‖² + ‖y‖_p^p (HQQ, eq. 5)."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


@register_config("hqq", kind="compress")
class HQQ(CompressConfig):
    """Half-quadratic zero-point optimisation (``p``-norm, ``beta`` growing by ``kappa``, ``iters`` steps)."""

    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    integer_zero: bool = True
    symmetric: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.p <= 1:
            raise WeightsmithError(f"hqq option p={self.p}: use 0 < p <= 1")
        if self.symmetric:
            raise WeightsmithError("hqq optimises the zero point; it has no symmetric form (drop symmetric)")

    def quantize(self, W: Tensor, stats: InputStats | None) -> QuantizedWeight:
        Wg = grouped(W.float(), self.group_size)
        scale, zero = minmax_params(Wg, self.bits, symmetric=False)
        s = scale.unsqueeze(-1)
        beta, best_err, best_zero = self.beta, float("inf"), zero
        for _ in range(self.iters):
            Wq = codes(Wg, scale, zero, self.bits)
            We = shrink_lp(Wg - s * (Wq - zero.unsqueeze(-1)), beta, self.p)
            zero = (Wq - (Wg - We) / s).mean(-1)
            err = float((Wg - s * (codes(Wg, scale, zero, self.bits) - zero.unsqueeze(-1))).abs().mean())
            if err >= best_err:
                break
            best_err, best_zero = err, zero
            beta *= self.kappa
        zero = best_zero
        if self.integer_zero:
            zero = zero.round().clamp(0, qmax(self.bits))
            for _ in range(2):
                q = codes(Wg, scale, zero, self.bits) - zero.unsqueeze(-1)
                fit = (Wg * q).sum(-1) / q.square().sum(-1).clamp_min(1e-12)
                scale = torch.where(fit > 0, fit, scale)
        q = codes(Wg, scale, zero, self.bits).reshape(W.shape)
        return QuantizedWeight(q.to(torch.uint8), scale, zero, self.bits, self.group_size, False)
