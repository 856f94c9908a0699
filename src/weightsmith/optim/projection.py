"""Low-rank gradient projection around an inner optimiser: the core of GaLore and its relatives.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024), Eq. (3)-(4):
``R_t = P_t^T G_t`` (left) or ``G_t Q_t`` (right), ``N_t = rho_t(R_t)`` (the inner optimiser, e.g. Adam, whose
state lives in the r-dimensional space), ``G~_t = alpha * P_t N_t`` (or ``alpha * N_t Q_t^T``), with P_t
recomputed every T steps (``update_proj_gap``) from the current gradient by the projector.

``proj_type`` follows galore-torch: ``std`` projects the larger side away (right when m >= n, left
otherwise), ``reverse_std`` the smaller, ``left`` / ``right`` always that side, ``full`` both
(``U_r^T G V_r``).

Layer-adaptive lazy refresh ("Q-GaLore", Zhang et al., 2024, Sec. 3.3): at each refresh the similarity of the
new and old subspaces, ``||P_old^T P_new||_F^2 / r`` (1 when they coincide, r/k for random ones), is kept
in a queue of the last ``lazy_window`` refreshes; when their mean reaches ``lazy_threshold`` the layer's gap
is multiplied by ``lazy_growth`` (its subspace has stopped moving, so SVDs are skipped).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from torch import Tensor

from .projectors import LEFT, RIGHT, SVD, Projector
from .transform import ScaleByAdam, State, Transform

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def sides(proj_type: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Which sides of an m x n gradient are projected."""
    m, n = shape
    if proj_type == "std":
        return (RIGHT,) if m >= n else (LEFT,)
    if proj_type == "reverse_std":
        return (LEFT,) if m >= n else (RIGHT,)
    if proj_type in (LEFT, RIGHT):
        return (proj_type,)
    if proj_type == "full":
        return (LEFT, RIGHT)
    raise ValueError(f"proj_type must be one of {', '.join(PROJ_TYPES)} (got '{proj_type}')")


def name_seed(name: str, seed: int) -> int:
    """A per-layer seed: the run's seed mixed with a checksum of the parameter's name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def subspace_similarity(old: Tensor, new: Tensor, side: str) -> float:
    """``||P_old^T P_new||_F^2 / r`` for orthonormal bases (left: columns, right: rows)."""
    a, b = (old.float(), new.float()) if side == LEFT else (old.float().mT, new.float().mT)
    r = max(1, min(a.shape[1], b.shape[1]))
    return float((a.mT @ b).square().sum()) / r


@dataclass(frozen=True)
class LowRank:
    """Project the gradient, run ``inner`` in the projected space, project its update back times ``scale``."""

    inner: Transform
    projector: Projector = SVD()
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    seed: int = 0
    lazy_threshold: float | None = None
    lazy_window: int = 3
    lazy_growth: float = 2.0

    def init(self, param: Tensor, name: str = "") -> State:
        if param.dim() != 2:
            raise ValueError(
                f"{name or 'parameter'}: low-rank projection needs a 2-D weight, got {tuple(param.shape)}"
            )
        if self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be at least 1 (got {self.update_proj_gap})")
        return {
            "count": 0,
            "next": 0,
            "gap": int(self.update_proj_gap),
            "seed": name_seed(name, self.seed),
            "refreshes": 0,
            "queue": [],
            "proj": {},
            "inner": self.inner.init(param, name),
        }

    def _refresh(self, G: Tensor, state: State) -> None:
        for side in sides(self.proj_type, tuple(G.shape)):
            sub: State = state["proj"].setdefault(side, {})
            old = self.projector.matrix(sub, side) if sub and self.lazy_threshold is not None else None
            seed = state["seed"] + 7919 * state["count"] + (1 if side == RIGHT else 0)
            self.projector.refresh(G, side, self.rank, sub, seed)
            if old is not None:
                state["queue"] = [
                    *state["queue"],
                    subspace_similarity(old, self.projector.matrix(sub, side), side),
                ]
                state["queue"] = state["queue"][-self.lazy_window :]
        state["refreshes"] += 1
        q = state["queue"]
        if (
            self.lazy_threshold is not None
            and len(q) >= self.lazy_window
            and sum(q) / len(q) >= self.lazy_threshold
        ):
            state["gap"] = max(1, int(state["gap"] * self.lazy_growth))
            state["queue"] = []
        state["next"] = state["count"] + state["gap"]

    def project(self, G: Tensor, state: State) -> Tensor:
        for side in sides(self.proj_type, tuple(G.shape)):
            P = self.projector.matrix(state["proj"][side], side).to(G.dtype)
            G = P.mT @ G if side == LEFT else G @ P.mT
        return G

    def project_back(self, R: Tensor, state: State, like: Tensor) -> Tensor:
        for side in sides(self.proj_type, tuple(like.shape)):
            P = self.projector.matrix(state["proj"][side], side).to(R.dtype)
            R = P @ R if side == LEFT else R @ P
        return R

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        if state["count"] >= state["next"] or not state["proj"]:
            self._refresh(grad, state)
        low = self.project(grad, state)
        state["count"] += 1
        direction, state["inner"] = self.inner.update(low, state["inner"], param)
        return self.project_back(direction, state, grad) * self.scale, state


def galore_adam(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projector: Projector | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    correct_bias: bool = True,
    seed: int = 0,
    lazy_threshold: float | None = None,
) -> LowRank:
    """GaLore-Adam on one weight: Adam in the projected space (GaLore, Algorithm 2)."""
    return LowRank(
        ScaleByAdam(betas[0], betas[1], eps, correct_bias),
        projector or SVD(),
        rank,
        update_proj_gap,
        scale,
        proj_type,
        seed,
        lazy_threshold,
    )


def projected_state_shape(shape: tuple[int, int], rank: int, proj_type: str) -> tuple[int, int]:
    """The shape of the projected gradient (and of the inner optimiser's moments)."""
    m, n = shape
    for side in sides(proj_type, shape):
        if side == LEFT:
            m = min(rank, m)
        else:
            n = min(rank, n)
    return m, n
