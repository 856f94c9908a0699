"""Truncated SVD: the data-free low-rank baseline, with a global rank allocation for a parameter budget.

``Ŵ = U_r Σ_r V_rᵀ`` is the best rank-``r`` approximation in Frobenius (and spectral) norm, with error
``‖W − Ŵ‖_F² = Σ_{k>r} σ_k²`` ("The approximation of one matrix by another of lower rank", Eckart & Young,
1936). Ranks are chosen per layer by :func:`~weightsmith.compress._lowrank.allocate_ranks` (singular-value
energy per parameter over all layers) or uniformly; run it with ``compress()`` or
:func:`~weightsmith.compress._lowrank.compress_lowrank`.
"""

from __future__ import annotations

from ..config import register_config
from ._lowrank import LowRankConfig


@register_config("svd", kind="compress")
class SVD(LowRankConfig):
    """Truncated SVD (``keep``: parameter fraction; ``allocation``: global or uniform; ``rank``: fixed)."""
