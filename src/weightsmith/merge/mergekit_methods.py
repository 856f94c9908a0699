"""mergekit's tensor-wise merge methods as a table: each name's parameters (scope, default) and an adapter
from mergekit's resolved parameters to our kernels.

A mergekit parameter is ``shared`` (one value per tensor: ``t``, ``lambda``, ``normalize`` ...),
``non_base`` (one per non-base model: ``weight``, ``density`` ...) or ``input`` (one per input, base
included: passthrough's ``scale``). :mod:`weightsmith.merge.mergekit_plan` resolves them per tensor with
mergekit's precedence (model, slice, global; filters; gradients) and calls ``kernel``.

The task-arithmetic rows (``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``) are
here too, with mergekit's per-tensor trim, so that ``slices:`` works with them; a ``models:`` YAML with
those methods keeps going through :mod:`weightsmith.merge.task_arithmetic`'s one-pass executor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ._tensorwise import combine, l1_rescale, stack_deltas, work_dtype
from .arcee_fusion import arcee_fusion
from .breadcrumbs import breadcrumbs
from .della import check_della, della
from .karcher import Karcher
from .model_stock import model_stock
from .nearswap import NearSwap
from .passthrough import Passthrough
from .ram import RAM, RAMPlusTL
from .sce import SCE
from .slerp import SLERP, MultiSLERP, NuSLERP

REQUIRED: Any = object()

# kernel(base, thetas, shared, per_model, generator): per_model has one dict per non-base input
Kernel = Callable[[Tensor | None, list[Tensor], Mapping[str, Any], list[Mapping[str, Any]], Any], Tensor]


@dataclass(frozen=True)
class Param:
    name: str
    scope: str  # "shared" | "non_base" | "input"
    kind: type
    default: Any = REQUIRED


@dataclass(frozen=True)
class MergekitMethod:
    """One mergekit method: base policy (``required``, ``optional`` or ``ignored``: the base is then an
    ordinary input), input-count bounds, parameters and the adapter to our kernel."""

    name: str
    base: str
    params: tuple[Param, ...]
    kernel: Kernel
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False

    def check_inputs(self, n_inputs: int, has_base: bool, where: str) -> None:
        """mergekit's input contract for one group of inputs (a slice), as a message naming ``where``."""
        n_non_base = n_inputs - (1 if has_base else 0)
        if self.base == "required" and not has_base:
            raise WeightsmithError(
                f"{where}: mergekit method '{self.name}' needs base_model among its inputs"
            )
        for what, n, lo, hi in (
            ("inputs", n_inputs, self.min_inputs, self.max_inputs),
            ("models besides the base", n_non_base, self.min_non_base, self.max_non_base),
        ):
            if n < lo or (hi is not None and n > hi):
                bound = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
                raise WeightsmithError(
                    f"{where}: mergekit method '{self.name}' takes {bound} {what} (got {n})"
                )


