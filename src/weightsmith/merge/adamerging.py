"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation on unlabelled test inputs.

AdaMerging: Adaptive Model Merging for Multi-task Learning. Enneng Yang, Zhenyi Wang, Li Shen, Shiwei Liu,
Guibing Guo, Xingwei Wang, Dacheng Tao, ICLR 2024, arXiv:2310.02575.

    task-wise:  theta = theta_0 + Σ_k lambda_k tau_k              (eq. 4)
    layer-wise: theta^l = theta_0^l + Σ_k lambda_k^l tau_k^l     (eq. 6)

with ``tau_k = theta_k - theta_0``. The coefficients start at the task-arithmetic value (``init``, 0.3 in the
paper) and minimise ``Σ_k H(f_theta(x_k))``, the Shannon entropy of the merged model's predictions on a batch
of unlabelled test inputs ``x_k`` of every task ``k`` (eq. 5/7), by Adam (lr 1e-3, batches of 16, 500 steps in
the paper). A "layer" is one parameter tensor (the granularity of the paper's code); tensors of no task
vector (buffers) come from the base. For a language model the entropy is that of the next-token
distribution, averaged over the positions.

Memory: the base and the ``K`` task vectors are held (``K + 1`` copies of the merged tensors), since the loss
couples every layer; the merged checkpoint is then written tensor by tensor. The composition and the entropy
are :func:`weightsmith.merge.atlas.compose` / :func:`~weightsmith.merge.atlas.entropy` (aTLAS learns the same
per-tensor coefficients with other objectives).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..progress import track
from . import _core
from ._dataaware import (
    Batch,
    DataOptions,
    load_batches,
    logits_of,
    open_checked,
    token_logits,
    write_merged,
)
from .atlas import AtlasResult, compose, entropy

GRANULARITY = ("layer", "task")


@register_config("adamerging", kind="merge")
class AdaMerging(DataOptions):
    """``granularity``: layer (one coefficient per task and tensor) or task (one per task); ``init``: the
    starting (task-arithmetic) coefficient; ``steps``, ``lr``: Adam on the entropy. Data options:
    :class:`~._dataaware.DataOptions`; the unlabelled inputs default to each data set's test split."""

    granularity: str = "layer"
    init: float = 0.3
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    split: str = "test"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITY:
            raise WeightsmithError(
                f"adamerging option granularity='{self.granularity}': use one of {GRANULARITY}"
            )
        if self.steps < 0 or not self.lr > 0:
            raise WeightsmithError(
                f"adamerging options steps={self.steps}, lr={self.lr}: need steps >= 0, lr > 0"
            )
        self.check_data()

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        stores, base, model, tok = open_checked(recipe, "adamerging", True, "it learns the coefficients")
        device = torch.device(kw.get("device") or "cpu")
        # tensors the store holds under one of two tied names (lm_head / embeddings) are composed once
        names = sorted(_core.selected_names(base, recipe.select) & set(model.state_dict()))
        theta0 = {n: base[n].to(device).float() for n in names}  # the rest: the module's own (the base's)
        taus = [{n: s[n].to(device).float() - theta0[n] for n in names} for s in stores]
        data = [load_batches(tok, src, self) for src in self.sources(len(stores))]
        result = learn_adamerging([model.to(device)] * len(stores), theta0, taus, data, self)
        coef = result.coef

        def merge_one(name: str, tensors: list[Tensor]) -> Tensor:
            b, fts = tensors[0].float(), tensors[1:]
            if name not in result.index:
                return b
            j = result.index[name]
            return b + sum((float(coef[k, j]) * (t.float() - b) for k, t in enumerate(fts)), torch.zeros(()))

        return write_merged(recipe, [base, *stores], merge_one, out, "adamerging", dict(kw))


@dataclass(frozen=True)
class AdaMergingResult(AtlasResult):
    """The learned ``coef`` (tasks, tensors) or (tasks, 1) task-wise, the tensor ``names``, the losses;
    ``state(base, task_vectors)`` composes the merged tensors."""

    @property
    def index(self) -> dict[str, int]:
        """Column of ``coef`` for each tensor name."""
        return {n: (j if self.coef.shape[1] > 1 else 0) for j, n in enumerate(self.names)}


def mean_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """Entropy of the predictive distribution, averaged over the examples (over the positions for an LM)."""
    rows, _ = token_logits(logits, batch)
    return entropy(rows.float())


def learn_adamerging(
    models: Sequence[nn.Module],
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Sequence[Batch]],
    config: AdaMerging = AdaMerging(),
    prefix: str = "",
) -> AdaMergingResult:
    """Learn the coefficients: ``models[k]`` evaluates task ``k`` (e.g. the shared encoder under task ``k``'s
    head) with the composed tensors named ``prefix + name``; ``batches[k]`` are task ``k``'s unlabelled
    inputs (labels, if present, are ignored). ``base`` holds theta_0 (every tensor ``models`` need beyond the
    composed ones may come from the module itself)."""
    if not task_vectors or not len(models) == len(task_vectors) == len(batches):
        raise WeightsmithError(
            f"adamerging: {len(models)} models, {len(task_vectors)} task vectors, {len(batches)} batch lists"
        )
    if any(not b for b in batches):
        raise WeightsmithError("adamerging: a task has no unlabelled batch")
    names = [n for n in task_vectors[0] if all(n in t for t in task_vectors)]
    width = len(names) if config.granularity == "layer" else 1
    coef = torch.full((len(task_vectors), width), float(config.init), requires_grad=True)
    opt = torch.optim.Adam([coef], lr=config.lr)
    frozen = {n: t.detach() for n, t in base.items()}
    taus = [{n: t[n].detach() for n in names} for t in task_vectors]
    for m in models:
        m.eval()
    losses: list[float] = []
    for step in track(range(config.steps), "adamerging"):
        params = compose(frozen, taus, coef, names)
        named = {prefix + n: v for n, v in params.items()}
        loss = torch.zeros(())
        for k, m in enumerate(models):
            batch = batches[k][step % len(batches[k])]
            dev = next(iter(named.values())).device
            b = {key: v.to(dev) for key, v in batch.items()}
            loss = loss + mean_entropy(logits_of(m, b, named), b).cpu()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return AdaMergingResult(coef.detach().clone(), names, losses)
