"""Monarch projection as a compression: each dense weight replaced by the nearest Monarch matrix.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra & Ré, "Monarch: Expressive Structured Matrices for
Efficient and Accurate Training", ICML 2022 (arXiv 2204.00595), Sec. 3.3 and the dense-to-sparse (D2S)
fine-tuning of Sec. 5.3: a dense ``W`` is projected onto Monarch matrices ``M = P_2 L P_1 R`` (``R``, ``L``
block-diagonal with ``nblocks`` blocks) by

    M* = argmin_M ‖W − M‖_F,

whose analytic solution splits ``W`` (after the permutations) into ``nblocks × nblocks`` independent blocks
of size ``[out / nblocks, in / nblocks]`` and keeps the best rank-``block_rank`` approximation of each
(the projection lives in :func:`weightsmith.adapters.monarch.monarch_project`; b = 1 is the paper's
Monarch). The factors hold ``b · nblocks · (out + in)`` numbers, as many as a rank ``b · nblocks``
truncated SVD, but the product can have rank up to ``b · nblocks²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..adapters.monarch import monarch_dense, monarch_project
from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer
from ._core import CompressConfig, CompressReport


@dataclass
class MonarchWeight:
    """``M = P_2 L P_1 R`` with ``R`` [k, b l, p] and ``L`` [l, s, k b] (``adapters/monarch.py``'s layout)."""

    R: Tensor
    L: Tensor

    def dequantize(self) -> Tensor:
        return monarch_dense(self.R, self.L)

    @property
    def params(self) -> int:
        return self.R.numel() + self.L.numel()


def monarch_params(shape: tuple[int, int], nblocks: int, block_rank: int) -> int:
    """Numbers stored by the Monarch factors of an ``[out, in]`` weight: ``b · nblocks · (out + in)``."""
    return block_rank * nblocks * (shape[0] + shape[1])


@register_config("monarch", kind="compress")
class MonarchCompress(CompressConfig):
    """Nearest Monarch matrix (``nblocks`` blocks per factor, dividing both sides of every weight;
    ``block_rank`` b, the rank of each of the ``nblocks²`` blocks). Data-free."""

    default_format: ClassVar[str] = "dense"
    verb: ClassVar[str] = "projected"
    nblocks: int = 4
    block_rank: int = 1
    group_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nblocks < 1:
            raise WeightsmithError(f"monarch option nblocks={self.nblocks}: must be >= 1")
        if self.block_rank < 1:
            raise WeightsmithError(f"monarch option block_rank={self.block_rank}: must be >= 1")

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Refuse an ``nblocks`` that does not divide a weight, or a ``block_rank`` above the block size."""
        nb, b = self.nblocks, self.block_rank
        for ly in layers:
            out_f, in_f = ly.shape
            if out_f % nb or in_f % nb:
                raise WeightsmithError(
                    f"monarch option nblocks={nb} does not divide both sides of '{ly.name}' {ly.shape}"
                )
            if b > min(out_f, in_f) // nb:
                raise WeightsmithError(
                    f"monarch option block_rank={b} exceeds the {out_f // nb}x{in_f // nb} blocks "
                    f"of '{ly.name}'"
                )

    def quantize(self, W: Tensor, stats: InputStats | None) -> MonarchWeight:  # type: ignore[override]
        R, L = monarch_project(W, self.nblocks, self.block_rank)
        return MonarchWeight(R, L)

    def describe(self, report: CompressReport) -> str:
        ws = [w for w in report.weights.values() if isinstance(w, MonarchWeight)]
        dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
        return (
            f"Monarch factors hold {100 * sum(w.params for w in ws) / max(dense, 1):.1f} % of the parameters"
        )

    def check_format(self, fmt: str) -> None:
        if fmt != "dense":
            raise WeightsmithError(
                f"--format {fmt} has no layout for Monarch factors yet; use --format dense (the projected "
                "dense weights)"
            )
