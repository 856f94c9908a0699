"""Truncated power-law (TPL) fits of an ESD tail: WeightWatcher's ``fit="TPL"`` and ``fit="E_TPL"``.

Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review 51(4), 2009
(arXiv:0706.1062), Table 1: the power law with exponential cut-off on ``x >= xmin``,

    p(x) = lambda^(1 - alpha) / Gamma(1 - alpha, lambda * xmin) * x^(-alpha) * exp(-lambda * x),

``Gamma(s, y)`` the upper incomplete gamma function. Martin & Mahoney, "Implicit self-regularization in
deep neural networks", JMLR 22, 2021, fit it to the ESD tail; WeightWatcher 0.7.x reports its
``alpha`` and ``Lambda`` (``fit="TPL"``) and, with xmin bounded near the ESD peak (``fingers.
xmin_peak_range``), the "extended" TPL (``fit="E_TPL"``). WeightWatcher runs the ``powerlaw`` package
(Alstott, Bullmore & Plenz, PLoS ONE 9(1), 2014; release 1.5: with 2.0 WeightWatcher 0.7.7's call fails,
see docs/analyze-seeds.md), and this module reproduces that computation:

- every candidate xmin (every positive eigenvalue but the largest, or those of the xmin_peak range) gets
  a maximum-likelihood fit of ``(alpha, lambda)`` by the Nelder-Mead simplex method (Nelder & Mead, "A
  simplex method for function minimization", Computer Journal 7(4), 1965) with the coefficients,
  starting simplex (+5 % per coordinate) and stopping rule (simplex and function spread both <= 1e-4,
  at most 400 evaluations) of ``scipy.optimize.fmin``, from ``alpha0 = 1 + n / sum ln(x / xmin)``,
  ``lambda0 = 1 / mean(x)``; a point outside ``alpha > 1, lambda > 0`` scores the constant
  ``-n ln(1e-307)``, as the package's likelihood does;
- its Kolmogorov-Smirnov distance ``D = max |F_fit(x) - (j - i) / (n - i)|`` over the tail, with
  ``F_fit(x) = 1 - Gamma(1 - alpha, lambda x) / Gamma(1 - alpha, lambda xmin)``;
- the candidate with the smallest D among fits inside ``alpha > 1, lambda > 0`` wins (any, if none is).

All candidates of all spectra are fitted at once: one batched simplex per candidate, advanced in
lockstep. ``Gamma(s, y)`` (``s < 1``, any ``y > 0``) is ``y^s e^-y`` times ``int_0^inf exp(s u - y(e^u
- 1)) du``, integrated by composite Gauss-Legendre quadrature (``log_upper_gamma``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .fingers import xmin_peak_range
from .powerlaw import EVALS_THRESH, xmin_candidates

PANELS, NODES = 32, 16  # composite Gauss-Legendre rule of log_upper_gamma
PIECE_NODES = 24  # Gauss-Legendre nodes between two neighbouring eigenvalues (the fitted CDF)
TAIL = 45.0  # the integrand is cut where it has fallen by e^-45
OUT_OF_RANGE = -math.log(1e-307)  # the powerlaw package's likelihood floor, per point
XTOL = FTOL = 1e-4  # scipy.optimize.fmin's defaults
RHO, CHI, PSI, SIGMA = 1.0, 2.0, 0.5, 0.5  # reflection, expansion, contraction, shrink
NONZDELT, ZDELT = 0.05, 0.00025  # starting simplex: +5 % of a non-zero coordinate, 0.00025 for a zero


@dataclass(frozen=True)
class TPLFit:
    """Batched truncated power-law fits, one entry per spectrum (NaN where not defined)."""

    alpha: Tensor
    Lambda: Tensor  # WeightWatcher's column name for lambda
    xmin: Tensor
    D: Tensor
    num_pl_spikes: Tensor  # eigenvalues >= xmin


@functools.lru_cache(maxsize=4)
def gauss_legendre(k: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the k-point Gauss-Legendre rule on [-1, 1] (Golub-Welsch, 1969)."""
    i = torch.arange(1, k, dtype=torch.float64)
    off = i / torch.sqrt(4 * i * i - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2 * vecs[0] ** 2


def log_upper_gamma(s: Tensor, y: Tensor) -> Tensor:
    """``ln Gamma(s, y)`` elementwise for ``s < 1`` (negative included) and ``y > 0``, float64.

    ``Gamma(s, y) = y^s e^-y int_0^U exp(s u - y (e^u - 1)) du`` (substituting ``t = y e^u``), U where
    the integrand has fallen by ``e^-45``; 32 panels of 16-point Gauss-Legendre (about 1e-14 relative).
    """
    s, y = torch.broadcast_tensors(s.to(torch.float64), y.to(torch.float64))
    grow = s.clamp_min(0) * torch.log1p(TAIL / y)  # s > 0: the integrand first rises by up to e^grow
    U = torch.log1p((TAIL + grow) / y)
    U = torch.where(s < 0, torch.minimum(U, TAIL / (-s).clamp_min(1e-300)), U)
    x, w = gauss_legendre(NODES)
    x, w = x.to(s.device), w.to(s.device)
    panel = torch.arange(PANELS, dtype=torch.float64, device=s.device)
    t = ((panel[:, None] + (x[None, :] + 1) / 2) / PANELS).flatten()  # nodes in (0, 1)
    u = U[..., None] * t
    g = s[..., None] * u - y[..., None] * torch.expm1(u)
    logw = torch.log(w / (2 * PANELS)).repeat(PANELS) + torch.log(U)[..., None]
    return s * torch.log(y) - y + torch.logsumexp(g + logw, -1)


def nelder_mead(
    f: Callable[[Tensor, Tensor], Tensor], x0: Tensor, xtol: float = XTOL, ftol: float = FTOL
) -> Tensor:
    """Minimise ``f(rows, points)`` from each row of ``x0`` (P, N) by ``scipy.optimize.fmin``'s simplex.

    ``f`` scores ``points`` (k, N) of problems ``rows`` (k,). All P simplices advance in lockstep; each
    follows the steps, tie rules (strict comparisons, stable ordering) and budget (200 N evaluations,
    an iteration cut short at the budget leaves the simplex as it stood) of the sequential method.
    """
    P, N = x0.shape
    maxfun = maxiter = 200 * N
    sim = x0[:, None, :].repeat(1, N + 1, 1)
    for k in range(N):
        v = sim[:, k + 1, k]
        sim[:, k + 1, k] = torch.where(v != 0, (1 + NONZDELT) * v, torch.full_like(v, ZDELT))
    allrows = torch.arange(P, device=x0.device)
    fsim = f(allrows.repeat_interleave(N + 1), sim.reshape(-1, N)).reshape(P, N + 1)
    calls = torch.full((P,), N + 1, device=x0.device)
    iters = torch.ones(P, dtype=torch.long, device=x0.device)
    sim, fsim = _sorted(sim, fsim)
    active = torch.ones(P, dtype=torch.bool, device=x0.device)
    while True:
        spread = (sim[:, 1:] - sim[:, :1]).abs().flatten(1).amax(-1)
        fspread = (fsim[:, :1] - fsim[:, 1:]).abs().amax(-1)
        active &= ~((spread <= xtol) & (fspread <= ftol)) & (calls < maxfun) & (iters < maxiter)
        a = active.nonzero().flatten()
        if a.numel() == 0:
            return sim[:, 0]
        S, F, budget = sim[a], fsim[a], maxfun - calls[a]
        xbar = S[:, :-1].sum(1) / N
        worst, fworst = S[:, -1], F[:, -1]
        xr = (1 + RHO) * xbar - RHO * worst
        fxr = f(a, xr)
        expand = fxr < F[:, 0]
        take_r = ~expand & (fxr < F[:, -2])
        outside = ~expand & ~take_r & (fxr < fworst)  # else: an inside contraction
        x2 = torch.where(
            expand[:, None],
            (1 + RHO * CHI) * xbar - RHO * CHI * worst,
            torch.where(
                outside[:, None], (1 + PSI * RHO) * xbar - PSI * RHO * worst, (1 - PSI) * xbar + PSI * worst
            ),
        )
        second = ~take_r & (budget >= 2)
        f2 = torch.full_like(fxr, math.nan)
        if bool(second.any()):
            f2[second] = f(a[second], x2[second])
        use2 = second & torch.where(expand, f2 < fxr, torch.where(outside, f2 <= fxr, f2 < fworst))
        shrink = second & ~expand & ~use2
        new_x = torch.where(use2[:, None], x2, xr)
        new_f = torch.where(use2, f2, fxr)
        move = take_r | (second & expand) | use2
        S[:, -1] = torch.where(move[:, None], new_x, S[:, -1])
        F[:, -1] = torch.where(move, new_f, F[:, -1])
        used = 1 + second.long()
        if bool(shrink.any()):
            for j in range(1, N + 1):
                placed = shrink & (budget >= 1 + j)  # the j-th shrunk vertex is moved before it is scored
                scored = shrink & (budget >= 2 + j)
                pts = S[:, 0] + SIGMA * (S[:, j] - S[:, 0])
                S[:, j] = torch.where(placed[:, None], pts, S[:, j])
                if bool(scored.any()):
                    F[scored, j] = f(a[scored], pts[scored])
                used = used + scored.long()
        cut = (~take_r & (budget < 2)) | (shrink & (budget < 2 + N))
        calls[a] = torch.where(cut, torch.full_like(budget, maxfun), calls[a] + used)
        iters[a] = iters[a] + (~cut).long()
        sim[a], fsim[a] = _sorted(S, F)


def _sorted(sim: Tensor, fsim: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.sort(fsim, dim=-1, stable=True).indices
    return sim.gather(1, order[..., None].expand_as(sim)), fsim.gather(1, order)


def tpl_negative_loglikelihood(
    alpha: Tensor, lam: Tensor, n: Tensor, sum_log: Tensor, sum_x: Tensor, xmin: Tensor
) -> Tensor:
    """``-sum ln p(x_i)`` of a tail of ``n`` points (``sum ln x``, ``sum x``) above ``xmin``, elementwise.

    Outside ``alpha > 1, lambda > 0`` every point scores the floor ``ln(1e-307)``, as in ``powerlaw``.
    """
    ok = (alpha > 1) & (lam > 0)
    a, lm = torch.where(ok, alpha, 2.0), torch.where(ok, lam, 1.0)
    s = 1 - a
    log_c = s * torch.log(lm) - log_upper_gamma(s, lm * xmin)
    nll = a * sum_log + lm * sum_x - n * log_c
    return torch.where(ok, nll, n * OUT_OF_RANGE)


def fit_truncated_power_law(
    evals: Tensor, xmin_peak: bool = False, xmin_max: float | None = None, thresh: float = EVALS_THRESH
) -> TPLFit:
    """WeightWatcher's TPL fit of each row of ``evals`` (B, n), any order (``xmin_peak``: its E_TPL).

    Candidates are the positive eigenvalues (above ``thresh``) but the largest, or with ``xmin_peak``
    those in ``fingers.xmin_peak_range`` but the largest of them. Rows with fewer than 2 candidates are
    NaN. Distinct eigenvalues are assumed (ties are not merged as the ``powerlaw`` package merges them).
    """
    x = torch.sort(evals.to(torch.float64), dim=-1).values
    B, n = x.shape
    valid = x > thresh
    if xmin_peak:
        bounds = xmin_peak_range(x, xmin_max, thresh)
    else:
        bounds = (torch.full((B,), -math.inf, dtype=x.dtype), torch.full((B,), math.inf, dtype=x.dtype))
    cand = xmin_candidates(x, valid, bounds)
    rows, idx = cand.nonzero(as_tuple=True)  # one fit per (spectrum, candidate) pair
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=x.device)
    if rows.numel() == 0:
        return TPLFit(nan, nan.clone(), nan.clone(), nan.clone(), nan.clone())
    logx = torch.log(torch.where(valid, x, torch.ones_like(x)))
    suffix_log = torch.flip(torch.cumsum(torch.flip(logx, [-1]), -1), [-1])
    suffix_x = torch.flip(torch.cumsum(torch.flip(torch.where(valid, x, 0.0), [-1]), -1), [-1])
    xmin = x[rows, idx]
    nt = (n - idx).to(torch.float64)  # positives sort last
    s_log, s_x = suffix_log[rows, idx], suffix_x[rows, idx]
    alpha0 = 1 + nt / (s_log - nt * torch.log(xmin))
    x0 = torch.stack([alpha0, nt / s_x], -1)

    def nll(p: Tensor, pts: Tensor) -> Tensor:
        return tpl_negative_loglikelihood(pts[:, 0], pts[:, 1], nt[p], s_log[p], s_x[p], xmin[p])

    params = nelder_mead(nll, x0)
    alpha, lam = params[:, 0], params[:, 1]
    ok = (alpha > 1) & (lam > 0)
    D = _ks_distance(x, rows, idx, nt, alpha, lam, ok)
    # per spectrum: the first smallest D among in-range fits (among all fits when none is in range)
    has_ok = torch.zeros(B, dtype=torch.bool, device=x.device).index_put_((rows,), ok, accumulate=True)
    score = torch.where(ok | ~has_ok[rows], D, math.inf)
    best_D = torch.full((B,), math.inf, dtype=torch.float64, device=x.device).scatter_reduce(
        0, rows, score, "amin"
    )
    pair = torch.arange(rows.numel(), device=x.device)
    at_best = torch.where(score == best_D[rows], pair, rows.numel())
    first = torch.full((B,), rows.numel(), device=x.device).scatter_reduce(0, rows, at_best, "amin")
    got = first < rows.numel()
    pick = first.clamp_max(rows.numel() - 1)
    out = [torch.where(got, t[pick], nan) for t in (alpha, lam, xmin, D, nt)]
    return TPLFit(*out)


def _ks_distance(
    x: Tensor, rows: Tensor, idx: Tensor, nt: Tensor, alpha: Tensor, lam: Tensor, ok: Tensor
) -> Tensor:
    """KS distance of each pair's fit over its tail (``(n - 1) / n`` for a fit outside the range).

    ``1 - F_fit`` between neighbouring tail points is integrated piecewise (``PIECE_NODES`` Gauss-Legendre
    nodes in ``ln t``) and accumulated, relative to ``Gamma(s, lambda xmin)``.
    """
    n = x.shape[-1]
    gx, gw = (t.to(x.device) for t in gauss_legendre(PIECE_NODES))
    out = torch.empty_like(alpha)
    step = max(1, (1 << 21) // (n * PIECE_NODES))
    j = torch.arange(n, device=x.device)
    for c in range(0, rows.numel(), step):
        sl = slice(c, c + step)
        r, i = rows[sl], idx[sl]
        a = torch.where(ok[sl], alpha[sl], 2.0)
        lm = torch.where(ok[sl], lam[sl], 1.0)
        s = 1 - a
        xs = x[r]  # (k, n) ascending
        tail = j[None, :] >= i[:, None]
        u = torch.log(lm[:, None] * xs.clamp_min(torch.finfo(torch.float64).tiny))
        lo = torch.cat([u[:, :1], u[:, :-1]], -1)
        half = (u - lo) / 2
        nodes = lo[..., None] + half[..., None] * (gx + 1)  # (k, n, q)
        g = s[:, None, None] * nodes - torch.exp(nodes)
        piece = torch.logsumexp(g + torch.log(gw), -1) + torch.log(half.clamp_min(1e-300))
        xmin_u = u.gather(1, i[:, None])
        lg0 = log_upper_gamma(s, torch.exp(xmin_u[:, 0]))
        inner = tail & (j[None, :] > i[:, None])
        mass = torch.where(inner & (half > 0), torch.exp(piece - lg0[:, None]), torch.zeros_like(piece))
        F = torch.cumsum(mass, -1)
        E = (j[None, :] - i[:, None]).to(torch.float64) / nt[sl, None]
        dev = torch.where(tail, (F - E).abs(), torch.zeros_like(F)).amax(-1)
        out[sl] = torch.where(ok[sl], dev, (nt[sl] - 1) / nt[sl])
    return out
