"""PST: a sparsity mask from data-free and data-driven importance, the data-driven part kept low-rank and
structured.

Li, Luo, Tan, Wang, Huang, Li & Bai, "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning",
IJCAI 2022. The importance of every weight is the sum of a data-free part, its magnitude, and a data-driven
part, the first-order (movement) score ``−Σ_t g_t ⊙ W`` of the loss gradients ``g``; the paper observes that
the data-driven matrix is nearly low-rank and structured and parameterises it with a low-rank product plus a
row and a column vector:

    S = |W| + (A B + R 1ᵀ + 1 Cᵀ),    A [out, r], B [r, in], R [out], C [in];    M = Top_v(S)

so only ``(out + in)(r + 1)`` importance parameters exist per matrix. In the paper they are learned during
fine-tuning, with straight-through gradients through the Top-v mask, next to a LoRA-style low-rank weight
update: that is the ``pst`` **adapter** (``weightsmith.adapters.pst_adapter``; run it with
``weightsmith adapt ... --method pst --opt sparsity=0.5``, then ``weightsmith export RUN --format merged``
writes the pruned model, the LoRA update merged before pruning).

What is implemented here (the one-shot importance, no training): the data-driven score ``Z = −Σ_b g_b ⊙ W`` is
gathered over the calibration batches (gradients as FWSVD gathers them; ``labels = input_ids`` for a causal
LM, or the batches' own ``labels`` for a classifier), and the factors are its least-squares fit: ``C`` the
column means, ``R`` the row means less the grand mean, ``A B`` the rank-``rank`` truncated SVD of the
double-centred rest. Each part is scaled to mean absolute value 1 per layer before the sum (``alpha`` weighs
the data-driven part, ``structured=false`` drops ``R`` and ``C``). The factors are not learned and the weights
are not fine-tuned: this is PST's importance and mask without its fine-tuning (the adapter learns them). On
SmolLM2 the one-shot mask is destructive at any ``alpha`` tried (the movement score is spiky and its low-rank
fit spreads the spikes over whole rows and columns; docs/compress-pruning-2.md), so use it with care.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import Layer
from ..linalg import truncated_svd
from ._core import CompressReport, PlanJob
from ._sparse import PruneConfig, check_scope, layer_gradients, prune_by_scores


def pst_factors(Z: Tensor, rank: int, structured: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Least-squares ``A`` [out, r], ``B`` [r, in], ``R`` [out], ``C`` [in] with ``Z ≈ A B + R 1ᵀ + 1 Cᵀ``."""
    Z = Z.float()
    if structured:
        C = Z.mean(0)
        R = Z.mean(1) - Z.mean()
    else:
        C, R = Z.new_zeros(Z.shape[1]), Z.new_zeros(Z.shape[0])
    rest = Z - R.unsqueeze(1) - C.unsqueeze(0)
    if rank == 0:
        return Z.new_zeros(Z.shape[0], 0), Z.new_zeros(0, Z.shape[1]), R, C
    U, s, Vh = truncated_svd(rest, min(rank, *Z.shape))
    return U * s, Vh, R, C


def _unit(x: Tensor) -> Tensor:
    return x / x.abs().mean().clamp_min(1e-30)


def pst_importance(W: Tensor, Z: Tensor, rank: int, alpha: float = 1.0, structured: bool = True) -> Tensor:
    """``|W| / mean|W| + α Ẑ / mean|Ẑ|``, ``Ẑ = A B + R 1ᵀ + 1 Cᵀ`` fitted to the movement score ``Z``."""
    A, B, R, C = pst_factors(Z, rank, structured)
    fitted = A @ B + R.unsqueeze(1) + C.unsqueeze(0)
    return _unit(W.abs().float()) + alpha * _unit(fitted)


def movement_scores(model: nn.Module, layers: Sequence[Layer], batches: Sequence[Any]) -> dict[str, Tensor]:
    """``Z = −Σ_b g_b ⊙ W`` of every layer over the calibration batches."""
    acc = {ly.name: torch.zeros(ly.shape) for ly in layers}

    def each(ly: Layer, g: Tensor) -> None:
        acc[ly.name] -= (g * ly.weight().detach().float()).cpu()

    layer_gradients(model, layers, batches, each)
    return acc


@register_config("pst", kind="compress")
class PST(PruneConfig):
    """PST's one-shot importance and mask (``sparsity`` or ``n:m``; ``rank`` of the low-rank part; ``alpha``:
    weight of the data-driven part; ``structured``: with the row and column vectors; ``prune_scope``: layer
    or row)."""

    calibrated = True
    rank: int = 8
    alpha: float = 1.0
    structured: bool = True
    prune_scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.prune_scope, "pst")
        if self.rank < 0:
            raise WeightsmithError(f"pst option rank={self.rank}: must be >= 0")
        if not self.alpha >= 0:
            raise WeightsmithError(f"pst option alpha={self.alpha}: must be >= 0")

    def plan(self, job: PlanJob) -> CompressReport:
        model, layers, calib = job.model, job.layers, job.calib
        if not calib:
            raise WeightsmithError("'pst' needs calibration data (gradients of the loss): pass calib=")
        Z = movement_scores(model, layers, calib)
        scores = {
            ly.name: pst_importance(ly.weight().detach().float().cpu(), Z[ly.name], self.rank, self.alpha,
                                    self.structured)
            for ly in layers
        }  # fmt: skip
        return prune_by_scores(self, layers, scores, self.prune_scope)
