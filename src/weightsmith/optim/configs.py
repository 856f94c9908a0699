"""Registered optimizer configs (kind ``"optimizer"``): what ``weightsmith train --optimizer NAME`` builds.

Each config is a frozen dataclass whose ``create(named_parameters, lr)`` is an
:data:`~weightsmith.train.optimizer.OptimizerFactory`, and whose ``check(named_parameters)`` validates the
options against the model before anything is trained (rank larger than a weight's side, a gap of 0, a
targeted weight that is not 2-D), raising ``WeightsmithError`` naming the weight and its shape.

Projected weights are the 2-D weights that ``targets`` selects (by default the attention and MLP weights of
the transformer blocks, as transformers' ``optim_target_modules=[r".*.attn.*", r".*.mlp.*"]``); biases and
norms among them, embeddings and task heads get plain AdamW.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..config import register_config, to_dict
from ..errors import WeightsmithError
from ..select import Selector
from .apollo import APOLLOAdamW
from .galore import GaLoreAdamW, check_projected_group
from .gradnorm import GradNormLoRPAdamW
from .layerwise import layerwise as in_backward
from .projection import PROJ_TYPES
from .projectors import PROJECTORS

DEFAULT_TARGETS: tuple[str, ...] = (r"re:(attn|attention|mlp|intermediate)\.", r"re:layers?\.\d+\.output\.")

Named = list[tuple[str, nn.Parameter]]


def split_targets(named: Named, targets: tuple[str, ...]) -> tuple[Named, Named]:
    """(projected, plain): targeted weights of 2 or more dimensions, and the rest."""
    sel = Selector.of(list(targets))
    hits = [(n, p) for n, p in named if sel.matches(n) and p.dim() >= 2]
    if not hits:
        sel.require([n for n, p in named if p.dim() >= 2], "2-D trainable weights")
    hit_ids = {id(p) for _, p in hits}
    return hits, [(n, p) for n, p in named if id(p) not in hit_ids]


def _groups(projected: Named, plain: Named, **options: Any) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    if projected:
        groups.append({"params": [(n, p) for n, p in projected], **options})
    if plain:
        groups.append({"params": [(n, p) for n, p in plain]})
    return groups


def _spec(config: Any) -> str:
    """The config as JSON: kept in the optimizer's defaults, so ``--resume`` with other options is refused."""
    return json.dumps(to_dict(config), sort_keys=True)


def _check_options(config: Any) -> None:
    """Checks that need no model: positive rank and gap, known projector, projection type and scale type."""
    name = type(config).method
    rank = getattr(config, "rank", 1)
    gap = config.update_proj_gap
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise WeightsmithError(f"optimizer {name}: rank must be a positive integer (got {rank!r})")
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise WeightsmithError(
            f"optimizer {name}: update_proj_gap must be a positive integer (got {gap!r}); "
            "1 refreshes every step"
        )
    projector = getattr(config, "projector", "svd")
    if projector not in PROJECTORS:
        raise WeightsmithError(
            f"optimizer {name}: projector must be one of {', '.join(PROJECTORS)} (got '{projector}')"
        )
    if getattr(config, "quantized", False) and projector == "dct":
        raise WeightsmithError(
            f"optimizer {name}: the dct projector stores only indices; there is no matrix to quantise"
        )
    proj_type = getattr(config, "proj_type", "std")
    if proj_type not in PROJ_TYPES:
        raise WeightsmithError(
            f"optimizer {name}: proj_type must be one of {', '.join(PROJ_TYPES)} (got '{proj_type}')"
        )
    if getattr(config, "scale_type", "channel") not in ("channel", "tensor"):
        raise WeightsmithError(
            f"optimizer {name}: scale_type must be 'channel' or 'tensor' (got '{config.scale_type}')"
        )
    if config.weight_decay < 0:
        raise WeightsmithError(f"optimizer {name}: weight_decay must be >= 0 (got {config.weight_decay})")


def _check(named: Named, targets: tuple[str, ...], rank: int, gap: int) -> None:
    projected, _ = split_targets(named, targets)
    group = {"params": [p for _, p in projected], "rank": rank, "update_proj_gap": gap}
    check_projected_group(group, [n for n, _ in projected], strict_rank=True)


