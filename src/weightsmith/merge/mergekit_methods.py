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
from ._tensorwise import combine, inputs_owned, l1_rescale, task_vectors, work_dtype
from .arcee_fusion import arcee_fusion
from .breadcrumbs import breadcrumbs_prune
from .della import check_della, magprune
from .karcher import Karcher
from .model_stock import model_stock
from .nearswap import NearSwap
from .passthrough import Passthrough
from .ram import RAM, RAMPlusTL
from .sce import SCE
from .slerp import SLERP, MultiSLERP, NuSLERP

REQUIRED: Any = object()

# kernel(base, thetas, shared, per_model, generator): per_model has one dict per non-base input
Params = Mapping[str, Any]  # one level of a mergekit config's parameters, resolved for one tensor
Kernel = Callable[[Tensor | None, list[Tensor], Params, list[Params], Any], Tensor]


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
    writes_dtype: bool = False  # the kernel takes ``out_dtype=`` and writes that dtype piece by piece

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


def _prune(delta: Tensor, p: Mapping[str, Any], how: str | None, rescale: bool, gen: Any) -> Tensor:
    """One task vector sparsified by a row's method: ``della`` (MagPrune, per-model ``epsilon``),
    ``breadcrumbs`` (per-model ``gamma``) or :func:`sparsify`'s ``magnitude`` / ``random`` / None."""
    if how == "della":
        check_della(p["density"], p["epsilon"], "della")
        return magprune(delta, p["density"], p["epsilon"], rescale, gen)
    if how == "breadcrumbs":
        return breadcrumbs_prune(delta, p["density"], p["gamma"], rescale)
    return sparsify(delta, p["density"], how, rescale, gen)


def _gta(elect: bool, how: str | None) -> Kernel:
    """The task-arithmetic rows (Ilharco et al. 2023; TIES, Yadav et al. 2023; DARE, Yu et al. 2024; DELLA,
    Deep et al. 2024; Model Breadcrumbs, Davari & Belilovsky 2024): sparsify each task vector, combine."""

    def run(
        base: Tensor | None,
        thetas: list[Tensor],
        s: Params,
        per: list[Params],
        gen: Any,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        assert base is not None
        if not thetas:
            return base.to(out_dtype or work_dtype(base))
        deltas = task_vectors(base, thetas)  # against the base itself: no widened whole copy of it
        for i, (d, p) in enumerate(zip(deltas, per, strict=True)):  # pruned in place: no second stack
            deltas[i] = _prune(d, p, how, s["rescale"], gen)
        w = weights(per)
        return combine(
            base, deltas, w, elect=elect, normalize=s["normalize"], scaling=s["lambda"], out_dtype=out_dtype
        )

    return run


def _linear(
    base: Tensor | None, thetas: list[Tensor], s: Mapping[str, Any], per: list[Mapping[str, Any]], gen: Any
) -> Tensor:
    """Weighted average (Wortsman et al., "Model soups", ICML 2022): sum_i w_i theta_i [/ sum_i w_i]."""
    dt = work_dtype(thetas[0])
    w = weights(per)
    out = sum((wi * t.to(dt) for wi, t in zip(w, thetas, strict=True)), torch.zeros_like(thetas[0], dtype=dt))
    return out / sum(w) if s["normalize"] else out


def _interpolate(method: type[SLERP] | type[NearSwap]) -> Kernel:
    """The kernel of a two-input method with mergekit's shared ``t`` (SLERP, NearSwap)."""

    def run(
        b: Tensor | None,
        x: list[Tensor],
        s: Params,
        p: list[Params],
        g: Any,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        return method(t=s["t"]).merge_as(b, x, None, None, out_dtype or work_dtype(x[0]))

    return run


def _model_stock(
    b: Tensor | None,
    x: list[Tensor],
    s: Params,
    p: list[Params],
    g: Any,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Model Stock (Jang et al. 2024) of the base and the models; without a base, the first model."""
    if b is None:
        return x[0]
    return model_stock(b, x, s["filter_wise"], out_dtype=out_dtype, into_base=inputs_owned())


def weights(per: Sequence[Params]) -> list[float]:
    """Each model's ``weight`` parameter."""
    return [float(p["weight"]) for p in per]


_EPSILON = Param("epsilon", "non_base", float, 0.15)
_GAMMA = Param("gamma", "non_base", float, 0.01)

# name: (sign election, sparsification, default normalize, default rescale, per-model option)
GTA_ROWS: dict[str, tuple[bool, str | None, bool, bool, Param | None]] = {
    "task_arithmetic": (False, None, False, False, None),
    "ties": (True, "magnitude", True, False, None),
    "dare_ties": (True, "random", False, True, None),
    "dare_linear": (False, "random", False, True, None),
    "della": (True, "della", True, True, _EPSILON),
    "della_linear": (False, "della", False, True, _EPSILON),
    "breadcrumbs": (False, "breadcrumbs", False, False, _GAMMA),
    "breadcrumbs_ties": (True, "breadcrumbs", False, False, _GAMMA),
}

METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        *(
            MergekitMethod(
                name,
                "required",
                _gta_params(extra, normalize, rescale),
                _gta(elect, how),
                random=how in ("random", "della"),
                writes_dtype=True,
            )
            for name, (elect, how, normalize, rescale, extra) in GTA_ROWS.items()
        ),
        MergekitMethod(
            "linear",
            "ignored",
            (Param("weight", "input", float), Param("normalize", "shared", bool, True)),
            _linear,
        ),
        *(  # the base and one model, interpolated by t
            MergekitMethod(
                name,
                "required",
                (Param("t", "shared", float),),
                _interpolate(two),
                min_inputs=2,
                max_inputs=2,
                writes_dtype=True,
            )
            for name, two in (("slerp", SLERP), ("nearswap", NearSwap))
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
                b, x, weights(p)
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
                b, x, weights(p)
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
            _model_stock,
            min_inputs=3,
            writes_dtype=True,
        ),
        MergekitMethod(
            "sce",
            "required",
            (Param("int8_mask", "shared", bool, False), Param("select_topk", "shared", float, 1.0)),
            lambda b, x, s, p, g: SCE(select_topk=s["select_topk"]).merge(b, x),
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
