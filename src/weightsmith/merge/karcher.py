"""Karcher mean on the hypersphere (mergekit's ``karcher``).

Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977; the fixed
point iteration of Buss & Fillmore, "Spherical averages and applications to spherical splines and
interpolation", ACM TOG 2001, Sec. 3: for unit directions u_i = theta_i / |theta_i| with weights a_i,

    v = sum_i a_i * theta_i/sin(theta_i) * (u_i - cos(theta_i) m),   cos(theta_i) = <m, u_i>,
    m <- cos|v| m + sin|v| v/|v|   (renormalised),

from m = the normalised weighted mean of the u_i, until |v| < tol or ``max_iter`` steps. The result is
m times the weighted mean norm sum_i a_i |theta_i|. All inputs (the base too, when given) weigh 1/N;
inputs with norm <= tol do not take part in the direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, TensorwiseMethod, Weights, work_dtype


def karcher_mean(
    tensors: Sequence[Tensor], alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """Weighted Karcher mean direction of ``tensors`` scaled by their weighted mean norm."""
    dt = work_dtype(tensors[0])
    xs = [t.to(dt) for t in tensors]
    if len(xs) == 1:
        return xs[0]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    live = [i for i, n in enumerate(norms) if float(n) > tol]
    if not live:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in live)
    a = [alphas[i] / total for i in live]
    units = [xs[i] / norms[i] for i in live]
    mean = sum((ai * u for ai, u in zip(a, units, strict=True)), torch.zeros_like(units[0]))
    mn = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        v = torch.zeros_like(mean)
        for ai, u in zip(a, units, strict=True):
            cos = torch.dot(mean.reshape(-1), u.reshape(-1)).clamp(-1.0, 1.0)
            ang = torch.arccos(cos)
            if float(ang) < tol:
                continue
            v = v + ai * (ang / torch.sin(ang)) * (u - cos * mean)
        vn = torch.linalg.vector_norm(v)
        if float(vn) < tol:
            break
        mean = torch.cos(vn) * mean + torch.sin(vn) * (v / vn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(ai * n for ai, n in zip(alphas, norms, strict=True)) * mean


@register_config("karcher", kind="merge")
class Karcher(TensorwiseMethod):
    """The equal-weight Karcher mean of all inputs (the base included when one is given)."""

    max_iter: int = 10
    tol: float = 1e-5

    base_policy = "optional"
    min_models = 1

    def __post_init__(self) -> None:
        if self.max_iter < 0 or not self.tol > 0:
            raise WeightsmithError(
                f"karcher options max_iter={self.max_iter}, tol={self.tol}: need >= 0 and > 0"
            )

    def merge(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: Weights = None, generator: Gen = None
    ) -> Tensor:
        xs = ([base] if base is not None else []) + list(thetas)
        if not xs:
            raise WeightsmithError("merge method 'karcher' needs at least one model")
        return karcher_mean(xs, [1.0 / len(xs)] * len(xs), self.max_iter, self.tol)
