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
from ..execute import PREFETCH_BYTES, resolve_device, stream
from ..linalg import economy_svd
from ..progress import track
from ..select import Selector
from ..staging import check_output
from ..store import WeightStore
from . import _core, inputs


@register_config("opcm", kind="merge")
class OPCM:
    """``alpha``: fraction of the merged update's nuclear norm that defines its dominant subspace.
    2-D tensors are projected except those matching ``unprojected`` (embeddings are lookup tables)."""

    alpha: float = 0.5
    unprojected: tuple[str, ...] = ("*embed*",)

    def projected(self, name: str, ndim: int) -> bool:
        return ndim == 2 and not Selector(include=self.unprojected).matches(name)

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        base = recipe.open_base()
        if base is None:
            raise WeightsmithError("OPCM needs a base model (base: ...)")
        if recipe.weights is not None and any(w != 1.0 for w in recipe.weights):
            raise WeightsmithError(
                "OPCM takes no per-model weights: its scaling is adaptive; remove 'weight:'"
            )
        models = recipe.open_models()
        return merge_continual(
            base, models, out, self, select=recipe.select, copy_from=recipe.copy_from(), **kw
        )


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
    U, S, Vh = economy_svd(delta)
    r = split_rank(S, alpha)
    Ur, Vhr = U[:, :r], Vh[:r]
    out = tau - Ur @ ((Ur.mT @ tau) @ Vhr.mT) @ Vhr
    Ut, Vht = U[:, r:], Vh[r:]
    d = ((Ut.mT @ tau) * Vht).sum(1)  # u_i^T tau v_i for i >= r
    return out - (Ut * d) @ Vht


def _norm_sq(tensors: Iterable[Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


class _Init:
    """Step 1 of the fold, tensor by tensor: Delta_1 = tau_1, lambda_1 = 1, n_1 = ||tau_1||."""

    def __init__(self) -> None:
        self.merged: dict[str, Tensor] = {}

    def add(self, name: str, tau: Tensor) -> None:
        self.merged[name] = tau.float().clone()

    def finish(self) -> OPCMState:
        return OPCMState(self.merged, 1.0, math.sqrt(_norm_sq(self.merged.values())), 1)


class _Update:
    """Step t of the fold, tensor by tensor: S = lambda_{t-1} Delta_{t-1} + tau~_t, then the rescale."""

    def __init__(self, state: OPCMState, config: OPCM) -> None:
        self.state, self.config = state, config
        self.S: dict[str, Tensor] = {}
        self.tau_sq = self.s_sq = 0.0

    def add(self, name: str, tau: Tensor) -> None:
        delta, x = self.state.merged[name], tau.float()
        self.tau_sq += _norm_sq([x])
        xt = project_out(delta, x, self.config.alpha) if self.config.projected(name, x.ndim) else x
        self.S[name] = torch.add(xt, delta, alpha=self.state.lam)
        self.s_sq += _norm_sq([self.S[name]])

    def finish(self) -> OPCMState:
        st = self.state
        mean_norm = (st.t * st.mean_norm + math.sqrt(self.tau_sq)) / (st.t + 1)
        lam = math.sqrt(self.s_sq) / mean_norm if self.s_sq > 0 else 1.0
        return OPCMState({n: s.div_(lam) for n, s in self.S.items()}, lam, mean_norm, st.t + 1)


def opcm_init(tau: Mapping[str, Tensor], names: Sequence[str] | None = None) -> OPCMState:
    step = _Init()
    for n in names if names is not None else list(tau):
        step.add(n, tau[n])
    return step.finish()


def opcm_update(state: OPCMState, tau: Mapping[str, Tensor], config: OPCM) -> OPCMState:
    """Fold the next task vector into ``state``; returns a new state (the old one is not modified)."""
    step = _Update(state, config)
    for name in state.merged:
        step.add(name, tau[name])
    return step.finish()


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
    base: str | Path | WeightStore,
    models: Sequence[str | Path | WeightStore],
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
    copy_from: str | Path | None = None,
) -> Path:
    """OPCM over checkpoints on disk, in the order given; writes theta_0 + Delta_T to ``out``.

    Each model is one streamed pass (read ahead, NaN/Inf refused with the tensor named) folding its task
    vector in tensor by tensor; config/tokenizer files come from ``copy_from`` (default: the base's)."""
    out_dtype = _core.parse_dtype(dtype)
    check_output(out, force, directory=True)
    b = inputs.open_input(base)
    stores = [inputs.open_input(m) for m in models]
    if not stores:
        raise WeightsmithError("OPCM needs at least one model")
    _core.check_inputs([b, *stores], out_dtype)
    names = sorted(_core.selected_names(b, select))
    dev = resolve_device(device)
    state: OPCMState | None = None
    for i, store in enumerate(track(stores, "opcm")):
        step = _Init() if state is None else _Update(state, config)
        stream(
            [b, store],
            lambda name, ts, step=step: step.add(name, ts[1].float() - ts[0].float()),  # type: ignore[misc]
            names=names,
            device=dev,
            check_finite=True,
            prefetch_bytes=PREFETCH_BYTES,
            description=f"opcm model {i + 1}",
            verb="merging",
        )
        state = step.finish()
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
        copy_from=copy_from if copy_from is not None else inputs.source_dir(b),
        extra_files=extra_files,
    )
