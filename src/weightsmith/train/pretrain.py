"""Pre-training from scratch with SLTrain's sparse-plus-low-rank weights.

"SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining", Han, Li, Huang,
Hong, Takeda, Jawanpuria & Mishra, NeurIPS 2024 (arXiv 2406.02214): each targeted weight *is*

    W = (alpha / r) B A + S,    S with a support of density delta drawn uniformly at random and fixed,

and B, A and the values of S are trained from the start with the other parameters (embeddings, norms, the
output layer). The parameterisation is the SLTrain adapter (:mod:`weightsmith.adapters.sltrain`) attached
to a base weight set to zero and frozen, so the layer computes ``x W^T`` with ``W`` as above; A is
Kaiming-uniform, B = 0, and the values of S are drawn from ``U(-1/sqrt(in), 1/sqrt(in))`` (the paper's
initialisation; the adapter starts them at 0 for fine-tuning, where the update must start at 0). A layer
stores ``r (m + n) + delta m n`` trained numbers instead of ``m n``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import WeightsmithError


def sltrain_from_scratch(
    model: nn.Module,
    targets: str,
    rank: int = 128,
    alpha: float = 32.0,
    density: float = 0.03,
    seed: int = 0,
) -> list[str]:
    """Make every weight ``targets`` selects an SLTrain weight (see the module docstring); every other
    parameter stays trainable. Returns the weight names so parameterised."""
    from ..adapters import adapt, adapted_layers
    from ..adapters.sltrain import SLTrain, SLTrainAdapter

    if not 0.0 < density <= 1.0:
        raise WeightsmithError(f"SLTrain density must be in (0, 1] (got {density})")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    names = adapt(model, SLTrain(rank=rank, alpha=alpha, density=density, seed=seed), targets, name="sltrain")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            weight: torch.Tensor = layer.base.weight  # type: ignore[assignment]
            weight.zero_()  # the base weight: W is the sparse plus low-rank part alone
            adapter: SLTrainAdapter = layer.adapters["sltrain"]  # type: ignore[assignment]
            bound = 1.0 / math.sqrt(adapter.shape[1])
            values = torch.empty(adapter.values.shape).uniform_(-bound, bound, generator=g)
            adapter.values.copy_(values.to(adapter.values))
    base = {id(layer.base.weight) for _, layer in adapted_layers(model)}
    for p in model.parameters():  # adapt() froze everything but the adapters: unfreeze the rest again
        if id(p) in trainable and id(p) not in base:
            p.requires_grad_(True)
    return names
