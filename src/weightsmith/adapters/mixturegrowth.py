"""MixtureGrowth: grow a network wider by recombining learned weights into the new weights.

Pham, Teterwak, Nelson & Plummer, "MixtureGrowth: Growing Neural Networks by Recombining Learned
Parameters", WACV 2024, arXiv:2311.04251. Each layer's weight is a linear combination of templates,
``W = Σ_k c_k T_k``. Before growth, ``n`` small networks are trained; after growth each layer of the
``n``-times-wider network is an ``n × n`` grid of blocks. The diagonal blocks are the small networks'
own layers, and every new (off-diagonal) block is a new combination of the learned templates:

    W_ii = T_i,     W_ij = Σ_k c_ij,k T_k   (i ≠ j)

Here the templates of a layer are the ``n`` trained small networks' weights of that layer (a template
bank in which each small network's coefficients are one-hot), and ``c_ij`` is drawn uniformly from the
probability simplex (seeded), so a new block has the scale of a trained one. This is a simplification:
the paper trains explicit template banks with learned coefficients before and after growth, which
:mod:`weightsmith.adapters.mixturegrowth_bank` implements. The first
layer stacks the networks' rows (every input is shared), the last layer averages their outputs
(``W_out = [T_1 … T_n] / n``), so with ``new="zero"`` the grown network computes exactly the mean of the
small networks' logits. ``new="random"`` initialises the new blocks like ``nn.Linear`` of the grown width
(the paper's baseline: growing with randomly initialised new weights).

This module registers no adapter config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError
from ..zoo import MLP

NEW_BLOCKS = ("mixture", "random", "zero")


def combine(templates: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """``Σ_k coefficients[k] · templates[k]``."""
    if len(templates) != len(coefficients):
        raise WeightsmithError(
            f"MixtureGrowth: {len(coefficients)} coefficients for {len(templates)} templates"
        )
    return sum(
        (c * t for c, t in zip(coefficients.tolist(), templates, strict=True)), torch.zeros_like(templates[0])
    )


def _new_block(templates: Sequence[Tensor], new: str, fan_in: int, g: torch.Generator) -> Tensor:
    if new == "zero":
        return torch.zeros_like(templates[0])
    if new == "random":  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) at the grown fan-in
        bound = fan_in**-0.5
        return (torch.rand(templates[0].shape, generator=g) * 2 - 1).mul_(bound).to(templates[0])
    c = -torch.rand(
        len(templates), generator=g, dtype=torch.float64
    ).log()  # Exp(1) / sum: uniform on simplex
    return combine(templates, (c / c.sum()).float())


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise WeightsmithError(f"MixtureGrowth: '{name}' is not a Linear layer with a bias")
    return module


@torch.no_grad()
def grow(small: Sequence[MLP], new: str = "mixture", seed: int = 0) -> MLP:
    """An MLP ``n`` times as wide as the ``n`` equal-architecture zoo MLPs in ``small``: diagonal blocks
    are their trained layers, new blocks are initialised by ``new`` ("mixture": a random convex
    combination of the layer's templates; "random": ``nn.Linear``'s init; "zero")."""
    if new not in NEW_BLOCKS:
        raise WeightsmithError(f"MixtureGrowth new must be one of {', '.join(NEW_BLOCKS)}, got '{new}'")
    if len(small) < 2:
        raise WeightsmithError(f"MixtureGrowth needs at least 2 small networks, got {len(small)}")
    if any(not isinstance(m, MLP) for m in small):
        raise WeightsmithError("MixtureGrowth grows zoo MLPs (weightsmith.zoo.MLP) only")
    archs = {(m.in_dim, m.hidden, _linear(m, m.linear_names()[-1]).out_features) for m in small}
    if len(archs) != 1:
        raise WeightsmithError(f"MixtureGrowth: the small networks differ in architecture: {sorted(archs)}")
    in_dim, hidden, n_classes = archs.pop()
    n = len(small)
    big = MLP(in_dim, tuple(h * n for h in hidden), n_classes).to(_linear(small[0], "net.0").weight.device)
    g = torch.Generator().manual_seed(seed)
    names = big.linear_names()
    for li, name in enumerate(names):
        layers = [_linear(m, name) for m in small]
        W: list[Tensor] = [lin.weight for lin in layers]
        b: list[Tensor] = [lin.bias for lin in layers]
        target = _linear(big, name)
        if li == 0:
            target.weight.copy_(torch.cat(W, 0))
            target.bias.copy_(torch.cat(b))
        elif li == len(names) - 1:
            target.weight.copy_(torch.cat(W, 1) / n)
            target.bias.copy_(torch.stack(b).mean(0))
        else:
            rows = [
                torch.cat(
                    [W[i] if i == j else _new_block(W, new, target.in_features, g) for j in range(n)], 1
                )
                for i in range(n)
            ]
            target.weight.copy_(torch.cat(rows, 0))
            target.bias.copy_(torch.cat(b))
    return big.eval()
