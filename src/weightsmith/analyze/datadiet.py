"""Data Diet: which training examples matter, scored early in training (EL2N and GraNd).

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training",
NeurIPS 2021 (arXiv:2107.07075). For an example ``(x, y)`` and networks ``f_1 .. f_K`` trained briefly
from independent initialisations (or just initialised),

    GraNd(x, y) = mean_k || grad_w  loss(f_k(x), y) ||_2                (their eq. 2; at initialisation)
    EL2N(x, y)  = mean_k || softmax(f_k(x)) - onehot(y) ||_2           (their eq. 3; after a few epochs)

and training on the highest-scoring examples (the "hardest" ones) keeps the test accuracy at
substantial pruning better than training on a random subset of the same size. ``select_subset`` keeps
the top ``keep`` share by score, or a random one for the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError


@torch.no_grad()
def el2n_scores(models: Sequence[nn.Module], x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
    """EL2N of every example: the L2 norm of softmax error, averaged over ``models`` (eval mode)."""
    _check(models, x, y)
    total = torch.zeros(len(y), dtype=torch.float64)
    for m in models:
        was = m.training
        m.eval()
        for i in range(0, len(y), batch_size):
            p = torch.softmax(m(x[i : i + batch_size]).double(), -1)
            onehot = nn.functional.one_hot(y[i : i + batch_size], p.shape[-1]).double()
            total[i : i + batch_size] += (p - onehot).norm(dim=-1)
        m.train(was)
    return total / len(models)


def grand_scores(models: Sequence[nn.Module], x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """GraNd of every example: the norm of its loss gradient over all parameters, averaged over ``models``.

    Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` over a functional call), in
    eval mode (no BatchNorm batch statistics: each example is scored alone).
    """
    from torch.func import functional_call, grad, vmap

    _check(models, x, y)
    total = torch.zeros(len(y), dtype=torch.float64)
    for m in models:
        was = m.training
        m.eval()
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor, m: nn.Module = m) -> Tensor:
            out = functional_call(m, p, (xi[None],))
            return nn.functional.cross_entropy(out, yi[None])

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        for i in range(0, len(y), batch_size):
            g = per_example(params, x[i : i + batch_size], y[i : i + batch_size])
            sq = sum(t.double().flatten(1).pow(2).sum(-1) for t in g.values())
            total[i : i + batch_size] += torch.as_tensor(sq).sqrt()
        m.train(was)
    return total / len(models)


def select_subset(scores: Tensor, keep: float, how: str = "top", seed: int = 0) -> Tensor:
    """Indices of the examples kept: the ``keep`` share with the highest scores, or a random share."""
    if not 0.0 < keep <= 1.0:
        raise WeightsmithError(f"keep {keep}: the kept share must be in (0, 1]")
    n = max(1, round(keep * len(scores)))
    if how == "top":
        return torch.argsort(scores, descending=True, stable=True)[:n]
    if how == "random":
        return torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))[:n]
    raise WeightsmithError(f"how {how!r}: use 'top' or 'random'")


def _check(models: Sequence[nn.Module], x: Tensor, y: Tensor) -> None:
    if not models:
        raise WeightsmithError("no model to score the examples with")
    if len(x) != len(y):
        raise WeightsmithError(f"{len(x)} inputs but {len(y)} labels")
