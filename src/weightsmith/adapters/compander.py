"""Weight compander: train every weight through a non-linear reparameterisation ``w = f(v)``.

Cakaj, Mehnert & Yang, "Weight Compander: A Simple Weight Reparameterization for Regularization",
IJCNN 2023, arXiv:2306.16993. The network's weight is ``w = f(v)`` with ``f`` odd, monotone and
concave in ``|v|``: steep at zero, so near-zero ("dead") weights are pushed away from zero, and
flattening for large ``|v|``, so no single weight grows large. An existing training loop trains ``v``.
We use the power compander with an offset (the function of the paper's family we implement):

    w = f(v) = sign(v) · ((|v| + β)^α − β^α),           0 < α ≤ 1, β > 0
    v = f⁻¹(w) = sign(w) · ((|w| + β^α)^{1/α} − β)
    f'(v) = α (|v| + β)^{α−1}                          (f'(0) = α β^{α−1}, decreasing in |v|)

``α = 1`` is the identity. ``v`` is initialised as ``f⁻¹(w)`` so the model is unchanged when the
compander is applied, and :func:`remove_compander` bakes ``f(v)`` back into plain weights.

By default ``α`` and ``β`` are fixed for a run (set per call). The paper also learns the compander's
hyperparameters with the network ("We extend our method to learn the hyperparameters", abstract);
``apply_compander(..., learn=True)`` gives every companded layer its own trainable scalar pair,
kept in range by a smooth reparameterisation of two unconstrained parameters ``a, b``:

    α = α_min + (1 − α_min) · sigmoid(a),   β = β_min + softplus(b)       (α ∈ [α_min, 1], β ≥ β_min)
    ∂f/∂α = sign(v) ((|v| + β)^α ln(|v| + β) − β^α ln β)
    ∂f/∂β = sign(v) α ((|v| + β)^{α−1} − β^{α−1})

``a, b`` start where ``α, β`` equal the values given, and the small floors ``α_min, β_min`` keep the
range strict even when a huge step saturates the sigmoid or softplus in floating point. By default one
pair per weight (per layer); ``per_channel=True`` gives every output channel (row of a Linear weight,
filter of a convolution) its own pair ``α_r, β_r``, applied to that row's entries:

    w_rj = sign(v_rj) ((|v_rj| + β_r)^{α_r} − β_r^{α_r})

The granularity the paper uses could not be checked offline; both are offered.

The exact compander equation of the paper could not be consulted offline when this was written; the
function above has the two properties its abstract states (bounded growth of large weights, a push
away from zero).

Built on ``torch.nn.utils.parametrize``; this module registers no adapter config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import WeightsmithError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
ALPHA_MIN = 1e-2  # floors of the learnable form: alpha in [ALPHA_MIN, 1], beta >= BETA_MIN
BETA_MIN = 1e-6


def _check(alpha: float, beta: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise WeightsmithError(f"compander alpha must be in (0, 1], got {alpha}")
    if not beta > 0.0:
        raise WeightsmithError(f"compander beta must be > 0, got {beta}")


def compand(v: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """``f(v) = sign(v) ((|v| + β)^α − β^α)``."""
    return torch.sign(v) * ((v.abs() + beta) ** alpha - beta**alpha)


def expand(w: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """``f⁻¹(w) = sign(w) ((|w| + β^α)^{1/α} − β)``."""
    return torch.sign(w) * ((w.abs() + beta**alpha) ** (1.0 / alpha) - beta)


def compand_derivative(v: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """``f'(v) = α (|v| + β)^{α−1}``."""
    return alpha * (v.abs() + beta) ** (alpha - 1.0)


