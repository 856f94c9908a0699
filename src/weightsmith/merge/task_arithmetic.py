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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError

SPARSIFY, TRIM, RESCALE = ("none", "magnitude", "random"), ("tensor", "model"), ("none", "inverse", "l1")
ELECT, NORMALIZE = ("none", "sum", "weighted_sum"), ("none", "count", "weights")


@register_config("gta", kind="merge")
@dataclass(frozen=True)
class GTA:
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
@dataclass(frozen=True)
class Average:
    """Weighted average of the checkpoints (a model soup): sum_i w_i theta_i / sum_i w_i."""

    def gta(self) -> GTA:
        return GTA(normalize="weights", uses_base=False)


@register_config("task_arithmetic", kind="merge")
@dataclass(frozen=True)
class TaskArithmetic:
    """theta_0 + lambda * sum_i w_i tau_i (Ilharco et al. 2023)."""

    scaling: float = 1.0

    def gta(self) -> GTA:
        return GTA(scaling=self.scaling)


@register_config("ties", kind="merge")
@dataclass(frozen=True)
class TIES:
    """TIES-Merging (Yadav et al. 2023). ``trim="model"`` ranks |tau_i| over the whole model, as the
    paper's code does; ``"tensor"`` per tensor, as mergekit does."""

    density: float = 0.2
    scaling: float = 1.0
    trim: str = "model"
    weighted_election: bool = False

    def gta(self) -> GTA:
        elect = "weighted_sum" if self.weighted_election else "sum"
        return GTA("magnitude", self.density, self.trim, elect=elect, normalize="count", scaling=self.scaling)


@register_config("dare", kind="merge")
@dataclass(frozen=True)
class DARE:
    """DARE (Yu et al. 2024) followed by task arithmetic: drop rate ``p``, survivors times 1/(1-p)."""

    p: float = 0.9
    scaling: float = 1.0
    rescale: str = "inverse"
    seed: int = 0

    def gta(self) -> GTA:
        return GTA("random", 1.0 - self.p, rescale=self.rescale, scaling=self.scaling, seed=self.seed)


@register_config("dare_ties", kind="merge")
@dataclass(frozen=True)
class DARETIES:
    """DARE, then the TIES sign election and disjoint mean (Yu et al. 2024, DARE + TIES-Merging)."""

    p: float = 0.9
    scaling: float = 1.0
    rescale: str = "inverse"
    weighted_election: bool = False
    seed: int = 0

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


