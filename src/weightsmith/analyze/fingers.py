"""``fix_fingers``: power-law fits that keep a few outsized top eigenvalues ("fingers") from skewing alpha.

``clip_xmax`` refits the power law with the largest eigenvalues clipped off; ``xmin_peak`` bounds xmin
near the peak of the ESD (``xmin_peak_range``, ``xmin_peak_fit``).

Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 22, 2021
(arXiv:1810.01075), and the WeightWatcher 0.7.x ``fix_fingers`` option: a few outsized eigenvalues at the
top of an ESD (finite-size "fingers") can inflate the fitted alpha. The spectrum is refitted with its
``k = 2, 3, ..., max_fingers - 1`` largest positive eigenvalues removed; the first clipped fit whose alpha
is below the unclipped alpha by more than ``finger_thresh`` is kept (``num_fingers = k - 1``), and the
search stops early once a clipped alpha is at or below ``min_alpha = 2``. ``raw_alpha`` is the unclipped
alpha; ``xmax`` the largest eigenvalue left in the kept fit; ``num_pl_spikes`` counts every eigenvalue
(fingers included) at or above the kept ``xmin``, all as WeightWatcher reports them. As in WeightWatcher,
``max_fingers`` below half the number of eigenvalues is replaced by the default 10.

All ``B x (max_fingers - 1)`` clipped spectra are fitted in one batched ``fit_power_law`` call: a clipped
eigenvalue is replaced by 0, which the fit ignores.

``xmin_peak`` (WeightWatcher 0.7.x ``fix_fingers="xmin_peak"``, which hands the range to the ``powerlaw``
package of Alstott, Bullmore & Plenz, "powerlaw: a Python package for analysis of heavy-tailed
distributions", PLoS ONE 9(1), 2014): the positive eigenvalues' log10 are binned into 100 equal bins
between their minimum and maximum; the left edge ``e`` of the fullest bin (the first, on a tie) gives
the peak ``p = 10^e``, and xmin is searched, by the same Clauset-Shalizi-Newman KS criterion, only over
eigenvalues in ``[log10(0.95 p), 1.5 p]`` (WeightWatcher passes the lower bound as a log10 and the upper
one as a value; we reproduce that, it is what its numbers are) less the largest such eigenvalue, and only
fits with alpha > 1 count. ``xmin_max`` replaces the upper bound ``1.5 p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .powerlaw import EVALS_THRESH, PowerLawFit, fit_power_law

PEAK_BINS = 100  # WeightWatcher's histogram of log10 eigenvalues
DEFAULT_MAX_FINGERS = 10
DEFAULT_FINGER_THRESH = 1.0
MIN_ALPHA = 2.0


@dataclass(frozen=True)
class FingersFit:
    fit: PowerLawFit  # the kept fit, one entry per spectrum
    num_fingers: Tensor  # eigenvalues clipped in the kept fit minus one, as WeightWatcher counts (0: none)
    raw_alpha: Tensor  # the unclipped alpha
    xmax: Tensor  # largest eigenvalue of the kept fit's data


def clip_xmax_fit(
    evals: Tensor, max_fingers: int = DEFAULT_MAX_FINGERS, finger_thresh: float = DEFAULT_FINGER_THRESH
) -> FingersFit:
    """WeightWatcher's ``clip_xmax`` fit of each row of ``evals`` (B, n), any order."""
    x = torch.sort(evals.to(torch.float64), dim=-1, descending=True).values
    B, n = x.shape
    pos = x > EVALS_THRESH
    n_pos = pos.sum(-1)
    if max_fingers is None or max_fingers < 0 or max_fingers < n / 2:
        max_fingers = DEFAULT_MAX_FINGERS
    clips = [0, *range(2, max_fingers)]
    rows = []
    for k in clips:
        keep = torch.arange(n, device=x.device)[None, :] >= k  # drop the k largest (positives come first)
        rows.append(torch.where(keep, x, torch.zeros_like(x)))
    fits = fit_power_law(torch.stack(rows, 1).reshape(B * len(clips), n))
    alpha = fits.alpha.reshape(B, len(clips)).tolist()
    chosen, fingers = [], []
    for b in range(B):
        pick, count = 0, 0
        for j in range(1, len(clips)):
            a = alpha[b][j]
            if a + finger_thresh < alpha[b][0]:
                pick, count = j, clips[j] - 1
                break
            if a <= MIN_ALPHA:
                break
        chosen.append(b * len(clips) + pick)
        fingers.append(count)
    idx = torch.tensor(chosen, device=x.device)
    fit = PowerLawFit(*(t[idx] for t in (fits.alpha, fits.xmin, fits.D, fits.sigma, fits.num_pl_spikes)))
    clipped = torch.tensor([clips[i % len(clips)] for i in chosen], device=x.device)
    top = x.gather(-1, clipped.clamp_max(n - 1)[:, None])[:, 0]
    spikes = (x >= fit.xmin[:, None]).sum(-1).to(torch.float64)
    fit = PowerLawFit(
        fit.alpha, fit.xmin, fit.D, fit.sigma, torch.where(fit.alpha.isnan(), fit.alpha, spikes)
    )
    return FingersFit(
        fit=fit,
        num_fingers=torch.tensor(fingers, device=x.device),
        raw_alpha=fits.alpha.reshape(B, len(clips))[:, 0],
        xmax=torch.where(clipped < n_pos, top, torch.full_like(top, float("nan"))),
    )


