"""Continuous power-law fit of an eigenvalue spectrum's tail, vectorised over every candidate xmin.

Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 51(4), 2009
(arXiv:0706.1062): for a tail ``x >= xmin`` of ``n`` points the maximum-likelihood exponent is
``alpha = 1 + n / sum(ln(x_i / xmin))`` (their eq. 3.1), and ``xmin`` is the candidate that minimises
the Kolmogorov-Smirnov distance ``D = max |F_emp(x) - F_fit(x)|`` between the empirical tail and the
fitted law ``F_fit(x) = 1 - (x / xmin)^(1 - alpha)`` (their section 3.3).

This is the fit WeightWatcher uses by default (Martin & Mahoney, "Implicit self-regularization in deep
neural networks", JMLR 2021, arXiv:1810.01075): every sorted eigenvalue above 1e-5 except the largest
is a candidate, the empirical CDF of the tail at its k-th point is ``k / n`` (k = 0..n-1), a candidate
whose alpha is <= 1 gets ``D = 1``, the first minimum wins and ``sigma = (alpha - 1) / sqrt(n)``.
Here all candidates of a whole batch of spectra are scored at once as tensor operations.

Spectra with fewer than 20 positive eigenvalues get WeightWatcher 0.7.7's small-sample fit: the
bias-corrected MLE ``alpha = 1 + (n - 1) / sum(ln(x_i / xmin))`` (Clauset et al., eq. 3.1 with the
``(n - 1)`` factor that makes the estimator unbiased) over tails of at least 8 points, ``xmin`` again
the KS-optimal candidate (see ``small_n_fit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EVALS_THRESH = 1e-5  # eigenvalues at or below this are treated as zeros (WeightWatcher's default)
MIN_FIT_EVALS = 20  # fewer positive eigenvalues than this: the small-sample fit (``small_n_fit``)
SMALL_N_MIN_TAIL = 8  # the small-sample fit's shortest tail (WeightWatcher's k_min)


@dataclass(frozen=True)
class PowerLawFit:
    """Batched fit results, one entry per spectrum (NaN where the fit is not defined)."""

    alpha: Tensor
    xmin: Tensor
    D: Tensor  # Kolmogorov-Smirnov distance at the chosen xmin
    sigma: Tensor  # standard error (alpha - 1) / sqrt(n_tail)
    num_pl_spikes: Tensor  # n_tail: eigenvalues >= xmin


def fit_power_law(
    evals: Tensor,
    thresh: float = EVALS_THRESH,
    max_candidates: int | None = None,
    min_evals: int = MIN_FIT_EVALS,
    chunk_elements: int | None = None,
    xmin_range: tuple[Tensor, Tensor] | None = None,
) -> PowerLawFit:
    """Fit ``p(x) ~ x^-alpha`` to the tail of each row of ``evals`` (shape ``(B, n)`` or ``(n,)``).

    ``max_candidates`` limits the xmin search to that many evenly spaced ranks (used for the long
    pooled FARMS spectra); ``None`` scores every candidate exactly. Rows with at least 2 but fewer than
    ``min_evals`` positive eigenvalues get the small-sample fit (``small_n_fit``); rows with fewer than
    2 are NaN. Work runs in float64 on the
    device of ``evals`` in chunks of about ``chunk_elements`` elements (default: 64K on CPU so a chunk
    stays in cache, 128M on CUDA). ``xmin_range = (low, high)`` (one bound per row) restricts xmin to the
    eigenvalues in ``[low, high]`` less the largest of them, as the ``powerlaw`` package's ``Fit(xmin=(low,
    high))`` does (``fingers.xmin_peak_fit``); a row with no such candidate is NaN.
    """
    single = evals.dim() == 1
    x = evals.reshape(1, -1) if single else evals
    x = torch.sort(x.to(torch.float64), dim=-1).values
    B, n = x.shape
    valid = x > thresh
    first = n - valid.sum(-1)  # rank of the smallest positive eigenvalue in each row
    logx = torch.log(x.clamp_min(torch.finfo(torch.float64).tiny))
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [-1]), -1), [-1])  # sum_{j>=i} ln x_j
    cand = torch.arange(max(n - 1, 0), device=x.device)
    if max_candidates is not None and cand.numel() > max_candidates:
        cand = torch.linspace(0, n - 2, max_candidates, device=x.device).round().long().unique()
    n_tail = (n - cand).to(torch.float64)  # (C,)
    alphas = 1 + n_tail / (suffix[:, cand] - n_tail * logx[:, cand])  # (B, C)

    Ds = torch.ones_like(alphas)
    j = torch.arange(n, device=x.device)
    if chunk_elements is None:
        chunk_elements = 1 << (27 if x.is_cuda else 16)
    step = max(1, chunk_elements // max(1, B * n))
    for s in range(0, cand.numel(), step):
        c = cand[s : s + step]
        a = alphas[:, s : s + step]
        rel = j[None, :] - c[:, None]  # (c, n): rank inside the tail, negative before xmin
        inside = rel >= 0
        F_emp = rel.clamp_min(0).to(torch.float64) / n_tail[s : s + step, None]
        logratio = logx[:, None, :] - logx[:, c, None]  # (B, c, n)
        F_fit = 1 - torch.exp((1 - a[..., None]) * logratio)
        dev = torch.where(inside, (F_fit - F_emp).abs(), torch.zeros((), dtype=x.dtype, device=x.device))
        D = dev.amax(-1)
        Ds[:, s : s + step] = torch.where(a > 1, D, torch.ones_like(D))
    usable = cand[None, :] >= first[:, None]
    if xmin_range is not None:
        usable = usable & xmin_candidates(x, valid, xmin_range)[:, cand]
    Ds = torch.where(usable, Ds, torch.full_like(Ds, math.inf))
    best = torch.argmin(Ds, dim=-1)  # first minimum, as WeightWatcher's np.argmin

    rows = torch.arange(B, device=x.device)
    alpha = alphas[rows, best]
    xmin = x[rows, cand[best]]
    D = Ds[rows, best]
    tail = n_tail[best]
    sigma = (alpha - 1) / torch.sqrt(tail)
    ok = (n - first) >= min_evals
    if xmin_range is not None:
        ok = ok & usable.any(-1)
    nan = torch.full_like(alpha, math.nan)
    cols = [torch.where(ok, t, nan) for t in (alpha, xmin, D, sigma, tail)]
    small = ((~ok) & ((n - first) >= 2)).nonzero().flatten().tolist()
    for r in small:  # a few short spectra: one small fit each
        f = small_n_fit(x[r, int(first[r]) :])
        for col, v in zip(cols, (f.alpha, f.xmin, f.D, f.sigma, f.num_pl_spikes), strict=True):
            col[r] = v
    out = PowerLawFit(*cols)
    if single:
        return PowerLawFit(*(t[0] for t in (out.alpha, out.xmin, out.D, out.sigma, out.num_pl_spikes)))
    return out


def xmin_candidates(x: Tensor, valid: Tensor, xmin_range: tuple[Tensor, Tensor]) -> Tensor:
    """Candidate xmin ranks of ascending rows ``x``: ``valid`` ones in ``[low, high]`` but the largest."""
    low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device).reshape(-1, 1) for b in xmin_range)
    inside = valid & (x >= low) & (x <= high)
    ranks = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    last = torch.where(inside, ranks, -1).amax(-1, keepdim=True)
    return inside & (ranks < last)


def small_n_fit(x: Tensor) -> PowerLawFit:
    """WeightWatcher 0.7.7's fit of a short spectrum ``x`` (ascending, all positive, 2 <= n < 20).

    A rank leaving a tail of at least ``SMALL_N_MIN_TAIL`` points with a positive log-sum gets the
    bias-corrected alpha, and, where that alpha exceeds 1, its KS distance ``D``; every other rank keeps
    ``D = 1``. WeightWatcher's small-sample routine ranks candidates by ``J = D - 0.868 / sqrt(n_tail)``,
    but its caller then re-selects the first minimum of ``D`` over all ranks, and that choice is what it
    reports; so it is the one made here. With no valid rank, the whole spectrum's fit fills rank 0.
    ``sigma = (alpha - 1) / sqrt(n_tail)`` is taken, as WeightWatcher does, before that fallback fills
    in rank 0 (an unfilled alpha counts as 0).
    """
    x = x.to(torch.float64)
    n = x.shape[0]
    logx = torch.log(x)
    ranks = torch.arange(n - 1, device=x.device)
    n_tail = (n - ranks).to(torch.float64)
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])[: n - 1]
    s = suffix - n_tail * logx[: n - 1]
    bc = 1 + (n_tail - 1) / s  # bias-corrected MLE
    rel = torch.arange(n, device=x.device)[None, :] - ranks[:, None]
    F_emp = rel.clamp_min(0).to(torch.float64) / n_tail[:, None]
    F_fit = 1 - torch.exp((1 - bc[:, None]) * (logx[None, :] - logx[: n - 1, None]))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    ks = torch.where(rel >= 0, (F_fit - F_emp).abs(), zero).amax(-1)
    scored = (n_tail >= SMALL_N_MIN_TAIL) & (s > 1e-12)
    valid = scored & (bc > 1)
    alphas = torch.where(scored, bc, zero)
    Ds = torch.where(valid, ks, torch.ones_like(ks))
    sigmas = (alphas - 1) / n_tail.sqrt()
    if not bool(valid.any()) and float(s[0]) > 1e-12:
        alphas[0], Ds[0] = bc[0], ks[0]
    i = int(torch.argmin(Ds))
    return PowerLawFit(alphas[i], x[i], Ds[i], sigmas[i], n_tail[i])


def power_law_pdf(x: Tensor, alpha: float, xmin: float) -> Tensor:
    """Density of the fitted law on ``x >= xmin``: ``(alpha - 1) / xmin * (x / xmin)^-alpha``."""
    return (alpha - 1) / xmin * (x / xmin) ** (-alpha)


def alpha_at_quantile(evals: Tensor, quantile: float = 0.5, thresh: float = EVALS_THRESH) -> Tensor:
    """MLE alpha with xmin fixed at the given quantile of each row's positive eigenvalues.

    This is FARMS's ``xmin_mid`` choice (xmin at the median, ``xmin_pos = 2``): no KS search, so it
    is stable on spectra without a clean power-law tail (a pure Marchenko-Pastur bulk, say).
    """
    x = torch.sort(evals.to(torch.float64), dim=-1).values
    n = x.shape[-1]
    first = n - (x > thresh).sum(-1)
    i = first + ((n - first) * quantile).long()
    logx = torch.log(x.clamp_min(torch.finfo(torch.float64).tiny))
    j = torch.arange(n, device=x.device)
    inside = j[None, :] >= i[:, None] if x.dim() == 2 else j >= i
    lxmin = logx.gather(-1, i.unsqueeze(-1).clamp_max(n - 1))
    k = (n - i).to(torch.float64)
    s = torch.where(inside, logx - lxmin, torch.zeros_like(logx)).sum(-1)
    return torch.where((n - first) >= MIN_FIT_EVALS, 1 + k / s, torch.full_like(k, math.nan))
