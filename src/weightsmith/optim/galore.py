"""``GaLoreAdamW``: a drop-in for galore-torch's optimiser, built on the gradient-transform core.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024), Algorithm 2:
for a weight in a group with a ``rank``, ``R_t = P_t^T G_t``; Adam on R_t; ``W <- W - lr * alpha * P_t N_t``,
with P_t the top-r singular vectors of G_t refreshed every ``update_proj_gap`` steps; other weights get
plain AdamW. Param groups are galore-torch's (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus
two optional keys: ``projector`` (``"svd"``, ``"rsvd"``, ``"dct"``, ``"random"``, ``"sparse"`` or a
:class:`~weightsmith.optim.projectors.Projector`) and ``lazy_threshold`` (Q-GaLore's lazy refresh).

With the SVD projector this computes what galore-torch 1.0 computes: the same SVD call on the float32
gradient, the same step counter for the refresh and the bias correction, ``eps`` added to ``sqrt(v)``, and
weight decay applied after the update (``p <- p - lr*wd*p`` on the updated weight).

``GaLoreAdamW8bit`` / ``GaLoreAdafactor`` are not provided: galore-torch builds them on bitsandbytes' 8-bit
Adam and on transformers' Adafactor; bitsandbytes' optimisers need CUDA, so an 8-bit variant could not be
tested on this CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..errors import WeightsmithError
from .optimizer import TransformOptimizer
from .projection import PROJ_TYPES, LowRank
from .projectors import Projector, make_projector
from .transform import ScaleByAdam, Transform


def projector_of(spec: str | Projector) -> Projector:
    if isinstance(spec, str):
        try:
            return make_projector(spec.removeprefix("q4-"), quantized=spec.startswith("q4-"))
        except ValueError as exc:
            raise WeightsmithError(f"GaLore param group: {exc}") from exc
    return spec


def check_projected_group(group: dict[str, Any], names: list[str], strict_rank: bool = False) -> None:
    """Up-front checks of a projected param group; errors name the parameter and its shape."""
    rank, gap = group["rank"], group.get("update_proj_gap", 200)
    if not isinstance(rank, int) or rank < 1:
        raise WeightsmithError(f"GaLore rank must be a positive integer (got {rank!r})")
    if not isinstance(gap, int) or gap < 1:
        raise WeightsmithError(
            f"update_proj_gap must be a positive integer (got {gap!r}); 1 refreshes every step"
        )
    if group.get("proj_type", "std") not in PROJ_TYPES:
        raise WeightsmithError(
            f"proj_type must be one of {', '.join(PROJ_TYPES)} (got '{group['proj_type']}')"
        )
    for name, p in zip(names, group["params"], strict=True):
        if p.dim() != 2:
            raise WeightsmithError(
                f"'{name}' has shape {tuple(p.shape)}: only 2-D weights can be in a projected (rank) group; "
                "put biases, norms and other tensors in a group without 'rank'"
            )
        if strict_rank and rank > min(p.shape):
            raise WeightsmithError(
                f"rank {rank} is larger than a side of '{name}' (shape {tuple(p.shape)}); "
                f"use a rank of at most {min(p.shape)} or leave this weight out of the projected group"
            )


class ProjectedAdamW(TransformOptimizer):
    """AdamW whose param groups with a ``rank`` get a projected update (the shared base of GaLore, APOLLO and
    GradNormLoRP): the groups are checked up front, ``seed`` seeds the projections, and
    :meth:`low_rank` builds the group's :class:`LowRank` transform from galore-torch's group keys."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        **defaults: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, seed=seed, **defaults
        )
        self.seed = seed
        for group in self.param_groups:
            if "rank" in group:
                names = [self.param_name(p) or f"parameter {i}" for i, p in enumerate(group["params"])]
                check_projected_group(group, names)

    def low_rank(
        self, group: dict[str, Any], inner: Transform, lazy_threshold: float | None = None
    ) -> LowRank:
        """``inner`` run in the rank-``group["rank"]`` subspace that the group's keys describe."""
        return LowRank(
            inner,
            projector_of(group.get("projector", "svd")),
            group["rank"],
            group.get("update_proj_gap", 200),
            group.get("scale", 1.0),
            group.get("proj_type", "std"),
            self.seed,
            lazy_threshold,
        )


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore projection on the param groups that carry a ``rank`` (galore-torch's interface)."""

    decay_after_update = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,
        *,
        seed: int = 0,
        **defaults: Any,
    ) -> None:
        defaults["correct_bias"] = correct_bias
        super().__init__(params, lr, betas, eps, weight_decay, seed=seed, **defaults)

    def transform_for(self, group: dict[str, Any]) -> Transform:
        b1, b2 = group["betas"]
        adam = ScaleByAdam(b1, b2, group["eps"], group["correct_bias"])
        if "rank" not in group:
            return adam
        return self.low_rank(group, adam, group.get("lazy_threshold"))


def galore_param_groups(
    named: Iterable[tuple[str, Tensor]],
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **extra: Any,
) -> list[dict[str, Any]]:
    """Two groups: the 2-D weights projected (``rank`` and friends), everything else plain AdamW."""
    named = list(named)
    mats = [(n, p) for n, p in named if p.dim() == 2]
    rest = [(n, p) for n, p in named if p.dim() != 2]
    groups: list[dict[str, Any]] = []
    if mats:
        groups.append(
            {
                "params": [p for _, p in mats],
                "param_names": [n for n, _ in mats],
                "rank": rank,
                "update_proj_gap": update_proj_gap,
                "scale": scale,
                "proj_type": proj_type,
                **extra,
            }
        )
    if rest:
        groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest]})
    return groups
