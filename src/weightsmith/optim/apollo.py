"""APOLLO: channel-wise scaling of the full-rank gradient, estimated in a random low-rank space.

"APOLLO: SGD-like Memory, AdamW-level Performance" (Zhu et al., 2024), Algorithm 1: project the gradient with
a seeded random matrix, ``R_t = P_t^T G_t`` (refreshed every T steps); run Adam on R_t to get ``R~_t``; the
channel scaling factor is ``s_j = ||R~_t[:, j]|| / ||R_t[:, j]||`` (one per channel, or one for the whole
tensor in APOLLO-Mini); the update is ``alpha * G_t diag(s)``, the *full-rank* gradient scaled (as the
official code does, ``p.grad`` times the factor), with the norm-growth limiter of Sec. 4:
``if ||u_t|| > gamma ||u_{t-1}||: u_t <- u_t * gamma ||u_{t-1}|| / ||u_t||`` (gamma = 1.01). As in the
official code, the limiter sees the update before Adam's bias correction, which then scales the step.

``scale`` is the paper's alpha (the official code multiplies by ``sqrt(scale)``; pass the square root of its
value to reproduce it). Weights that are not 2-D get plain Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .galore import ProjectedAdamW
from .projection import LowRank
from .projectors import LEFT, Projector, RandomProjection
from .transform import ScaleByAdam, State, Transform


@dataclass(frozen=True)
class ChannelScale:
    """APOLLO's update for one 2-D weight (``scale_type`` "channel" or "tensor")."""

    rank: int = 256
    update_proj_gap: int = 200
    scale: float = 1.0
    scale_type: str = "channel"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    growth_limit: float | None = 1.01
    projector: Projector = RandomProjection("gaussian")
    seed: int = 0

    def _low(self) -> LowRank:
        adam = ScaleByAdam(self.b1, self.b2, self.eps, correct_bias=False)  # corrected after the limiter
        return LowRank(adam, self.projector, self.rank, self.update_proj_gap, 1.0, "std", self.seed)

    def init(self, param: Tensor, name: str = "") -> State:
        if self.scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor' (got '{self.scale_type}')")
        return {"low": self._low().init(param, name), "prev_norm": 0.0}

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        low, st = self._low(), state["low"]
        if st["count"] >= st["next"] or not st["proj"]:
            low._refresh(grad, st)
        R = low.project(grad.float(), st)
        st["count"] += 1
        N, st["inner"] = low.inner.update(R, st["inner"], param)
        if self.scale_type == "tensor":
            s = torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)
        else:  # channels are the dimension that was not projected away
            dim = 0 if LEFT in st["proj"] else 1
            s = torch.linalg.vector_norm(N, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + 1e-8)
            s = s.unsqueeze(0) if dim == 0 else s.unsqueeze(1)
        u = grad.float() * s
        if self.growth_limit is not None:
            norm = float(torch.linalg.vector_norm(u))
            prev = float(state["prev_norm"])
            if prev > 0 and norm > self.growth_limit * prev:
                u = u * (self.growth_limit * prev / norm)
                norm = self.growth_limit * prev
            state["prev_norm"] = norm
        t = st["inner"]["count"]
        return u * (self.scale * math.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t)), state


class APOLLOAdamW(ProjectedAdamW):
    """APOLLO on groups with a ``rank`` (keys ``rank``, ``update_proj_gap``, ``scale``, ``scale_type``);
    plain AdamW on the others. Weight decay is decoupled (torch.optim.AdamW's order)."""

    def transform_for(self, group: dict[str, Any]) -> Transform:
        b1, b2 = group["betas"]
        if "rank" not in group:
            return ScaleByAdam(b1, b2, group["eps"])
        return ChannelScale(
            group["rank"],
            group.get("update_proj_gap", 200),
            group.get("scale", 1.0),
            group.get("scale_type", "channel"),
            b1,
            b2,
            group["eps"],
            seed=self.seed,
        )
