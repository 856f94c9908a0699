"""GradNormLoRP: a low-rank projected update of the weight's direction, a full update of its magnitude.

"Gradient Weight-normalized Low-rank Projection for Efficient LLM Training" (Huang et al., 2024) writes each
weight in weight-normalised form ("Weight Normalization", Salimans & Kingma, 2016), ``W = m * V / ||V||``
row by row (one magnitude per output channel), and projects the direction's gradient to a low-rank subspace
(``D~ = U eta(U^T D V) V^T``, GaLore's projection around an inner optimiser ``eta``).

Here the weight stays an ordinary tensor: at each step it is read as ``V = W`` and ``m = ||W||`` per row, so
``v = W / m``. The gradients of the two parts (Salimans & Kingma, Eq. 3) are

    grad_m = <G_i, v_i>                     (one number per row)
    grad_V = G - grad_m v                   (each row's G with its component along v_i removed)

``grad_V`` goes through the low-rank transform (projected Adam), ``grad_m`` through a full Adam (it is a
vector), and the two updates are recomposed to first order, ``dW = dm v + (dV - <dV_i, v_i> v)``, the tangent
of ``m * V / ||V||`` at ``V = W`` (exact up to O(lr^2); it keeps the learning rate the optimizer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .galore import ProjectedAdamW
from .projection import LowRank
from .transform import ScaleByAdam, State, Transform


@dataclass(frozen=True)
class WeightNormalized:
    """GradNormLoRP's update of a 2-D weight: ``direction`` (a LowRank transform), ``magnitude`` (Adam)."""

    direction: LowRank
    magnitude: ScaleByAdam = ScaleByAdam(eps=1e-6)

    def init(self, param: Tensor, name: str = "") -> State:
        return {"dir": self.direction.init(param, name), "mag": self.magnitude.init(param, name)}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        W, G = param.detach().float(), grad.float()
        m = torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12)
        v = W / m
        g_mag = (G * v).sum(dim=1, keepdim=True)
        g_dir = G - g_mag * v
        d_dir, state["dir"] = self.direction.update(g_dir, state["dir"], param)
        d_mag, state["mag"] = self.magnitude.update(g_mag, state["mag"], param)
        tangent = d_dir - (d_dir * v).sum(dim=1, keepdim=True) * v
        return d_mag * v + tangent, state


class GradNormLoRPAdamW(ProjectedAdamW):
    """GradNormLoRP on the param groups with a ``rank`` (GaLore's group keys), AdamW on the others; decoupled
    weight decay in torch.optim.AdamW's order."""

    def transform_for(self, group: dict[str, Any]) -> Transform:
        b1, b2 = group["betas"]
        adam = ScaleByAdam(b1, b2, group["eps"])
        if "rank" not in group:
            return adam
        return WeightNormalized(self.low_rank(group, adam), adam)
