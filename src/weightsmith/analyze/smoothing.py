"""SVD smoothing: keep each layer's largest singular components, as WeightWatcher's ``SVDSmoothing``.

Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR 22, 2021
(arXiv:1810.01075), with WeightWatcher's ``detX`` condition from C. H. Martin's SETOL theory (2025):
the heavy-tailed top of a layer's ESD carries what it
learned, the bulk is closer to noise. Each analysed layer ``W = U S V^T`` is replaced by its rank-``k``
truncation ``U_k S_k V_k^T`` (exact SVD; WeightWatcher uses a randomised truncated SVD), where ``k`` is

- ``svd``: ``int(percent * M * rf)``;
- ``detx``: the smallest tail of the ESD rescaled to mean 1 whose eigenvalue product falls below 1
  (``det X = 1``, SETOL's effective-correlation-space condition; the whole ESD if none does);
- ``lambda_min``: the power-law tail ``num_pl_spikes`` (eigenvalues at or above the fitted ``xmin``);
- ``rmt``: the Marchenko-Pastur spikes ``num_spikes``.

A Conv2d kernel keeps ``ceil(k / rf)`` components in each kernel-position slice; ``k = 0`` leaves the
layer unchanged, as in WeightWatcher. Conv1d kernels are copied unchanged (WeightWatcher has no
smoothing for 3-D arrays). The smoothed model is streamed to ``out`` by the executor's ``ShardWriter``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..execute import stream
from ..select import Selector
from ..staging import final_path
from ..store import ShardWriter, WeightStore
from .batches import candidate_matrices
from .conv import conv_slices, layer_esd, layer_shape
from .mp import marchenko_pastur_fit
from .powerlaw import fit_power_law

SMOOTH_METHODS = ("detx", "svd", "lambda_min", "rmt")
WW_SPELLINGS = {"detX": "detx", "alpha_min": "lambda_min"}  # WeightWatcher's names for the same methods


def detx_count(evals: Tensor) -> int:
    """Eigenvalues in the smallest top tail with ``prod(lambda_i) < 1`` once the ESD has mean 1."""
    x = torch.sort(evals.to(torch.float64), descending=True).values
    n = x.numel()
    if n < 2 or not bool(x[-1] < x[0]):
        return 0
    logs = torch.log(x * (n / x.sum()))
    below = (torch.cumsum(logs, 0)[: n - 1] < 0).nonzero()
    return int(below[0]) + 1 if below.numel() else n


def smooth_count(W: Tensor, method: str = "detx", percent: float = 0.8) -> int:
    """WeightWatcher's ``num_smooth`` for a dense or Conv2d weight (components kept over all slices)."""
    view = layer_shape(W.shape)
    if view is None:
        raise ValueError(f"cannot smooth a {W.dim()}-D tensor")
    if method == "svd":
        return int(percent * view.M * view.rf)
    evals = layer_esd(W)
    if method == "detx":
        return detx_count(evals)
    if method == "lambda_min":
        return int(fit_power_law(evals).num_pl_spikes)
    if method == "rmt":
        return int(marchenko_pastur_fit(evals[None, :], view.N, view.M).num_spikes[0])
    raise ValueError(f"smoothing method must be one of {SMOOTH_METHODS}, got {method!r}")


def truncate(W: Tensor, k: int) -> Tensor:
    """The best rank-``k`` approximation of a batch of matrices ``(..., m, n)`` (Eckart-Young), in float64."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    k = min(k, S.shape[-1])
    return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]


def smooth_tensor(W: Tensor, method: str = "detx", percent: float = 0.8) -> Tensor:
    """``W`` with only its top singular components (see the module docstring), in ``W``'s dtype."""
    if W.dim() not in (2, 4):
        return W
    k = smooth_count(W, method, percent)
    if k <= 0:
        return W
    if W.dim() == 2:
        return truncate(W, k).to(W.dtype)
    rf = layer_shape(W.shape).rf  # type: ignore[union-attr]
    out = torch.empty_like(W)
    conv_slices(out).copy_(truncate(conv_slices(W), math.ceil(k / rf)))
    return out


def svd_smoothing(
    store: WeightStore,
    out: str | Path,
    method: str = "detx",
    percent: float = 0.8,
    select: Selector | str | None = None,
    device: str | torch.device | None = "cpu",
    force: bool = False,
) -> Path:
    """Write ``store`` to ``out`` (a model directory) with every analysable layer SVD-smoothed.

    ``method`` also accepts WeightWatcher's spellings ``detX`` and ``alpha_min``.
    """
    method = WW_SPELLINGS.get(method, method)
    if method not in SMOOTH_METHODS:
        raise WeightsmithError(f"smoothing method must be one of {SMOOTH_METHODS}, got {method!r}")
    if not 0 < percent <= 1:
        raise WeightsmithError(f"smoothing percent must be in (0, 1], got {percent}")
    names, _ = candidate_matrices(store, select, kernels=True)
    chosen = [n for n in names if len(store.meta(n).shape) in (2, 4)]
    with ShardWriter(Path(out), force=force, metadata={"weightsmith": f"svd_smoothing:{method}"}) as writer:
        stream(
            [store],
            lambda _name, tensors: smooth_tensor(tensors[0], method, percent),
            chosen=chosen,
            writer=writer,
            device=device,
            keep_dtype=True,
            description="smooth",
        )
    return final_path(Path(out))