class Compander(nn.Module):
    """The parametrization ``v -> f(v)`` (``right_inverse`` = ``f⁻¹``, so applying it keeps ``w``)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.01) -> None:
        super().__init__()
        _check(alpha, beta)
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, v: Tensor) -> Tensor:
        return compand(v, self.alpha, self.beta)

    def right_inverse(self, w: Tensor) -> Tensor:
        return expand(w, self.alpha, self.beta)


class LearnableCompander(nn.Module):
    """``v -> f(v; α, β)`` with ``α = α_min + (1 − α_min) sigmoid(a)``, ``β = β_min + softplus(b)`` and
    ``a, b`` trainable scalars (state-dict keys ``…parametrizations.weight.0.a`` / ``.b``), initialised so
    that ``α, β`` equal the given values. ``right_inverse`` uses the current ``α, β`` (detached).
    ``shape`` is the shape of ``a, b``: ``()`` for one pair per weight, ``(out, 1, …)`` for one pair per
    output channel (broadcast over the rest of the weight)."""

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.01,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        _check(alpha, beta)
        if not ALPHA_MIN < alpha < 1.0:
            raise WeightsmithError(
                f"compander alpha must be in ({ALPHA_MIN}, 1) with learn=True, got {alpha}"
            )
        if not beta > BETA_MIN:
            raise WeightsmithError(f"compander beta must be > {BETA_MIN} with learn=True, got {beta}")
        s = (alpha - ALPHA_MIN) / (1.0 - ALPHA_MIN)
        a0 = math.log(s / (1.0 - s))  # logit
        b0 = math.log(math.expm1(beta - BETA_MIN))  # softplus inverse
        self.a = nn.Parameter(torch.full(shape, a0, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.full(shape, b0, dtype=dtype, device=device))

    @property
    def alpha(self) -> Tensor:
        # = α_min + (1 − α_min) sigmoid(a), written so that a saturated sigmoid gives α = 1 exactly
        return 1.0 - (1.0 - ALPHA_MIN) * torch.sigmoid(-self.a)

    @property
    def beta(self) -> Tensor:
        return BETA_MIN + nn.functional.softplus(self.b)

    def forward(self, v: Tensor) -> Tensor:
        return compand(v, self.alpha, self.beta)

    def right_inverse(self, w: Tensor) -> Tensor:
        return expand(w, self.alpha.detach(), self.beta.detach())


COMPANDERS = (Compander, LearnableCompander)


def _mean(value: float | Tensor) -> float:
    return float(value.mean()) if isinstance(value, Tensor) else float(value)


def compander_values(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{module name: (α, β)}`` of every companded weight of ``model`` (learned or fixed; the means over
    the channels of a per-channel compander, whose values are its ``alpha`` / ``beta`` tensors)."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, COMPANDERS):
                    with torch.no_grad():
                        out[name] = (_mean(p.alpha), _mean(p.beta))
    return out


def apply_compander(
    model: nn.Module,
    alpha: float = 0.5,
    beta: float = 0.01,
    types: Iterable[type[nn.Module]] = DEFAULT_TYPES,
    learn: bool = False,
    per_channel: bool = False,
) -> list[str]:
    """Reparameterise the ``weight`` of every module of ``types`` as ``f(v)``; returns their names.

    The trainable tensor becomes ``<module>.parametrizations.weight.original`` (= ``v``); biases are
    left as they are. A module already companded raises. ``learn=True`` makes ``α, β`` trainable per
    layer (:class:`LearnableCompander`, in ``model.parameters()``; exclude them from weight decay, which
    would pull ``a, b`` towards 0, i.e. ``α ≈ ½, β ≈ ln 2``). ``per_channel=True`` (with ``learn``)
    gives each output channel (dimension 0 of the weight) its own trainable ``α, β``."""
    _check(alpha, beta)
    if per_channel and not learn:
        raise WeightsmithError("compander per_channel=True needs learn=True (fixed α, β are one pair)")
    kinds = tuple(types)
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and isinstance(weight, Tensor):
            if parametrize.is_parametrized(module, "weight"):
                raise WeightsmithError(f"compander: '{name}.weight' is already parametrized")
            comp = (
                LearnableCompander(
                    alpha,
                    beta,
                    torch.promote_types(weight.dtype, torch.float32),
                    weight.device,
                    (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else (),
                )
                if learn
                else Compander(alpha, beta)
            )
            parametrize.register_parametrization(module, "weight", comp)
            names.append(name)
    if not names:
        raise WeightsmithError(f"compander: no module of types {[k.__name__ for k in kinds]} in the model")
    return names


def remove_compander(model: nn.Module) -> list[str]:
    """Replace every compander parametrization by the plain weight ``f(v)``; returns the module names."""
    names = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, COMPANDERS) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            names.append(name)
    return names
