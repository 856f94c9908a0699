"""Wanda: pruning by weights and activations.

Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024.
For a layer with inputs ``X`` [tokens, in] the score of a weight is its magnitude times the norm of the input
feature it multiplies,

    S_ij = |W_ij| · ‖X_j‖₂                                                    (eq. 1)

and the lowest scores are removed **per output row** (each output's comparison group, Sec. 3), or per M-group
for N:M. No weight is updated, so one forward pass of calibration data is the whole cost.
"""

from __future__ import annotations

from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, StatsSpec
from ._sparse import PruneConfig, check_scope


def wanda_score(W: Tensor, norms: Tensor) -> Tensor:
    """``|W_ij| · ‖X_j‖₂`` for ``W`` [out, in] and the per-input-channel norms [in]."""
    return W.abs() * norms.to(W.device, W.dtype).unsqueeze(0)


@register_config("wanda", kind="compress")
class Wanda(PruneConfig):
    """Wanda (``sparsity`` or ``n:m``; ``prune_scope``: "row", the paper's, or "layer")."""

    calibrated = True
    prune_scope: str = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.prune_scope, "wanda")

    def scope(self) -> str:
        return self.prune_scope

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=False, channels=True)

    def score(self, W: Tensor, stats: InputStats | None) -> Tensor:
        if stats is None:
            raise WeightsmithError("wanda needs calibration statistics (pass calib=)")
        return wanda_score(W, stats.norms())