def magnitude_threshold(chunks: Callable[[], Iterable[Tensor]], k: int) -> float:
    """The k-th largest |x| over the tensors ``chunks()`` yields, exactly, in two histogram passes.

    Non-negative float32 values sort like their int32 bit patterns, so a 2^15-bin count of the high 16
    bits finds the bin holding the k-th value and a 2^16-bin count of the low bits inside it finishes.
    Cheaper than ``topk`` (no index tensor), and ``chunks`` may stream a whole model tensor by tensor.
    """
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for c in chunks():
        high += torch.bincount(_bits(c) >> 16, minlength=1 << 15).cpu()
    above = high.flip(0).cumsum(0)
    j = int(torch.searchsorted(above, torch.tensor(k)))
    hb = (1 << 15) - 1 - j
    need = k - (int(above[j - 1]) if j > 0 else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for c in chunks():
        b = _bits(c)
        low += torch.bincount(b[(b >> 16) == hb] & 0xFFFF, minlength=1 << 16).cpu()
    lb = (1 << 16) - 1 - int(torch.searchsorted(low.flip(0).cumsum(0), torch.tensor(need)))
    return float(torch.tensor([(hb << 16) | lb], dtype=torch.int32).view(torch.float32))


def _bits(x: Tensor) -> Tensor:
    return x.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


def trim_magnitude(delta: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """TIES trim: keep the top ``density`` fraction of |delta| (exactly k = max(1, int(density*n))
    entries, ties broken by position), or every entry with |delta| >= ``threshold`` when given."""
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    if threshold is not None:
        return delta * (mag >= threshold)
    k = max(1, int(density * delta.numel()))
    t = magnitude_threshold(lambda: [mag], k)
    keep = mag > t
    tied = (mag == t).reshape(-1)
    tied[tied.nonzero()[k - int(keep.sum()) :, 0]] = False
    return delta * (keep | tied.view_as(keep))


# ------------------------------------------------------------------------ the fold over task vectors


@dataclass
class GTAState:
    """Running sums for one tensor. Without election: ``pos`` holds sum_i w_i tau_i and ``pos_div`` the
    divisor. With election: positive / negative kept parts, their divisors, and the vote (``sum``)."""

    pos: Tensor
    pos_div: Tensor
    neg: Tensor | None = None
    neg_div: Tensor | None = None
    vote: Tensor | None = None


def gta_init(like: Tensor, spec: GTA) -> GTAState:
    z = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    if spec.elect == "none":
        return GTAState(z, torch.zeros((), dtype=torch.float32, device=like.device))
    return GTAState(
        z,
        torch.zeros_like(z),
        torch.zeros_like(z),
        torch.zeros_like(z),
        torch.zeros_like(z) if spec.elect == "sum" else None,
    )


def gta_update(state: GTAState, tau: Tensor, weight: float, spec: GTA) -> GTAState:
    """Add one (already sparsified, float32) task vector. The state's tensors are updated in place."""
    unit = 1.0 if spec.normalize == "count" else weight
    if spec.elect == "none":
        state.pos.add_(tau, alpha=weight)
        state.pos_div.add_(unit)
        return state
    assert state.neg is not None and state.neg_div is not None
    x = tau * weight
    s = tau if spec.elect == "sum" else x  # the sign each task votes with
    up, down = s > 0, s < 0
    state.pos.add_(torch.where(up, x, 0.0))
    state.neg.add_(torch.where(down, x, 0.0))
    state.pos_div.add_(up, alpha=unit)
    state.neg_div.add_(down, alpha=unit)
    if state.vote is not None:
        state.vote.add_(tau)
    return state


def gta_finalize(state: GTAState, spec: GTA) -> Tensor:
    """The merged update: lambda * (elected part) / (divisor); sign ties (sum 0) go to +."""
    if spec.elect == "none":
        mixed, div = state.pos, state.pos_div
        if spec.normalize != "none":
            mixed = mixed / (div if float(div.abs()) >= 1e-8 else 1.0)
    else:
        assert state.neg is not None and state.neg_div is not None
        vote = state.vote if state.vote is not None else state.pos + state.neg
        plus = vote >= 0
        mixed = torch.where(plus, state.pos, state.neg)
        if spec.normalize != "none":
            div = torch.where(plus, state.pos_div, state.neg_div)
            mixed = mixed / torch.where(div == 0, 1.0, div)
    return mixed * spec.scaling if spec.scaling != 1.0 else mixed


def merge_tensors(
    base: Tensor | None,
    thetas: Sequence[Tensor],
    method: object,
    weights: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Merge one tensor: ``method`` is any config with ``.gta()``; ``thetas`` are the fine-tuned tensors;
    ``seeds`` (one per task) drive DARE's masks. Computes and returns float32."""
    from ._chunked import merge_streamed

    spec: GTA = method.gta()  # type: ignore[attr-defined]
    if spec.uses_base and base is None:
        raise WeightsmithError(f"merge method '{type(method).method}' needs a base model")  # type: ignore[attr-defined]
    if spec.sparsify == "magnitude" and spec.trim == "model" and spec.density < 1:
        raise WeightsmithError(
            "trim='model' ranks a whole model: use merge_state_dicts or merge, not merge_tensors"
        )
    w = list(weights) if weights is not None else [1.0] * len(thetas)
    return merge_streamed(base, thetas, spec, w, [spec.density] * len(thetas), seeds=seeds)
