"""APOLLO against the official apollo-torch 1.0.3 on the same parameters, gradients and random projections."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from weightsmith.optim import TransformOptimizer
from weightsmith.optim.apollo import ChannelScale

torch.set_num_threads(1)
apollo_torch = pytest.importorskip("apollo_torch")

SHAPES = [(24, 16), (12, 30)]  # a right (m >= n) and a left projection


@dataclass(frozen=True)
class TheirProjection:
    """Reads the projection apollo-torch just drew for the weight of the same shape (it steps first)."""

    ref: Any
    params: Any
    name: str = "theirs"

    def refresh(self, G: torch.Tensor, side: str, rank: int, state: dict, seed: int) -> None:
        p = next(p for p in self.params if p.shape == G.shape)
        state["P"] = self.ref.state[p]["projector"].ortho_matrix.clone()

    def matrix(self, state: dict, side: str) -> torch.Tensor:
        return state["P"]


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_matches_apollo_torch(scale_type):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    group = {"params": a, "rank": 3, "update_proj_gap": 2, "scale": 4.0, "proj": "random", "proj_type": "std",
             "scale_type": scale_type}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = apollo_torch.APOLLOAdamW([group], lr=1e-2)
    # the official code multiplies by sqrt(scale): our alpha is sqrt(4) = 2
    t = ChannelScale(rank=3, update_proj_gap=2, scale=math.sqrt(4.0), scale_type=scale_type,
                     projector=TheirProjection(ref, a))  # fmt: skip
    ours = TransformOptimizer(b, t, lr=1e-2)
    for step in range(6):  # refreshes at steps 0, 2 and 4; growing gradients exercise the norm-growth limiter
        for x, y in zip(a, b, strict=True):
            g = torch.randn_like(x) * (1 + step)
            x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for x, y, x0 in zip(a, b, init, strict=True):
        assert float((x.detach() - x0).abs().max()) > 1e-3
        assert float((x.detach() - y.detach()).abs().max()) <= 1e-5
