"""Element-wise randomised ESDs: the Marchenko-Pastur fit of a shuffled layer and its correlation traps.

Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 22, 2021
(arXiv:1810.01075), and Martin & Mahoney, "Post-mortem on a deep learning contest: a Simpson's paradox
and the complementary roles of scale metrics versus shape metrics", arXiv:2106.00734, 2021: shuffling
the entries of ``W`` destroys its correlations, so the ESD of the shuffled ``W_rand`` should be a pure
Marchenko-Pastur bulk. Eigenvalues of ``W_rand`` beyond the MP edge plus the Tracy-Widom margin are
*correlation traps* (large, localised entries that survive shuffling), counted as ``num_traps``.

Conventions follow WeightWatcher 0.7.x so the columns agree: the matrices shuffled are the ones it
builds for the layer (the stored dense weight; the Conv2d kernel-position slices, each turned tall and
scaled by ``sqrt(1/2)``; the whole 3-D Conv1d kernel), each flattened in C order, permuted and
reshaped; a layer with fewer than 100 eigenvalues pools 5 shuffles for the MP fit; a further single
shuffle gives ``rand_distance``, the Jensen-Shannon distance between the sorted ESD and the sorted
randomised ESD (both normalised to sum 1, natural log), and ``ww_softrank = max(rand) / max(evals)``.

Seed: the permutations are drawn from ``numpy.random.RandomState(seed)`` (Fisher-Yates, as
``np.random.shuffle``) in the order WeightWatcher draws them (layer by layer in model order; for each
layer the replicas, then the single shuffle). ``np.random.seed(seed)`` before
``WeightWatcher.analyze(randomize=True)`` on the same layers therefore gives the same shuffles, and the
same numbers up to the MP fit's optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .conv import CONV2D_NORM, conv_slices, layer_esd
from .mp import marchenko_pastur_fit
from .spectrum import esd

RANDOM_COLUMNS = ("rand_num_spikes", "num_traps", "rand_sigma_mp", "rand_mp_softrank", "rand_W_scale",
                  "rand_bulk_max", "rand_bulk_min", "max_rand_eval", "rand_distance", "ww_softrank",
                  "ww_maxdist")  # fmt: skip
FEW_EVALS = 100  # below this many eigenvalues WeightWatcher pools several shuffles
REPLICAS = 5


def ww_matrices(W: Tensor) -> tuple[list[Tensor], int]:
    """The matrices WeightWatcher builds for a dense, Conv1d or Conv2d weight, and its ``n_comp``."""
    if W.dim() == 2:
        return [W], min(W.shape)
    if W.dim() == 3:
        return [W], min(W.shape)
    s = W.shape
    last = s[0] + s[1] >= s[2] + s[3]
    mats = []
    for w in conv_slices(W):  # (c_out, c_in) slices made tall; channels-first slices made wide
        flip = w.shape[0] < w.shape[1] if last else w.shape[1] < w.shape[0]
        mats.append((w.T if flip else w) * math.sqrt(CONV2D_NORM))
    return mats, min(mats[0].shape) * len(mats)


def shuffled_esd(mats: list[Tensor], n_comp: int, rng: np.random.RandomState, replicas: int) -> Tensor:
    """Ascending float64 eigenvalues of ``replicas`` element-wise shuffles of every matrix in ``mats``."""
    out = []
    for _ in range(replicas):
        for w in mats:
            flat = w.contiguous().reshape(-1)
            perm = torch.from_numpy(rng.permutation(flat.numel())).to(flat.device)
            ev = esd(flat[perm].reshape(w.shape), torch.float64).flatten()
            out.append(torch.sort(ev).values[-n_comp:])
    return torch.sort(torch.cat(out)).values


def jensen_shannon_distance(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt((KL(p || m) + KL(q || m)) / 2)`` with ``m = (p + q) / 2``, each normalised to sum 1."""

    def kl(a: Tensor, b: Tensor) -> Tensor:
        a, b = a / a.sum(), b / b.sum()
        return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum()

    m = (p + q) / 2
    return torch.sqrt((kl(p, m) + kl(q, m)) / 2)


def randomized_metrics(W: Tensor, N: int, M: int, rng: np.random.RandomState) -> dict[str, Any]:
    """WeightWatcher's ``randomize`` columns for one layer ``W`` (its view: ``N x M``)."""
    mats, n_comp = ww_matrices(W.to(torch.float64))
    evals = layer_esd(W, torch.float64).flip(0)  # ascending
    rand = shuffled_esd(mats, n_comp, rng, REPLICAS if n_comp < FEW_EVALS else 1)
    single = shuffled_esd(mats, n_comp, rng, 1)
    fit = marchenko_pastur_fit(rand.flip(0)[None, :], N, M)
    scale2 = rand.numel() / rand.sum()  # WeightWatcher's W_scale squared: the ESD rescaled to mean 1
    sigma = float(fit.sigma[0])
    return {
        "rand_num_spikes": int(fit.num_spikes[0]),
        "num_traps": int(fit.num_spikes[0]),
        "rand_sigma_mp": sigma,
        "rand_mp_softrank": float(fit.mp_softrank[0]),
        "rand_W_scale": float(scale2.sqrt()),
        "rand_bulk_max": float(fit.bulk_max[0]),
        "rand_bulk_min": float((sigma * (1 - 1 / math.sqrt(N / M))) ** 2 / scale2),
        "max_rand_eval": float(rand[-1]),
        "rand_distance": float(jensen_shannon_distance(evals, single)),
        "ww_softrank": float(single[-1] / evals[-1]),
        "ww_maxdist": float(evals[-1] - single[-1]),
    }
