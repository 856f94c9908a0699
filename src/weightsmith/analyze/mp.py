"""Marchenko-Pastur bulk fit of an ESD: the bulk edge, the number of spikes and the MP soft rank.

Marchenko & Pastur, "Distribution of eigenvalues for some sets of random matrices", Math. USSR-Sbornik
1(4), 1967: for an N x M random matrix with i.i.d. entries of variance sigma^2 and Q = N / M >= 1, the
eigenvalues of ``W^T W / N`` fill ``[sigma^2 (1 - 1/sqrt(Q))^2, sigma^2 (1 + 1/sqrt(Q))^2]``. Martin &
Mahoney (JMLR 2021, arXiv:1810.01075) fit sigma to a trained layer's ESD, count the eigenvalues beyond
the bulk edge plus a Tracy-Widom margin as spikes, and define the MP soft rank ``lambda_plus /
lambda_max``. The fit follows WeightWatcher 0.7.x's conventions so the numbers are comparable: the ESD
is rescaled to mean 1, its density is a linear-kernel KDE (bandwidth 0.1) on 1000 points, sigma is the
least-squares choice on a grid of 195 values in [0.05, 2) x the sigma implied by lambda_max, refined
locally (WeightWatcher polishes with Nelder-Mead; we use a fine grid around the best grid point).
For Q = 1 the singular values are fitted to the quarter-circle law instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
DENSITY_FLOOR = 0.01  # KDE points below this density are left out of the residual
INVALID = 1000.0  # residual per point for a sigma whose MP support is impossible


@dataclass(frozen=True)
class MPFit:
    sigma: Tensor  # fitted MP scale (of the ESD rescaled to mean 1)
    bulk_max: Tensor  # lambda_plus in the original (unrescaled) units
    num_spikes: Tensor  # eigenvalues above lambda_plus plus the Tracy-Widom margin
    mp_softrank: Tensor  # lambda_plus / lambda_max


def _kde(points: Tensor, data: Tensor, h: float) -> Tensor:
    """Linear-kernel density estimate of each row of ``data`` (B, n) at ``points`` (B, P).

    ``sum_i max(0, 1 - |x - d_i| / h)`` is evaluated exactly from counts and prefix sums of the sorted
    data in ``(x - h, x]`` and ``[x, x + h)``, in O(P log n) instead of O(P n).
    """
    d = torch.sort(data, dim=-1).values
    csum = torch.nn.functional.pad(torch.cumsum(d, -1), (1, 0))

    def rank(v: Tensor, right: bool) -> Tensor:
        return torch.searchsorted(d, v.contiguous(), right=right)

    at_lo, at_x, at_x_r, at_hi = (
        rank(points - h, True),
        rank(points, False),
        rank(points, True),
        rank(points + h, False),
    )
    c1 = (at_x_r - at_lo).to(d.dtype)  # d in (x - h, x]
    s1 = csum.gather(-1, at_x_r) - csum.gather(-1, at_lo)
    c2 = (at_hi - at_x).to(d.dtype)  # d in [x, x + h)
    s2 = csum.gather(-1, at_hi) - csum.gather(-1, at_x)
    ties = (at_x_r - at_x).to(d.dtype)  # d == x falls in both windows with weight 1
    total = c1 - (c1 * points - s1) / h + c2 - (s2 - c2 * points) / h - ties
    return total / (d.shape[-1] * h)


def _quarter_circle(x: Tensor, sigma: Tensor) -> Tensor:
    return torch.sqrt((4 - x**2).clamp_min(0)) / (math.pi * sigma**2)


@dataclass(frozen=True)
class _Curve:
    """The KDE of a batch of ESDs reduced to what the residual needs (all (B, 1, P) or (B, 1, 1))."""

    x: Tensor
    w: Tensor  # good * Q / (2 pi x): the MP density is sqrt((b - x)(x - a)) * w / sigma^2
    gy: Tensor  # good * y
    n_good: Tensor
    peak: Tensor  # x of the first KDE maximum among the good points
    top: Tensor  # largest good x

    def rows(self, i: int, j: int, lo: int = 0, hi: int | None = None) -> _Curve:
        return _Curve(*(t[i:j, :, lo:hi] if t.shape[-1] > 1 else t[i:j] for t in self.__dict__.values()))


def _curve(x: Tensor, y: Tensor, Q: float) -> _Curve:
    good = y > DENSITY_FLOOR
    ym = torch.where(good, y, torch.full_like(y, -1.0))
    peak = torch.gather(x, -1, ym.argmax(-1, keepdim=True))
    top = torch.where(good, x, torch.full_like(x, -math.inf)).amax(-1, keepdim=True)
    g = good.to(x.dtype)
    w = g if Q == 1 else g * (Q / (2 * math.pi)) / x.clamp_min(1e-300)
    return _Curve(
        x[:, None], w[:, None], (g * y)[:, None], g.sum(-1)[:, None, None], peak[:, None], top[:, None]
    )


def _sse(sigma: Tensor, c: _Curve, Q: float) -> Tensor:
    """Sum of squared residuals (B, S) of the MP (or quarter-circle) curve, sigma (B, S, 1), against the
    KDE on its good points; a sigma whose support cannot be the bulk's gets a fixed large penalty."""
    if Q == 1:
        r = _quarter_circle(c.x, sigma) * c.w - c.gy
        return (r * r).sum(-1)
    b = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    a = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    r = (b - c.x) * (c.x - a)  # <= 0 outside the support [a, b]: the density is 0 there
    r = r.clamp_min_(0).sqrt_().mul_(c.w).mul_(sigma**-2).sub_(c.gy)
    r2 = torch.linalg.vecdot(r, r)
    bad = (b < c.peak) | (b > c.top) | (a > c.peak)
    return torch.where(bad[..., 0], (INVALID**2 * c.n_good[..., 0]).expand_as(r2), r2)


