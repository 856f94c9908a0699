"""GPTQ: column-by-column quantisation with second-order error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023. For a layer with inputs ``X`` the loss ``‖WX − ŴX‖²`` has Hessian
``H = 2XXᵀ`` (per row of ``W``). Quantising column ``q`` and updating the not-yet-quantised columns ``F``
optimally (Optimal Brain Surgeon) gives

    δ_F = − (w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}                 (eq. 3)

GPTQ quantises the columns in one fixed order for every row, reads the rows of ``H⁻¹`` it needs from the
upper Cholesky factor of the damped inverse, ``chol((H + λI)⁻¹)ᵀ`` with ``λ = damp · mean diag H``
(Step 3), and applies the updates lazily: within a block of ``block_size`` (128) columns immediately, to the
columns after the block once per block (Step 2). ``act_order`` quantises columns by decreasing ``diag H``;
its group scales are then fixed up front from the unquantised weights ("static groups"), so each group
keeps one scale in storage order and the stored format needs no permutation index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, StatsSpec
from ._core import CompressConfig
from ._grid import QuantizedWeight, grouped, minmax_params, qmax


def inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), ``λ = damp · mean diag H``."""
    H = H.clone()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise WeightsmithError(
            "GPTQ: the damped Hessian is not positive definite; raise the 'damp' option (e.g. --opt damp=0.1)"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 0,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ on one ``[out, in]`` weight with Hessian ``H`` [in, in]; returns codes on a group-wise grid."""
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    g = group_size or in_f
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = in_f // g
    scale = torch.empty(out_f, n_groups, device=W.device)
    zero = torch.empty_like(scale)
    static = act_order or group_size == 0
    if static:  # every group's grid from the unquantised weights
        scale, zero = minmax_params(grouped(W, group_size), bits, symmetric)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    Q = torch.empty_like(W)
    cols = perm.tolist()  # host-side once: reading perm[i] in the loop would sync the GPU every column
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = cols[i1 + i]
            grp = col // g
            if not static and col % g == 0:  # the group's grid from the current (updated) weights
                s, z = minmax_params(
                    W1[:, i : i + g].unsqueeze(1)
                    if i + g <= i2 - i1
                    else torch.cat([W1[:, i:], W[:, i2 : i1 + i + g]], 1).unsqueeze(1),
                    bits,
                    symmetric,
                )
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q = (w / scale[:, grp] + zero[:, grp]).round().clamp(0, qmax(bits))
            Q[:, i1 + i] = q
            wq = (q - zero[:, grp]) * scale[:, grp]
            err = (w - wq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(Q.to(torch.uint8), scale, zero, bits, group_size, symmetric)


@register_config("gptq", kind="compress")
class GPTQ(CompressConfig):
    """GPTQ (``damp``: Hessian dampening as a fraction of mean diag H; ``block_size``; ``act_order``)."""

    calibrated = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise WeightsmithError(f"gptq option damp={self.damp}: must be > 0")
        if self.block_size < 1:
            raise WeightsmithError(f"gptq option block_size={self.block_size}: must be >= 1")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=True, channels=False)

    def quantize(self, W: Tensor, stats: InputStats | None) -> QuantizedWeight:
        if stats is None:
            raise WeightsmithError("gptq needs calibration statistics")
        H = stats.hessian().to(W.device)
        return gptq_quantize(
            W, H, self.bits, self.group_size, self.symmetric, self.damp, self.block_size, self.act_order
        )
