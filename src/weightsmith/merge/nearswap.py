"""NearSwap (mergekit's ``nearswap``; alchemonaut, "QuartetAnemoi-70B-t0.0001", 2024).

Take the other model's value only where it is close to the base's: with a = theta_0 and b = theta_1,

    w = clamp(t / max(|a - b|, 1e-6), 0, 1),    theta = w * b + (1 - w) * a,

so entries that differ by at most ``t`` are swapped fully, larger differences proportionally less.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, OnBaseMethod, work_dtype


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """NearSwap of one tensor: ``other`` where it lies within ``t`` of ``base``, blended beyond."""
    dt = work_dtype(base)
    a, b = base.to(dt), other.to(dt)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


@register_config("nearswap", kind="merge")
class NearSwap(OnBaseMethod):
    """NearSwap of the base and one other model with closeness threshold ``t`` (> 0)."""

    t: float = 0.0001

    min_models = 1
    max_models = 1

    def __post_init__(self) -> None:
        if not self.t >= 0:
            raise WeightsmithError(f"nearswap option t={self.t}: the threshold must be >= 0")

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return nearswap(base, thetas[0], self.t)
