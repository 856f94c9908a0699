"""The task-arithmetic family as data: weighted average, task arithmetic, TIES, DARE and DARE-TIES.

- Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
  without increasing inference time", ICML 2022, arXiv:2203.05482 (weighted average).
- Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089:
  theta = theta_0 + lambda * sum_i tau_i with task vectors tau_i = theta_i - theta_0.
- Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
  arXiv:2306.01708: trim (keep the top-k% of |tau_i|), elect (gamma = sgn(sum_i tau_hat_i)),
  disjoint mean over the tasks that agree with gamma.
- Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", ICML 2024, arXiv:2311.03099 (DARE): drop each entry with probability p, rescale by 1/(1-p).

Every method is one row of :class:`GTA` (sparsify -> elect -> aggregate -> scale). The rows are folds
over tasks (``gta_init`` / ``gta_update`` / ``gta_finalize``): the elected sign only needs
``sum_i tau_i``, which equals P + N where P (N) sums the positive (negative) kept entries, so TIES runs
in one pass with memory independent of the number of tasks, instead of stacking all task vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..linalg import top_k_mask
from . import _core
from ._chunked import merge_streamed

SPARSIFY, TRIM, RESCALE = ("none", "magnitude", "random"), ("tensor", "model"), ("none", "inverse", "l1")
ELECT, NORMALIZE = ("none", "sum", "weighted_sum"), ("none", "count", "weights")


class GTAMethod(ABC):
    """A task-arithmetic-family config: ``gta()`` gives its row; every row runs through the same executor.

    ``run`` is how a recipe (``weightsmith merge``) executes any merge config: the registered config type
    is the dispatch, there is no second table."""

    @abstractmethod
    def gta(self) -> GTA:
        """This config as a row of :class:`GTA`."""

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        models = recipe.open_models()
        base = recipe.open_base() if self.gta().uses_base else None
        return _core.merge_gta(
            models,
            self.gta(),
            out,
            base=base,
            weights=recipe.weights,
            select=recipe.select,
            params=recipe.params,
            copy_from=recipe.copy_from(),
            method=type(self).method,  # type: ignore[attr-defined]
            filters=recipe.filters,
            **kw,
        )


@register_config("gta", kind="merge")
class GTA(GTAMethod):
    """One row of the family. ``density`` is the kept fraction (TIES k, DARE 1-p); ``trim`` the scope of
    the magnitude top-k; ``rescale`` of survivors: ``inverse`` (1/density, DARE paper) or ``l1``
    (mergekit); ``elect``: ``sum`` votes with the unweighted trimmed vectors (TIES paper),
    ``weighted_sum`` with the weighted ones (mergekit); ``normalize``: divide by the number (``count``,
    the disjoint mean) or the weights (``weights``) of the contributing tasks; ``scaling`` is lambda."""

    sparsify: str = "none"
    density: float = 1.0
    trim: str = "tensor"
    rescale: str = "none"
    elect: str = "none"
    normalize: str = "none"
    scaling: float = 1.0
    seed: int = 0
    uses_base: bool = True  # False: plain weighted average of the checkpoints, no base needed

    def __post_init__(self) -> None:
        for name, allowed in (
            ("sparsify", SPARSIFY),
            ("trim", TRIM),
            ("rescale", RESCALE),
            ("elect", ELECT),
            ("normalize", NORMALIZE),
        ):
            if getattr(self, name) not in allowed:
                raise WeightsmithError(f"merge option {name}='{getattr(self, name)}'; use one of {allowed}")
        if not 0.0 <= self.density <= 1.0:
            raise WeightsmithError(f"density must be in [0, 1] (got {self.density})")

    def gta(self) -> GTA:
        return self

    @property
    def symmetric(self) -> bool:
        """Invariant to the order of the inputs (DARE's masks are drawn per input position)."""
        return self.sparsify != "random"


@register_config("average", kind="merge")
class Average(GTAMethod):
    """Weighted average of the checkpoints (a model soup): sum_i w_i theta_i / sum_i w_i."""

    def gta(self) -> GTA:
        return GTA(normalize="weights", uses_base=False)


@register_config("task_arithmetic", kind="merge")
class TaskArithmetic(GTAMethod):
    """theta_0 + lambda * sum_i w_i tau_i (Ilharco et al. 2023)."""

    scaling: float = 1.0

    def gta(self) -> GTA:
        return GTA(scaling=self.scaling)


@register_config("ties", kind="merge")
class TIES(GTAMethod):
    """TIES-Merging (Yadav et al. 2023). ``trim="model"`` ranks |tau_i| over the whole model, as the
    paper's code does; ``"tensor"`` per tensor, as mergekit does."""

    density: float = 0.2
    scaling: float = 1.0
    trim: str = "model"
    weighted_election: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise WeightsmithError(f"ties option density={self.density}: the kept fraction must be in (0, 1]")

    def gta(self) -> GTA:
        elect = "weighted_sum" if self.weighted_election else "sum"
        return GTA("magnitude", self.density, self.trim, elect=elect, normalize="count", scaling=self.scaling)


@register_config("dare", kind="merge")
class DARE(GTAMethod):
    """DARE (Yu et al. 2024) followed by task arithmetic: drop rate ``p``, survivors times 1/(1-p)."""

    p: float = 0.9
    scaling: float = 1.0
    rescale: str = "inverse"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise WeightsmithError(f"{type(self).method} option p={self.p}: the drop rate must be in [0, 1)")  # type: ignore[attr-defined]

    def gta(self) -> GTA:
        return GTA("random", 1.0 - self.p, rescale=self.rescale, scaling=self.scaling, seed=self.seed)


@register_config("dare_ties", kind="merge")
class DARETIES(GTAMethod):
    """DARE, then the TIES sign election and disjoint mean (Yu et al. 2024, DARE + TIES-Merging)."""

    p: float = 0.9
    scaling: float = 1.0
    rescale: str = "inverse"
    weighted_election: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise WeightsmithError(f"{type(self).method} option p={self.p}: the drop rate must be in [0, 1)")  # type: ignore[attr-defined]

    def gta(self) -> GTA:
        elect = "weighted_sum" if self.weighted_election else "sum"
        return GTA(
            "random",
            1.0 - self.p,
            rescale=self.rescale,
            elect=elect,
            normalize="count",
            scaling=self.scaling,
            seed=self.seed,
        )


# ------------------------------------------------------------------------------------ sparsification


def trim_magnitude(delta: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """TIES trim: keep the top ``density`` fraction of |delta| (exactly k = max(1, int(density*n))
    entries, ties broken by position), or every entry with |delta| >= ``threshold`` when given. The
    chunked merge runs the same rule (``linalg.above_threshold`` with a tie budget)."""
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    if threshold is not None:
        return delta * (delta.abs() >= threshold)
    return delta * top_k_mask(delta, max(1, int(density * delta.numel())))


def as_gta(method: object) -> GTA:
    """The :class:`GTA` row of a task-arithmetic-family config; any other config is a clear error."""
    if not isinstance(method, GTAMethod):
        name = getattr(type(method), "method", type(method).__name__)
        raise WeightsmithError(
            f"merge method '{name}' is not a task-arithmetic-family method "
            "(average, task_arithmetic, ties, dare, dare_ties, gta)"
        )
    return method.gta()


def merge_tensors(
    base: Tensor | None,
    thetas: Sequence[Tensor],
    method: GTAMethod,
    weights: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Merge one tensor: ``method`` is a task-arithmetic-family config; ``thetas`` are the fine-tuned
    tensors; ``seeds`` (one per task) drive DARE's masks. Computes and returns float32."""
    spec = as_gta(method)
    if spec.uses_base and base is None:
        raise WeightsmithError(f"merge method '{type(method).method}' needs a base model")  # type: ignore[attr-defined]
    if spec.sparsify == "magnitude" and spec.trim == "model" and spec.density < 1:
        raise WeightsmithError(
            "trim='model' ranks a whole model: use merge_state_dicts or merge, not merge_tensors"
        )
    w = list(weights) if weights is not None else [1.0] * len(thetas)
    _core.check_weights(w, spec)
    return merge_streamed(base, thetas, spec, w, [spec.density] * len(thetas), seeds=seeds)


def merge_state_dicts(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    method: GTAMethod,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """In-memory merge of state dicts (float32 results for ``names``, default: the float tensors of
    the base or first model), with the model-wide TIES trim done over all ``names``."""
    spec = as_gta(method)
    ref = base if base is not None and spec.uses_base else models[0]
    if spec.uses_base and base is None:
        raise WeightsmithError(f"merge method '{type(method).method}' needs a base model")  # type: ignore[attr-defined]
    todo = list(names) if names is not None else [n for n, t in ref.items() if t.is_floating_point()]
    w = list(weights) if weights is not None else [1.0] * len(models)
    _core.check_weights(w, spec)
    thresholds = _core.model_thresholds(ref, models, todo, spec) if spec.uses_base else [None] * len(models)
    dens = [spec.density] * len(models)
    return {
        n: merge_streamed(
            ref[n],
            [m[n] for m in models],
            spec,
            w,
            dens,
            thresholds,
            [_core.seed_for(spec.seed, i, n) for i in range(len(models))],
        )
        for n in todo
    }
