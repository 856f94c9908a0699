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


def _mp_density(x: Tensor, Q: float, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MP density at ``x`` (B, 1, P) for ``sigma`` (B, S, 1); zero outside the support [a, b]."""
    b = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    a = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    inside = (x > a) & (x < b)
    val = torch.sqrt(((b - x) * (x - a)).clamp_min(0)) / (2 * math.pi * sigma**2 * x.clamp_min(1e-300) / Q)
    return torch.where(inside, val, torch.zeros_like(val)), a, b


def _quarter_circle(x: Tensor, sigma: Tensor) -> Tensor:
    return torch.sqrt((4 - x**2).clamp_min(0)) / (math.pi * sigma**2)


def _sse(sigma: Tensor, x: Tensor, y: Tensor, good: Tensor, Q: float) -> Tensor:
    """Sum of squared residuals (B, S) of the MP (or quarter-circle) curve against the KDE."""
    if Q == 1:
        r = _quarter_circle(x, sigma) - y
        return torch.where(good, r**2, torch.zeros_like(r)).sum(-1)
    val, a, b = _mp_density(x, Q, sigma)
    r2 = torch.where(good, (val - y) ** 2, torch.zeros_like(val)).sum(-1)
    ym = torch.where(good, y, torch.full_like(y, -1.0))
    peak = torch.gather(x.expand_as(ym), -1, ym.argmax(-1, keepdim=True))  # first KDE maximum
    top = torch.where(good, x.expand_as(good), torch.full_like(y, -math.inf)).amax(-1, keepdim=True)
    bad = (b < peak) | (b > top) | (a > peak)
    penalty = INVALID**2 * good.sum(-1).to(r2.dtype)
    return torch.where(bad[..., 0], penalty.expand_as(r2), r2)


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
    good = (y > DENSITY_FLOOR)[:, None, :]
    x3, y3 = x[:, None, :], y[:, None, :]

    s0 = torch.sqrt(lam_max / (1 + 1 / math.sqrt(Q)) ** 2)[:, None]  # sigma if lambda_max were the edge
    grid = torch.arange(195, dtype=ev.dtype, device=ev.device)[None, :] * 0.01 + 0.05
    sig = grid * s0  # (B, 195)
    sse = _sse(sig[..., None], x3, y3, good, Q)
    best = sig.gather(-1, sse.argmin(-1, keepdim=True))
    fine = best + torch.linspace(-0.01, 0.01, 41, dtype=ev.dtype, device=ev.device)[None, :] * s0
    fine = fine.clamp_min(1e-12)
    sse_f = _sse(fine[..., None], x3, y3, good, Q)
    sigma = fine.gather(-1, sse_f.argmin(-1, keepdim=True))[:, 0]

    bulk_max = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    tw = 1 / math.sqrt(Q) * bulk_max ** (2 / 3) * M ** (-2 / 3)
    num_spikes = (to_plot > (bulk_max + tw.sqrt())[:, None]).sum(-1)
    return MPFit(
        sigma=sigma,
        bulk_max=bulk_max / scale[:, 0],
        num_spikes=num_spikes,
        mp_softrank=bulk_max / lam_max,
    )
