"""Shared random bases of VeRA, NOLA and RandLoRA: i.i.d. entries (the papers' default) or orthogonal.

With ``basis="orthogonal"`` a shared basis of shape ``[m, *rest]`` is drawn as a Haar-random matrix
``Q`` [m, n] (``n = prod(rest)``) with orthonormal rows (``m <= n``) or columns (``m > n``), scaled so its
mean squared entry equals the i.i.d. draw's variance ``v``:

    Q = qr(G) · diag(sign(diag(R))),  G ~ N(0, 1)^{max(m,n) x min(m,n)},    basis = sqrt(max(m, n) · v) · Q

The sign fix makes ``Q`` Haar-distributed (Mezzadri, "How to generate random matrices from the classical
compact groups", Notices of the AMS 2007, eq. 5.1); the scale keeps ``‖basis‖_F² = m n v``, the i.i.d.
draw's expected energy, so learning rates carry over. Random orthogonal matrices as the shared operators
of a distributed representation are MBAT's ("Representing Objects, Relations, and Sequences", Gallant &
Okaywe, Neural Computation 2013); replacing i.i.d. Gaussian projections by orthogonal ones lowers the
variance of random-feature estimates (Yu et al., "Orthogonal Random Features", NeurIPS 2016). What it
buys here: VeRA's ``A``, ``B`` (rank r) span r exactly orthogonal directions, NOLA's k bases are
orthonormal as vectors of ``R^{out·r}`` (the map coefficients -> factor is an isometry up to scale), and
RandLoRA's n concatenated ``B_i`` have orthonormal columns, so its sum of n rank-r terms is exactly
full rank. Layers that slice a smaller top-left block of a shared basis (VeRA, RandLoRA with layers of
mixed shapes) get a block of an orthogonal matrix: near-orthogonal, not exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ._core import SharedBases

BASES = ("random", "orthogonal")

Factory = Callable[[torch.Generator], Tensor]


def check_basis(basis: str, method: str) -> None:
    """Refuse an unknown ``basis`` option, naming it."""
    if basis not in BASES:
        raise WeightsmithError(f"{method} option basis={basis!r}: use one of {', '.join(BASES)}")


def haar_orthogonal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """A Haar-random ``[rows, cols]`` matrix with orthonormal rows (rows <= cols) or columns (float32)."""
    m, n = max(rows, cols), min(rows, cols)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    d = torch.sign(torch.diagonal(R))
    Q = Q * torch.where(d == 0, torch.ones_like(d), d)
    return (Q if rows >= cols else Q.T).float().contiguous()


def orthogonal_basis(shape: tuple[int, ...], variance: float) -> Factory:
    """Factory: ``shape[0]`` x ``prod(shape[1:])`` scaled Haar-orthogonal matrix (module docstring)."""
    m, n = shape[0], math.prod(shape[1:])

    def make(g: torch.Generator) -> Tensor:
        return (haar_orthogonal(m, n, g) * math.sqrt(max(m, n) * variance)).reshape(shape)

    return make


def draw_basis(
    shared: SharedBases, key: str, basis: str, shape: tuple[int, ...], variance: float, iid: Factory
) -> Tensor:
    """The shared basis ``key``: ``iid`` (the method's own draw, entry variance ``variance``; its key and
    so its values unchanged) or, for ``basis="orthogonal"``, the scaled orthogonal draw under its own key."""
    if basis == "orthogonal":
        return shared.get(f"{key}.orthogonal", shape, orthogonal_basis(shape, variance))
    return shared.get(key, shape, iid)


def refuse_unsaved_projection(peft_config: Mapping[str, Any], method: str, why: str = "") -> None:
    """PEFT files written with ``save_projection=false`` hold no bases: they cannot be read exactly."""
    if peft_config.get("save_projection") is False:
        raise WeightsmithError(
            f"{method} saved with save_projection=false: its random bases are not in the file{why}; "
            "save it again with save_projection=true"
        )
