"""Magnitude pruning: drop the weights of smallest absolute value.

The data-free baseline of "Learning both Weights and Connections for Efficient Neural Networks" (Han et al.,
2015): score ``S_ij = |W_ij|``, pruned within the whole matrix (``prune_scope="layer"``, the baseline of
Wanda's Table 2) or within each output row (``prune_scope="row"``), or N:M (keep the N largest of every M
consecutive input weights of a row).
"""

from __future__ import annotations

from torch import Tensor

from ..config import register_config
from ..layers import InputStats
from ._sparse import PruneConfig, check_scope


@register_config("magnitude", kind="compress")
class Magnitude(PruneConfig):
    """Magnitude pruning (``sparsity`` or ``n:m``; ``prune_scope``: "layer" or "row" comparison group)."""

    prune_scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.prune_scope, "magnitude")

    def scope(self) -> str:
        return self.prune_scope

    def score(self, W: Tensor, stats: InputStats | None) -> Tensor:
        return W.abs()