@dataclass(frozen=True, kw_only=True)
class _Common:
    """The options every projected-gradient config has (keyword-only, so that each method's own options
    keep their positions)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    weight_decay: float = 0.0
    eps: float = 1e-6
    seed: int = 0
    layerwise: bool = False


class _Projected(_Common, ABC):
    """What the projected-gradient configs share: the option checks, the model check, and the build of
    ``optimizer`` (run inside the backward pass when ``layerwise``) on the projected and plain groups."""

    rank: int
    update_proj_gap: int

    def __post_init__(self) -> None:
        _check_options(self)

    def _common(self) -> dict[str, Any]:
        """The shared options, to build the config a preset stands for."""
        return {f.name: getattr(self, f.name) for f in fields(_Common)}

    def check(self, named: Named) -> None:
        _check(named, self.targets, self.rank, self.update_proj_gap)

    @abstractmethod
    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``named`` (an :data:`~weightsmith.train.optimizer.OptimizerFactory`)."""

    def _build(self, optimizer: type[Any], named: Named, lr: float, **options: Any) -> torch.optim.Optimizer:
        self.check(named)
        projected, plain = split_targets(named, self.targets)
        cls = in_backward(optimizer) if self.layerwise else optimizer
        groups = _groups(projected, plain, **options)
        return cls(  # type: ignore[no-any-return]
            groups, lr=lr, eps=self.eps, weight_decay=self.weight_decay, seed=self.seed, spec=_spec(self)
        )


class _Preset(_Projected):
    """A fixed setting of another projected config: checks and builds what :meth:`_full` returns."""

    @abstractmethod
    def _full(self) -> _Projected:
        """The config this preset stands for."""

    def check(self, named: Named) -> None:
        self._full().check(named)

    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        return self._full().create(named, lr)


@register_config("adamw", "optimizer")
class AdamW:
    """torch.optim.AdamW on every trainable parameter (the reference)."""

    weight_decay: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise WeightsmithError(f"optimizer adamw: weight_decay must be >= 0 (got {self.weight_decay})")

    def check(self, named: Named) -> None:
        pass

    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in named], lr=lr, eps=self.eps, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class _GaLoreGroup(_Projected):
    """GaLore's param-group options (galore-torch's ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    plus the ``projector``), shared by GaLore, Q-GaLore and GradNormLoRP."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    projector: str = "rsvd"

    def _group(self) -> dict[str, Any]:
        """The projected group's keys, as the optimizer reads them."""
        common = {f.name for f in fields(_Common)}
        return {f.name: getattr(self, f.name) for f in fields(_GaLoreGroup) if f.name not in common}


@register_config("galore", "optimizer")
class GaLore(_GaLoreGroup):
    """GaLore (Zhao et al., 2024): Adam in a rank-r gradient subspace, refreshed every update_proj_gap."""

    quantized: bool = False
    lazy_threshold: float | None = None

    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        options = {**self._group(), "projector": ("q4-" if self.quantized else "") + self.projector}
        if self.lazy_threshold is not None:
            options["lazy_threshold"] = self.lazy_threshold
        return self._build(GaLoreAdamW, named, lr, **options)


@register_config("q-galore", "optimizer")
class QGaLore(_Preset, _GaLoreGroup):
    """Q-GaLore (Zhang et al., 2024): GaLore with INT4 projection matrices and layer-adaptive lazy refresh."""

    projector: str = "svd"
    lazy_threshold: float = 0.4

    def _full(self) -> GaLore:
        return GaLore(**self._group(), quantized=True, lazy_threshold=self.lazy_threshold, **self._common())


@register_config("apollo", "optimizer")
class APOLLO(_Projected):
    """APOLLO (Zhu et al., 2024): the gradient scaled channel-wise by Adam's effect in a random subspace."""

    rank: int = 256
    update_proj_gap: int = 200
    scale: float = 1.0
    scale_type: str = "channel"

    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        return self._build(
            APOLLOAdamW, named, lr, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=self.scale,
            scale_type=self.scale_type,
        )  # fmt: skip


@register_config("apollo-mini", "optimizer")
class APOLLOMini(_Preset):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, alpha = sqrt(128) (the paper's setting)."""

    update_proj_gap: int = 200
    scale: float = math.sqrt(128.0)

    def _full(self) -> APOLLO:
        return APOLLO(1, self.update_proj_gap, self.scale, "tensor", **self._common())


@register_config("gradnormlorp", "optimizer")
class GradNormLoRP(_GaLoreGroup):
    """GradNormLoRP (Huang et al., 2024): weight-normalised, low-rank projected direction, full magnitude."""

    def create(self, named: Named, lr: float) -> torch.optim.Optimizer:
        return self._build(GradNormLoRPAdamW, named, lr, **self._group())