def xmin_peak_range(
    evals: Tensor, xmin_max: float | None = None, thresh: float = EVALS_THRESH
) -> tuple[Tensor, Tensor]:
    """``(low, high)`` bounds of xmin per row of ``evals`` (B, n): ``(log10(0.95 p), 1.5 p)``, p the ESD peak.

    The histogram is ``numpy.histogram(log10(evals), bins=100)``'s: edges ``first + i * step`` with
    ``step = (last - first) / 100`` and the last edge exactly ``last`` (a constant row gets
    ``first - 0.5, last + 0.5``), each value counted in the bin whose left edge it reaches, the last bin
    closed.
    """
    x = evals.to(torch.float64)
    pos = x > thresh
    lg = torch.log10(torch.where(pos, x, torch.ones_like(x)))
    first = torch.where(pos, lg, torch.full_like(lg, math.inf)).amin(-1)
    last = torch.where(pos, lg, torch.full_like(lg, -math.inf)).amax(-1)
    flat = first == last
    first, last = torch.where(flat, first - 0.5, first), torch.where(flat, last + 0.5, last)
    step = (last - first) / PEAK_BINS
    i = torch.arange(PEAK_BINS + 1, dtype=x.dtype, device=x.device)
    edges = i[None, :] * step[:, None] + first[:, None]
    edges[:, -1] = last
    bins = (torch.searchsorted(edges, lg.contiguous(), right=True) - 1).clamp(0, PEAK_BINS - 1)
    counts = torch.zeros(x.shape[0], PEAK_BINS, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, bins, pos.long())
    peak = 10.0 ** edges.gather(1, counts.argmax(-1, keepdim=True))[:, 0]
    high = 1.5 * peak if xmin_max is None else torch.full_like(peak, float(xmin_max))
    return torch.log10(0.95 * peak), high


def xmin_peak_fit(evals: Tensor, xmin_max: float | None = None) -> PowerLawFit:
    """WeightWatcher's ``fix_fingers="xmin_peak"`` power-law fit of each row of ``evals`` (B, n), any order.

    No small-sample fit here: the ``powerlaw`` package fits short spectra the same way.
    """
    x = evals.to(torch.float64)
    return fit_power_law(x, min_evals=2, xmin_range=xmin_peak_range(x, xmin_max))
