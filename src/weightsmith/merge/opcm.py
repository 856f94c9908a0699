"""OPCM: continual merging by orthogonal projection and adaptive scaling.

Tang, Li, Shen, Du, Tao, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", NeurIPS 2025, arXiv:2501.09522.

Models arrive one at a time; memory is constant in their number. With theta_0 the pretrained weights
and tau_t = theta_t - theta_0:

- init: Delta_1 = tau_1, lambda_1 = 1, n_1 = ||tau_1||.
- step t: for each linear weight, Delta_{t-1} = U Sigma V^T and r is the first index where the cumulative
  sum of singular values exceeds alpha of their total; tau_t's coordinates u_j^T tau_t v_k are removed
  on the diagonal (j = k) and inside the dominant block (j, k < r). Other tensors are added unprojected.
  S = lambda_{t-1} Delta_{t-1} + tau~_t, n_t = mean_{i<=t} ||tau_i||, lambda_t = ||S|| / n_t,
  Delta_t = S / lambda_t (norms over the whole model); the merged model is theta_0 + Delta_t.

The projection uses the economy SVD only:
tau~ = tau - U_r (U_r^T tau V_r) V_r^T - sum_{i >= r} (u_i^T tau v_i) u_i v_i^T,
which equals the full-SVD form U P V^T (P with its diagonal and [:r, :r] block zeroed) without building
the m x m and n x n bases. The state is an explicit value threaded through ``opcm_init``/``opcm_update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..linalg import svd
from ..select import Selector
from . import _core
from .recipe import Recipe, register_runner


@register_config("opcm", kind="merge")
@dataclass(frozen=True)
class OPCM:
    """``alpha``: fraction of the merged update's nuclear norm that defines its dominant subspace.
    2-D tensors are projected except those matching ``unprojected`` (embeddings are lookup tables)."""

    alpha: float = 0.5
    unprojected: tuple[str, ...] = ("*embed*",)

    def projected(self, name: str, ndim: int) -> bool:
        return ndim == 2 and not Selector(include=self.unprojected).matches(name)


@dataclass(frozen=True)
class OPCMState:
    """After t models: ``merged`` = theta^(t) - theta_0 per tensor (float32), lambda_t, n_t and t."""

    merged: dict[str, Tensor]
    lam: float
    mean_norm: float
    t: int


def split_rank(S: Tensor, alpha: float) -> int:
    """r: the first index at which the cumulative sum of singular values exceeds alpha of their total."""
    cum = S.cumsum(0) / S.sum()
    return int((cum > alpha).float().argmax())


def project_out(delta: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """tau~: ``tau`` without its components on the merged update ``delta``'s singular pairs (economy SVD)."""
    if not bool(delta.any()):
        return tau
    U, S, Vh = _economy_svd(delta)
    r = split_rank(S, alpha)
    Ur, Vhr = U[:, :r], Vh[:r]
    out = tau - Ur @ ((Ur.mT @ tau) @ Vhr.mT) @ Vhr
    Ut, Vht = U[:, r:], Vh[r:]
    d = ((Ut.mT @ tau) * Vht).sum(1)  # u_i^T tau v_i for i >= r
    return out - (Ut * d) @ Vht


def _economy_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Economy SVD. On CUDA via the eigendecomposition of the smaller Gram matrix in float64, an order of
    magnitude faster than cuSOLVER's SVD at these sizes and accurate to float32 for full-rank updates."""
    if not A.is_cuda:
        return svd(A)
    wide = A.shape[0] <= A.shape[1]
    B = (A if wide else A.mT).double()
    ev, Q = torch.linalg.eigh(B @ B.mT)
    S = ev.flip(0).clamp_min(0).sqrt()
    Q = Q.flip(1)
    P = (B.mT @ Q) / torch.where(S > 0, S, 1.0)
    U, Vh = (Q, P.mT) if wide else (P, Q.mT)
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


def _norm_sq(tensors: Iterable[Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


def opcm_init(tau: Mapping[str, Tensor], names: Sequence[str] | None = None) -> OPCMState:
    merged = {n: tau[n].float().clone() for n in (names if names is not None else list(tau))}
    return OPCMState(merged, 1.0, math.sqrt(_norm_sq(merged.values())), 1)


def opcm_update(state: OPCMState, tau: Mapping[str, Tensor], config: OPCM) -> OPCMState:
    """Fold the next task vector into ``state``; returns a new state (the old one is not modified)."""
    S: dict[str, Tensor] = {}
    tau_sq = s_sq = 0.0
    for name, delta in state.merged.items():
        x = tau[name].float()
        tau_sq += _norm_sq([x])
        xt = project_out(delta, x, config.alpha) if config.projected(name, x.ndim) else x
        S[name] = torch.add(xt, delta, alpha=state.lam)
        s_sq += _norm_sq([S[name]])
    mean_norm = (state.t * state.mean_norm + math.sqrt(tau_sq)) / (state.t + 1)
    lam = math.sqrt(s_sq) / mean_norm if s_sq > 0 else 1.0
    return OPCMState({n: s.div_(lam) for n, s in S.items()}, lam, mean_norm, state.t + 1)


def opcm(
    base: Mapping[str, Tensor],
    models: Iterable[Mapping[str, Tensor]],
    config: OPCM = OPCM(),
    names: Sequence[str] | None = None,
) -> OPCMState:
    """Run the fold over ``models`` (state dicts or lazy stores) arriving in order."""
    state: OPCMState | None = None
    for model in models:
        tau = _core.TaskVector(model, base)
        state = opcm_init(tau, names) if state is None else opcm_update(state, tau, config)
    if state is None:
        raise WeightsmithError("OPCM needs at least one model")
    return state


def merge_continual(
    base: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    config: OPCM = OPCM(),
    *,
    select: Selector | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    extra_files: Mapping[str, str] | None = None,
    on_step: Callable[[OPCMState], Any] | None = None,
) -> Path:
    """OPCM over checkpoints on disk, in the order given; writes theta_0 + Delta_T to ``out``."""
    out_dtype = _core.parse_dtype(dtype)
    _core.prepare_output(out, force)
    b = _core.open_input(base)
    stores = [_core.open_input(m) for m in models]
    _core.check_inputs([b, *stores], out_dtype)
    names = sorted(_core.merged_names(b, select))
    dev = _core.resolve_device(device)
    state: OPCMState | None = None
    for store in _core.track(stores, "opcm"):
        tau = _core.TaskVector(store, b, dev)
        state = opcm_init(tau, names) if state is None else opcm_update(state, tau, config)
        if on_step is not None:
            on_step(state)
    assert state is not None
    merged = state.merged
    return _core.write_model(
        [b],
        lambda name, ts: ts[0].float() + merged[name],
        out,
        merged=set(names),
        dtype=out_dtype,
        device=dev,
        force=force,
        shard_bytes=_core.parse_size(shard_size),
        copy_from=_core.source_dir(base),
        extra_files=extra_files,
    )


@register_runner(OPCM)
def _run(recipe: Recipe, out: Path, **kw: Any) -> Path:
    if recipe.base is None:
        raise WeightsmithError("OPCM needs a base model (base: ...)")
    if recipe.weights is not None and any(w != 1.0 for w in recipe.weights):
        raise WeightsmithError("OPCM takes no per-model weights: its scaling is adaptive; remove 'weight:'")
    return merge_continual(recipe.base, recipe.models, out, recipe.method, select=recipe.select, **kw)
