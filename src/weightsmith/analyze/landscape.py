"""Loss-landscape metrics: top Hessian eigenvalue, Hessian trace, mode connectivity.

Yang, Hodgkinson, Theisen, Zou, Gonzalez, Ramchandran & Mahoney, "Taxonomizing local versus global
structure in neural network loss landscapes", NeurIPS 2021 (arXiv:2107.11228), measure the *local*
shape of a trained model's loss landscape by the Hessian's top eigenvalue and trace, computed as in
PyHessian (Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks through the lens of the
Hessian", IEEE BigData 2020), and its *global* shape by mode connectivity:

- Hessian-vector product (Pearlmutter 1994): ``H v = d/dtheta (g(theta) . v)`` with ``g = dL/dtheta``, one
  double back-propagation; the Hessian is never formed.
- Top eigenvalue by power iteration: ``v_{k+1} = H v_k / ||H v_k||``, ``lambda_k = v_k^T H v_k``,
  stopped when ``|lambda_k - lambda_{k-1}| <= tol |lambda_{k-1}|``. It converges to the eigenvalue of
  largest magnitude (the top one at a minimum, where H is near positive semi-definite).
- Trace by Hutchinson's estimator (Hutchinson 1990): ``tr(H) = E[z^T H z]`` for Rademacher ``z``
  (entries +-1 with probability 1/2), averaged over ``samples`` draws.
- Mode connectivity (Yang et al. 2021, eq. 2): for a path ``gamma(t)`` from theta_1 (t = 0) to theta_2
  (t = 1), ``mc = (L(theta_1) + L(theta_2)) / 2 - L(gamma(t*))`` with
  ``t* = argmax_t |(L(theta_1) + L(theta_2)) / 2 - L(gamma(t))|``: negative when the path climbs a
  barrier (globally poorly connected), about 0 when the loss is flat along it, positive when the path
  is *below* its ends (under-trained ends). The paper trains a Bezier curve between the two models;
  here the path is the straight line after weight matching (``analyze.barrier``), an upper bound on the
  curve's loss, so our ``mc`` is at most the curve's.

Every function takes a ``loss`` closure (no arguments, returns the scalar loss that depends on
``params``), so it knows nothing of models or data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import WeightsmithError

LossFn = Callable[[], Tensor]


def hessian_vector_product(loss: LossFn, params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` for the Hessian of ``loss()`` with respect to ``params`` (one tensor per parameter)."""
    grads = torch.autograd.grad(loss(), list(params), create_graph=True)
    dot = torch.stack([(g * x).sum() for g, x in zip(grads, v, strict=True)]).sum()
    hv = torch.autograd.grad(dot, list(params), allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params, strict=True)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _normalised(v: Sequence[Tensor]) -> list[Tensor]:
    n = _dot(v, v) ** 0.5
    if n == 0.0:
        return [torch.zeros_like(x) for x in v]
    return [x / n for x in v]


@dataclass(frozen=True)
class TopEigen:
    """The largest-magnitude Hessian eigenvalue, its unit eigenvector and the iterations used."""

    eigenvalue: float
    vector: list[Tensor]
    iterations: int
    converged: bool


def top_hessian_eigenvalue(
    loss: LossFn, params: Sequence[Tensor], iters: int = 100, tol: float = 1e-4, seed: int = 0
) -> TopEigen:
    """Power iteration on Hessian-vector products from a seeded Gaussian start (PyHessian's method)."""
    if iters < 1:
        raise WeightsmithError(f"iters {iters}: the power iteration needs at least 1 step")
    if not tol > 0:
        raise WeightsmithError(f"tol {tol}: must be a positive relative tolerance")
    g = torch.Generator().manual_seed(seed)
    v = _normalised([torch.randn(p.shape, generator=g).to(p) for p in params])
    eig, prev = 0.0, None
    for k in range(1, iters + 1):
        hv = hessian_vector_product(loss, params, v)
        eig = _dot(v, hv)
        v = _normalised(hv)
        if prev is not None and abs(eig - prev) <= tol * (abs(prev) + 1e-12):
            return TopEigen(eig, v, k, True)
        prev = eig
    return TopEigen(eig, v, iters, False)


def hessian_trace(loss: LossFn, params: Sequence[Tensor], samples: int = 64, seed: int = 0) -> float:
    """Hutchinson's estimate ``mean_z z^T H z`` over ``samples`` Rademacher vectors ``z``."""
    if samples < 1:
        raise WeightsmithError(f"samples {samples}: Hutchinson's estimator needs at least 1 sample")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
        total += _dot(z, hessian_vector_product(loss, params, z))
    return total / samples


def mode_connectivity(path_loss: Sequence[float]) -> float:
    """Yang et al.'s ``mc`` from the losses at evenly spaced points of a path (ends included)."""
    if len(path_loss) < 3:
        raise WeightsmithError(f"mode connectivity needs at least 3 points on the path, got {len(path_loss)}")
    mid = (path_loss[0] + path_loss[-1]) / 2
    gaps = [mid - v for v in path_loss]
    return max(gaps, key=abs)
