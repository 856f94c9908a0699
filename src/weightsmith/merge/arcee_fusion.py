"""Arcee Fusion (mergekit's ``arcee_fusion``; Arcee AI, 2025).

Keep the other model's change only where it matters most. With delta = theta_1 - theta_0 and row-wise
distributions P = softmax(theta_1) + 1e-8, Q = softmax(theta_0) + 1e-8 (over the last axis),

    importance = |delta| * KL(P || Q),     tau = median + 1.5 (q3 - q1)   (Tukey's upper fence),

and theta = theta_0 + delta * [importance >= tau]. The quartiles are order statistics at
floor(q (n - 1)) of the sorted importances; above one million entries they come from a sample of one
million positions drawn with replacement from ``generator`` (as mergekit approximates them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import register_config
from ._tensorwise import Gen, OnBaseMethod, work_dtype

QUANTILE_SAMPLE = 1_000_000


def importance(theta: Tensor, base: Tensor) -> Tensor:
    """|theta - base| times the row-wise KL divergence of softmax(theta) from softmax(base)."""
    p = F.softmax(theta, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def upper_fence(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """median + 1.5 IQR of ``scores`` from order statistics (sampled above :data:`QUANTILE_SAMPLE`)."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        idx = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)
        flat = flat[idx]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, med, q3 = ordered[at]
    return med + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, other: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion of one tensor (see the module docstring)."""
    dt = work_dtype(base)
    b, t = base.to(dt), other.to(dt)
    score = importance(t, b)
    mask = (score >= upper_fence(score, generator)).to(dt)
    return b + (t - b) * mask


@register_config("arcee_fusion", kind="merge")
class ArceeFusion(OnBaseMethod):
    """Arcee Fusion of the base and one other model; ``seed`` drives the quartile sample of large tensors."""

    seed: int = 0

    min_models = 1
    max_models = 1
    random = True

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return arcee_fusion(base, thetas[0], gen)