def _gta_params(extra: Param | None, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    common = (
        Param("int8_mask", "shared", bool, False),
        Param("normalize", "shared", bool, normalize),
        Param("rescale", "shared", bool, rescale),
        Param("lambda", "shared", float, 1.0),
        Param("weight", "non_base", float),
        Param("density", "non_base", float, 1.0),
    )
    return common if extra is None else (*common, extra)


def _della(elect: bool) -> Kernel:
    def run(
        base: Tensor | None,
        thetas: list[Tensor],
        s: Mapping[str, Any],
        per: list[Mapping[str, Any]],
        gen: Any,
    ) -> Tensor:
        assert base is not None
        for p in per:
            check_della(p["density"], p["epsilon"], "della")
        return della(
            base,
            thetas,
            [p["weight"] for p in per],
            [p["density"] for p in per],
            [p["epsilon"] for p in per],
            elect=elect,
            normalize=s["normalize"],
            rescale=s["rescale"],
            scaling=s["lambda"],
            generator=gen,
        )

    return run


def _breadcrumbs(elect: bool) -> Kernel:
    def run(
        base: Tensor | None,
        thetas: list[Tensor],
        s: Mapping[str, Any],
        per: list[Mapping[str, Any]],
        gen: Any,
    ) -> Tensor:
        assert base is not None
        return breadcrumbs(
            base,
            thetas,
            [p["weight"] for p in per],
            [p["density"] for p in per],
            [p["gamma"] for p in per],
            elect=elect,
            normalize=s["normalize"],
            rescale=s["rescale"],
            scaling=s["lambda"],
        )

    return run


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES trim as mergekit ranks it: the top k = max(1, floor(density n)) entries by |delta|."""
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return mask.reshape(delta.shape)


def sparsify(
    delta: Tensor, density: float, how: str | None, rescale: bool, gen: torch.Generator | None
) -> Tensor:
    """mergekit's ``magnitude`` (TIES) or ``random`` (DARE: one Bernoulli(density) draw) sparsification,
    with the L1 rescale; density >= 1 keeps everything, density <= 0 nothing (magnitude)."""
    if how is None or density >= 1:
        return delta
    if how == "magnitude":
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        mask = magnitude_mask(delta, density)
    else:
        mask = torch.bernoulli(torch.full_like(delta, density), generator=gen)
    return l1_rescale(delta, mask) if rescale else delta * mask


def _gta(elect: bool, how: str | None) -> Kernel:
    """The task-arithmetic rows (Ilharco et al. 2023; TIES, Yadav et al. 2023; DARE, Yu et al. 2024)."""

    def run(
        base: Tensor | None,
        thetas: list[Tensor],
        s: Mapping[str, Any],
        per: list[Mapping[str, Any]],
        gen: Any,
    ) -> Tensor:
        assert base is not None
        b, deltas = stack_deltas(base, thetas)
        if not thetas:
            return b
        kept = torch.stack(
            [sparsify(d, p["density"], how, s["rescale"], gen) for d, p in zip(deltas, per, strict=True)]
        )
        return combine(b, kept, _weights(per), elect=elect, normalize=s["normalize"], scaling=s["lambda"])

    return run


def _linear(
    base: Tensor | None, thetas: list[Tensor], s: Mapping[str, Any], per: list[Mapping[str, Any]], gen: Any
) -> Tensor:
    """Weighted average (Wortsman et al., "Model soups", ICML 2022): sum_i w_i theta_i [/ sum_i w_i]."""
    dt = work_dtype(thetas[0])
    w = _weights(per)
    out = sum((wi * t.to(dt) for wi, t in zip(w, thetas, strict=True)), torch.zeros_like(thetas[0], dtype=dt))
    return out / sum(w) if s["normalize"] else out


def _weights(per: Sequence[Mapping[str, Any]]) -> list[float]:
    return [float(p["weight"]) for p in per]


GTA_ROWS = {  # name: (sign election, sparsification, default normalize, default rescale)
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
}

METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        *(
            MergekitMethod(
                name,
                "required",
                _gta_params(None, normalize, rescale),
                _gta(elect, how),
                random=how == "random",
            )
            for name, (elect, how, normalize, rescale) in GTA_ROWS.items()
        ),
        MergekitMethod(
            "linear",
            "ignored",
            (Param("weight", "input", float), Param("normalize", "shared", bool, True)),
            _linear,
        ),
        MergekitMethod(
            "slerp",
            "required",
            (Param("t", "shared", float),),
            lambda b, x, s, p, g: SLERP(t=s["t"]).merge(b, x),
            min_inputs=2,
            max_inputs=2,
        ),
        MergekitMethod(
            "nuslerp",
            "optional",
            (
                Param("weight", "non_base", float),
                Param("nuslerp_row_wise", "shared", bool, False),
                Param("nuslerp_flatten", "shared", bool, True),
            ),
            lambda b, x, s, p, g: NuSLERP(row_wise=s["nuslerp_row_wise"], flatten=s["nuslerp_flatten"]).merge(
                b, x, _weights(p)
            ),
            min_non_base=2,
            max_non_base=2,
        ),
        MergekitMethod(
            "multislerp",
            "optional",
            (
                Param("weight", "non_base", float),
                Param("normalize_weights", "shared", bool, True),
                Param("eps", "shared", float, 1e-8),
            ),
            lambda b, x, s, p, g: MultiSLERP(normalize_weights=s["normalize_weights"], eps=s["eps"]).merge(
                b, x, _weights(p)
            ),
            min_non_base=1,
        ),
        MergekitMethod(
            "karcher",
            "ignored",
            (Param("max_iter", "shared", int, 10), Param("tol", "shared", float, 1e-5)),
            lambda b, x, s, p, g: Karcher(max_iter=s["max_iter"], tol=s["tol"]).merge(None, x),
        ),
        MergekitMethod(
            "model_stock",
            "required",
            (Param("filter_wise", "shared", bool, False),),
            lambda b, x, s, p, g: model_stock(b, x, s["filter_wise"]) if b is not None else x[0],
            min_inputs=3,
        ),
        MergekitMethod(
            "della",
            "required",
            _gta_params(Param("epsilon", "non_base", float, 0.15), True, True),
            _della(True),
            random=True,
        ),
        MergekitMethod(
            "della_linear",
            "required",
            _gta_params(Param("epsilon", "non_base", float, 0.15), False, True),
            _della(False),
            random=True,
        ),
        MergekitMethod(
            "breadcrumbs",
            "required",
            _gta_params(Param("gamma", "non_base", float, 0.01), False, False),
            _breadcrumbs(False),
        ),
        MergekitMethod(
            "breadcrumbs_ties",
            "required",
            _gta_params(Param("gamma", "non_base", float, 0.01), False, False),
            _breadcrumbs(True),
        ),
        MergekitMethod(
            "sce",
            "required",
            (Param("int8_mask", "shared", bool, False), Param("select_topk", "shared", float, 1.0)),
            lambda b, x, s, p, g: SCE(select_topk=s["select_topk"]).merge(b, x),
        ),
        MergekitMethod(
            "nearswap",
            "required",
            (Param("t", "shared", float),),
            lambda b, x, s, p, g: NearSwap(t=s["t"]).merge(b, x),
            min_inputs=2,
            max_inputs=2,
        ),
        MergekitMethod(
            "arcee_fusion",
            "required",
            (),
            lambda b, x, s, p, g: arcee_fusion(b, x[0], g) if b is not None else x[0],
            min_inputs=2,
            max_inputs=2,
            random=True,
        ),
        MergekitMethod(
            "ram",
            "required",
            (Param("epsilon", "shared", float, 1e-5),),
            lambda b, x, s, p, g: RAM(epsilon=s["epsilon"]).merge(b, x),
        ),
        MergekitMethod(
            "ramplus_tl",
            "required",
            (
                Param("r", "shared", float, 0.1),
                Param("alpha", "shared", float, 0.2),
                Param("epsilon", "shared", float, 1e-5),
            ),
            lambda b, x, s, p, g: RAMPlusTL(r=s["r"], alpha=s["alpha"], epsilon=s["epsilon"]).merge(b, x),
        ),
        MergekitMethod(
            "passthrough",
            "ignored",
            (Param("scale", "input", float, None),),
            lambda b, x, s, p, g: Passthrough(scale=p[0]["scale"]).merge(None, x),
            max_inputs=1,
        ),
    )
}


def method(name: str) -> MergekitMethod:
    if name not in METHODS:
        raise WeightsmithError(
            f"mergekit method '{name[:80]}' has no tensor-wise kernel; known: {', '.join(METHODS)}"
        )
    return METHODS[name]
