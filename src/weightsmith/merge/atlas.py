"""aTLAS: learned anisotropic (per-tensor) scaling of task vectors.

Knowledge Composition using Task Vectors with Learned Anisotropic Scaling. Frederic Z. Zhang, Paul Albert,
Cristian Rodriguez-Opazo, Anton van den Hengel, Ehsan Abbasnejad, NeurIPS 2024, arXiv:2407.02880.

``theta = theta_0 + sum_i sum_b lambda_{i,b} tau_{i,b}``: one learnable scalar per (task vector ``i``,
parameter block ``b`` = one parameter tensor), initialised to 0. Only ``lambda`` is trained; the base
``theta_0`` and the task vectors stay frozen. The model is never copied: every step runs
``torch.func.functional_call`` with the composed tensors. Objectives: cross-entropy on a few labelled
examples (the paper's few-shot setting), or, without labels, the mean prediction entropy on unlabelled
inputs (a simpler unsupervised objective than the paper's FixMatch-style pseudo-labelling, which needs
data augmentations; stated as a deviation). ``blockwise=False`` learns one scalar per task vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import WeightsmithError


@dataclass(frozen=True)
class AtlasResult:
    coef: Tensor  # (n_task_vectors, n_blocks), or (n_task_vectors, 1) when not blockwise
    names: list[str]  # block b <-> names[b]
    losses: list[float]

    def state(
        self, base: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The composed weights as a plain state dict (detached)."""
        with torch.no_grad():
            return {
                k: v.detach().clone() for k, v in compose(base, task_vectors, self.coef, self.names).items()
            }


def task_vector(finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tau = theta_ft - theta_0`` over the floating-point tensors both share."""
    return {k: finetuned[k] - base[k] for k in base if k in finetuned and base[k].is_floating_point()}


def compose(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    coef: Tensor,
    names: Sequence[str],
) -> dict[str, Tensor]:
    """``theta_0 + sum_i coef[i, b] tau_i[b]`` for the ``names`` (blocks); the rest comes from the base."""
    out = dict(base)
    blockwise = coef.shape[1] > 1
    for b, name in enumerate(names):
        w = base[name]
        for i, tau in enumerate(task_vectors):
            w = w + coef[i, b if blockwise else 0] * tau[name]
        out[name] = w
    return out


def entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()


def atlas_loss(
    model: nn.Module,
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    coef: Tensor,
    names: Sequence[str],
    x: Tensor,
    y: Tensor | None = None,
) -> Tensor:
    """Cross-entropy on ``(x, y)``, or prediction entropy when ``y`` is None, of the composed model."""
    logits = functional_call(model, compose(base, task_vectors, coef, names), (x,))
    return nn.functional.cross_entropy(logits, y) if y is not None else entropy(logits)


def learn_coefficients(
    model: nn.Module,
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor | None = None,
    blockwise: bool = True,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int | None = None,
    weight_decay: float = 0.0,
    init: float = 0.0,
    seed: int = 0,
) -> AtlasResult:
    """Train ``lambda`` by Adam(W) on the few-shot cross-entropy (``y`` given) or unsupervised entropy.
    ``init`` is the starting coefficient (the paper: 0, i.e. the base model).

    ``model`` is the architecture (its own tensors are ignored); ``base`` and ``task_vectors`` are frozen.
    """
    if not task_vectors:
        raise WeightsmithError("aTLAS needs at least one task vector")
    names = [k for k in task_vectors[0] if all(k in t for t in task_vectors)]
    missing = [k for k in names if k not in base]
    if missing:
        raise WeightsmithError(f"aTLAS: task-vector tensors missing from the base weights: {missing[:5]}")
    frozen_base = {k: v.detach() for k, v in base.items()}
    frozen_tvs = [{k: t[k].detach() for k in names} for t in task_vectors]
    coef = torch.full((len(task_vectors), len(names) if blockwise else 1), float(init), requires_grad=True)
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.eval()  # BatchNorm uses the base's running statistics
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch_size] if batch_size else slice(None)
        loss = atlas_loss(model, frozen_base, frozen_tvs, coef, names, x[idx], None if y is None else y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return AtlasResult(coef.detach().clone(), names, losses)


def task_arithmetic_state(
    base: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]], lam: float
) -> dict[str, Tensor]:
    """The isotropic baseline ``theta_0 + lambda sum_i tau_i`` (Ilharco et al., arXiv:2212.04089)."""
    names = [k for k in task_vectors[0] if all(k in t for t in task_vectors)]
    coef = torch.full((len(task_vectors), 1), float(lam))
    with torch.no_grad():
        return dict(compose(base, task_vectors, coef, names))