def _argmin_sigma(sig: Tensor, c: _Curve, Q: float) -> Tensor:
    """The sigma of each row of ``sig`` (B, S) with the least residual, shape (B, 1).

    On CPU one row at a time over only the span of its good KDE points (the work then stays in cache);
    on CUDA the whole batch at once (no host synchronisation).
    """
    if sig.is_cuda:
        return sig.gather(-1, _sse(sig[..., None], c, Q).argmin(-1, keepdim=True))
    good = c.w[:, 0] > 0
    span = torch.stack([good.int().argmax(-1), good.shape[-1] - good.flip(-1).int().argmax(-1)], -1).tolist()
    out = []
    for i, (lo, hi) in enumerate(span):
        sse = _sse(sig[i : i + 1, :, None], c.rows(i, i + 1, lo, hi), Q)
        out.append(sig[i : i + 1].gather(-1, sse.argmin(-1, keepdim=True)))
    return torch.cat(out)


def marchenko_pastur_fit(evals: Tensor, N: int, M: int) -> MPFit:
    """Fit the MP bulk to each row of ``evals`` (B, M): all M eigenvalues of an N x M matrix."""
    ev = evals.to(torch.float64)
    B, m = ev.shape
    Q = N / M
    scale = m / ev.sum(-1, keepdim=True)
    to_plot = ev * scale  # ESD rescaled to mean 1
    lam_max = to_plot.amax(-1)
    data = to_plot.sqrt() if Q == 1 else to_plot
    steps = torch.linspace(0, 1, KDE_POINTS, dtype=ev.dtype, device=ev.device)
    x = steps[None, :] * (data.amax(-1, keepdim=True) + 0.5)  # (B, P)
    y = _kde(x, data, KDE_BANDWIDTH)
    curve = _curve(x, y, Q)

    s0 = torch.sqrt(lam_max / (1 + 1 / math.sqrt(Q)) ** 2)[:, None]  # sigma if lambda_max were the edge
    grid = torch.arange(195, dtype=ev.dtype, device=ev.device)[None, :] * 0.01 + 0.05
    best = _argmin_sigma(grid * s0, curve, Q)  # (B, 1)
    fine = best + torch.linspace(-0.01, 0.01, 41, dtype=ev.dtype, device=ev.device)[None, :] * s0
    sigma = _argmin_sigma(fine.clamp_min(1e-12), curve, Q)[:, 0]

    bulk_max = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    tw = 1 / math.sqrt(Q) * bulk_max ** (2 / 3) * M ** (-2 / 3)
    num_spikes = (to_plot > (bulk_max + tw.sqrt())[:, None]).sum(-1)
    return MPFit(
        sigma=sigma,
        bulk_max=bulk_max / scale[:, 0],
        num_spikes=num_spikes,
        mp_softrank=bulk_max / lam_max,
    )
