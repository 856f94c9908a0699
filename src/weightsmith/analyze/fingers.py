"""``fix_fingers="clip_xmax"``: refit the power law with the largest eigenvalues ("fingers") clipped off.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .powerlaw import EVALS_THRESH, PowerLawFit, fit_power_law

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
