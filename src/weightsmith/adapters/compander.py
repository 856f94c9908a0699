"""Weight compander: train every weight through a fixed non-linear reparameterisation ``w = f(v)``.

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

Scope: ``α`` and ``β`` are fixed for a run (set per call). The exact compander equation of the paper
could not be consulted offline when this was written; the function above has the two properties its
abstract states (bounded growth of large weights, a push away from zero).

Built on ``torch.nn.utils.parametrize``; this module registers no adapter config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import WeightsmithError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _check(alpha: float, beta: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise WeightsmithError(f"compander alpha must be in (0, 1], got {alpha}")
    if not beta > 0.0:
        raise WeightsmithError(f"compander beta must be > 0, got {beta}")


def compand(v: Tensor, alpha: float, beta: float) -> Tensor:
    """``f(v) = sign(v) ((|v| + β)^α − β^α)``."""
    return torch.sign(v) * ((v.abs() + beta) ** alpha - beta**alpha)


def expand(w: Tensor, alpha: float, beta: float) -> Tensor:
    """``f⁻¹(w) = sign(w) ((|w| + β^α)^{1/α} − β)``."""
    return torch.sign(w) * ((w.abs() + beta**alpha) ** (1.0 / alpha) - beta)


def compand_derivative(v: Tensor, alpha: float, beta: float) -> Tensor:
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


def apply_compander(
    model: nn.Module,
    alpha: float = 0.5,
    beta: float = 0.01,
    types: Iterable[type[nn.Module]] = DEFAULT_TYPES,
) -> list[str]:
    """Reparameterise the ``weight`` of every module of ``types`` as ``f(v)``; returns their names.

    The trainable tensor becomes ``<module>.parametrizations.weight.original`` (= ``v``); biases are
    left as they are. A module already companded raises."""
    _check(alpha, beta)
    kinds = tuple(types)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and isinstance(getattr(module, "weight", None), Tensor):
            if parametrize.is_parametrized(module, "weight"):
                raise WeightsmithError(f"compander: '{name}.weight' is already parametrized")
            parametrize.register_parametrization(module, "weight", Compander(alpha, beta))
            names.append(name)
    if not names:
        raise WeightsmithError(f"compander: no module of types {[k.__name__ for k in kinds]} in the model")
    return names


def remove_compander(model: nn.Module) -> list[str]:
    """Replace every compander parametrization by the plain weight ``f(v)``; returns the module names."""
    names = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, Compander) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            names.append(name)
    return names
