"""Reinforced Agent Merging (mergekit's ``ram`` and ``ramplus_tl``; arXiv:2601.13572).

Per entry of one weight, with task vectors delta_i = theta_i - theta_0 and the active set
A_i = {|delta_i| > epsilon}, let c = sum_i [A_i] be the number of models that change the entry.
An entry changed by one model only (c = 1, "unique") takes that change in full; an entry changed by
several (c > 1, "shared") takes their mean over the c contributors; inactive entries stay at theta_0:

    theta = theta_0 + sum_i [A_i] delta_i ([c = 1] lambda_i + [c > 1] / c).

``ram`` uses lambda_i = 1. ``ramplus_tl`` (tensor-local RAM+) boosts each model's unique entries by
lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = |A_i and shared| / max(|A_i and unique|, epsilon):
models whose changes are mostly shared, and so diluted by averaging, get their unique changes amplified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, OnBaseMethod, stack_deltas


def ram(
    base: Tensor, thetas: Sequence[Tensor], epsilon: float = 1e-5, plus: tuple[float, float] | None = None
) -> Tensor:
    """RAM of one tensor; ``plus=(r, alpha)`` gives RAM+ (tensor-local) instead."""
    b, deltas = stack_deltas(base, thetas)
    if len(thetas) == 0:
        return b
    flat = deltas.reshape(len(thetas), -1)
    active = flat.abs() > epsilon
    count = active.sum(dim=0, keepdim=True)
    shared, unique = count > 1, count == 1
    z = flat * active
    boost = torch.ones(len(thetas), 1, dtype=flat.dtype, device=flat.device)
    if plus is not None:
        r, alpha = plus
        n_shared = (active & shared).sum(dim=1).to(flat.dtype)
        n_unique = (active & unique).sum(dim=1).to(flat.dtype)
        rho = n_shared / n_unique.clamp(min=epsilon)
        boost = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (z * unique * boost + z * shared / count.clamp(min=1)).sum(dim=0)
    return b + merged.reshape(b.shape)


def _check_eps(name: str, epsilon: float) -> None:
    if not epsilon >= 0:
        raise WeightsmithError(f"{name} option epsilon={epsilon}: the activity threshold must be >= 0")


@register_config("ram", kind="merge")
class RAM(OnBaseMethod):
    """RAM: unique changes in full, shared changes averaged over their contributors."""

    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _check_eps(self.name, self.epsilon)

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return ram(base, thetas, self.epsilon)


@register_config("ramplus_tl", kind="merge")
class RAMPlusTL(OnBaseMethod):
    """RAM+ (tensor-local): RAM with each model's unique changes boosted by 1 + r clamp(rho, 0, alpha)."""

    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _check_eps(self.name, self.epsilon)

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return ram(base, thetas, self.epsilon, (self.r, self.alpha))
