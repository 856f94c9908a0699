"""Rich or lazy? The weight change of a training run: its size, effective rank and alignment.

Kunin, Raventos, Dominé, Chen, Klindt, Saxe & Ganguli, "Get rich quick: exact solutions reveal how
unbalanced initializations promote rapid feature learning", NeurIPS 2024 (arXiv:2406.06158): the same
network learns *lazily* (its weights barely move, training is the linearisation around the
initialisation, the NTK regime of Jacot et al. 2018) or *richly* (the weights travel far from their
initial values and the change concentrates in a few task-aligned directions), depending on the
initialisation's overall scale and on how it is balanced between layers (small or upstream-light
initialisations learn richly). Low-rank initialisations are a third knob.

For each weight matrix, ``Delta W = W_T - W_0`` is summarised by

- ``relative_change = ||Delta W||_F / ||W_0||_F`` (lazy: -> 0, as the width or the scale grows);
- the entropy effective rank of ``Delta W`` (Roy & Vetterli, EUSIPCO 2007) and its share of min(m, n);
- ``init_alignment``: the overlap of the top-k left singular subspaces of ``Delta W`` and ``W_0`` (mean
  squared cosine of the principal angles; about ``k / m`` for unrelated subspaces);
- ``final_alignment``: the same overlap between ``Delta W`` and ``W_T`` (does the change dominate the
  trained weights' top directions?).

``regime`` labels a matrix by the rule stated in ``LAZY_MAX_CHANGE`` / ``RICH_MIN_CHANGE`` /
``RICH_MAX_RANK_SHARE``: *lazy* when it moved less than 10 % of its initial norm, *rich* when it moved at
least half its initial norm in a change whose effective rank is at most half the possible rank (a
Gaussian change has 0.80 of it when square, 0.97 at aspect ratio 4), *intermediate* otherwise;
``run_regime`` applies the same rule to the means over a run's hidden matrices (the output layer, whose
rank is the number of classes, left out). The thresholds are ours: the paper characterises the regimes,
it does not draw these lines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError
from .compare import subspace_overlap
from .spectrum import effective_rank

LAZY_MAX_CHANGE = 0.1
RICH_MIN_CHANGE = 0.5
RICH_MAX_RANK_SHARE = 0.5
DEFAULT_K = 4


@dataclass(frozen=True)
class WeightChange:
    name: str
    relative_change: float
    delta_effective_rank: float
    rank_share: float  # delta_effective_rank / min(m, n)
    init_alignment: float
    final_alignment: float
    regime: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def regime(relative_change: float, rank_share: float) -> str:
    """``lazy`` / ``rich`` / ``intermediate`` by the rule of the module docstring."""
    if relative_change < LAZY_MAX_CHANGE:
        return "lazy"
    if relative_change >= RICH_MIN_CHANGE and rank_share <= RICH_MAX_RANK_SHARE:
        return "rich"
    return "intermediate"


def run_regime(changes: list[WeightChange], skip_last: bool = True) -> dict[str, Any]:
    """Mean relative change and rank share over a run's matrices (the last left out) and their regime."""
    kept = changes[:-1] if skip_last and len(changes) > 1 else changes
    if not kept:
        raise WeightsmithError("run_regime needs at least one weight change")
    rel = sum(c.relative_change for c in kept) / len(kept)
    share = sum(c.rank_share for c in kept) / len(kept)
    return {"relative_change": rel, "rank_share": share, "regime": regime(rel, share)}


def weight_change(W0: Tensor, W1: Tensor, k: int = DEFAULT_K, name: str = "") -> WeightChange:
    """The weight-change summary of one matrix from ``W0`` (initial) to ``W1`` (trained)."""
    if W0.shape != W1.shape or W0.dim() != 2:
        raise WeightsmithError(
            f"{name or 'weight'}: need two matrices of one shape, got {W0.shape}, {W1.shape}"
        )
    A, B = W0.to(torch.float64), W1.to(torch.float64)
    D = B - A
    rel = float(torch.linalg.matrix_norm(D) / torch.linalg.matrix_norm(A).clamp_min(1e-300))
    er = float(effective_rank(D))
    share = er / min(D.shape)
    k = min(k, min(D.shape))
    return WeightChange(
        name=name,
        relative_change=rel,
        delta_effective_rank=er,
        rank_share=share,
        init_alignment=float(subspace_overlap(D, A, k)),
        final_alignment=float(subspace_overlap(D, B, k)),
        regime=regime(rel, share),
    )


def model_weight_changes(
    initial: dict[str, Tensor], trained: dict[str, Tensor], k: int = DEFAULT_K
) -> list[WeightChange]:
    """``weight_change`` of every 2-D tensor present in both state dicts, in ``trained``'s order."""
    names = [n for n, t in trained.items() if t.dim() == 2 and n in initial]
    if not names:
        raise WeightsmithError("no 2-D weight is present in both the initial and the trained state")
    return [weight_change(initial[n], trained[n], k, n) for n in names]


@torch.no_grad()
def scale_init_(model: nn.Module, scales: dict[str, float]) -> nn.Module:
    """Multiply the weights of the named Linear layers by the given factors, in place."""
    modules = dict(model.named_modules())
    for n, s in scales.items():
        m = modules.get(n)
        if not isinstance(m, nn.Linear):
            raise WeightsmithError(f"scale_init_: '{n}' is not a Linear layer of the model")
        m.weight.mul_(s)
    return model


@torch.no_grad()
def low_rank_init_(model: nn.Module, rank: int, names: list[str], generator: torch.Generator) -> nn.Module:
    """Replace the named Linear weights by random rank-``rank`` matrices of the same Frobenius norm."""
    if rank < 1:
        raise WeightsmithError(f"rank {rank}: must be at least 1")
    modules = dict(model.named_modules())
    for n in names:
        m = modules.get(n)
        if not isinstance(m, nn.Linear):
            raise WeightsmithError(f"low_rank_init_: '{n}' is not a Linear layer of the model")
        out_f, in_f = m.weight.shape
        W = torch.randn(out_f, rank, generator=generator) @ torch.randn(rank, in_f, generator=generator)
        m.weight.copy_(W * (m.weight.norm() / W.norm()))
    return model
