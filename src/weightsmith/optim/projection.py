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

Under FSDP2 a weight whose one projected side the projector computes from sums over rows (``row_sides``:
the randomized SVD, random projections, the DCT) is updated on its row shard without gathering the
gradient (:mod:`weightsmith.optim.sharded`); the others gather it, one weight at a time.
"""

from __future__ import annotations

import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from .projectors import LEFT, RIGHT, SVD, Projector
from .sharded import Rows, local, reduce_many, rows, rows_of, use
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


def subspace_similarity(old: Tensor, new: Tensor, side: str, where: Rows | None = None) -> float:
    """``||P_old^T P_new||_F^2 / r`` for orthonormal bases (left: columns, right: rows); a left basis split
    by rows (``where``) sums its shards' products."""
    a, b = (local(old).float(), local(new).float()) if side == LEFT else (old.float().mT, new.float().mT)
    r = max(1, min(a.shape[1], b.shape[1]))
    overlap = a.mT @ b
    if side == LEFT and where is not None:
        overlap = where.reduce(overlap)
    return float(overlap.square().sum()) / r


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

    def shards_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether the update of an ``shape`` weight can run on row shards (FSDP2) without gathering the
        gradient: one projected side, which the projector computes from sums over rows."""
        chosen = sides(self.proj_type, (int(shape[0]), int(shape[1])))
        return len(chosen) == 1 and chosen[0] in getattr(self.projector, "row_sides", ())

    def due(self, state: State) -> bool:
        """Whether the next update refreshes the subspace."""
        return bool(state["count"] >= state["next"] or not state["proj"])

    def refresh_many(self, items: list[tuple[Tensor, State]], batch_bytes: int = 2**29) -> None:
        """Refresh, before their updates, the subspaces of the weights that are due, with same-shaped
        gradients batched (``projector.refresh_batch``, in groups of at most ``batch_bytes`` of float32
        gradient); their updates then find the subspace fresh. Row-sharded (FSDP2) gradients are refreshed
        from their local rows, a batch's sums over rows taking one all-reduce per stage for the whole batch.
        Without a batched projector it does nothing (each update refreshes its own)."""
        if getattr(self.projector, "refresh_batch", None) is None:
            return
        groups: dict[tuple[Any, ...], list[tuple[Tensor, State]]] = {}
        for G, state in items:
            if self.due(state):
                where = rows_of(G) if isinstance(G, DTensor) else None
                # keyed by the whole shape, the same on every process (so are the chunks below)
                key = (tuple(G.shape), G.dtype, G.device, where)
                groups.setdefault(key, []).append((local(G), state))
        for (shape, _, _, where), group in groups.items():
            size = max(1, batch_bytes // (4 * shape[0] * shape[1]))
            for i in range(0, len(group), size):
                chunk = group[i : i + size]
                with use(where) if where is not None else nullcontext():
                    self._refresh_all([G for G, _ in chunk], [st for _, st in chunk])

    def _refresh(self, G: Tensor, state: State) -> None:
        self._refresh_all([G], [state])

    def _refresh_all(self, Gs: list[Tensor], states: list[State]) -> None:
        where = rows(Gs[0])
        batch = getattr(self.projector, "refresh_batch", None)
        for side in sides(self.proj_type, where.shape):
            subs: list[State] = [state["proj"].setdefault(side, {}) for state in states]
            lazy = self.lazy_threshold is not None
            olds = [self.projector.matrix(sub, side) if sub and lazy else None for sub in subs]
            seeds = [st["seed"] + 7919 * st["count"] + (1 if side == RIGHT else 0) for st in states]
            if batch is not None and len(Gs) > 1:
                batch(Gs, side, self.rank, subs, seeds)
            else:
                for G, sub, seed in zip(Gs, subs, seeds, strict=True):
                    self.projector.refresh(G, side, self.rank, sub, seed)
            for state, sub, old in zip(states, subs, olds, strict=True):
                if old is not None:
                    similarity = subspace_similarity(old, self.projector.matrix(sub, side), side, where)
                    state["queue"] = [*state["queue"], similarity][-self.lazy_window :]
        for state in states:
            state["refreshes"] += 1
            q = state["queue"]
            full = self.lazy_threshold is not None and len(q) >= self.lazy_window
            if full and sum(q) / len(q) >= self.lazy_threshold:  # type: ignore[operator]
                state["gap"] = max(1, int(state["gap"] * self.lazy_growth))
                state["queue"] = []
            state["next"] = state["count"] + state["gap"]

    def project(
        self,
        G: Tensor,
        state: State,
        pending: list[tuple[Tensor, Rows]] | None = None,
        wrap: bool = True,
    ) -> Tensor:
        """``P^T G`` (left) or ``G P^T`` (right). On row shards a left product is summed over the processes
        and a right one stays split by rows (a row-sharded DTensor, so the inner optimiser's state is too;
        ``wrap=False`` returns the local rows, for an inner optimiser whose sharded state exists already).
        With ``pending``, a one-sided left product on row shards is returned unsummed and listed there, for
        the caller to sum many at once (:func:`~weightsmith.optim.sharded.reduce_many`)."""
        where = rows(G)
        chosen = sides(self.proj_type, where.shape)
        for side in chosen:
            P = local(self.projector.matrix(state["proj"][side], side)).to(G.dtype)
            if side == RIGHT:
                G = G @ P.mT
                G = where.wrap(G) if wrap else G
            elif pending is not None and where.split and len(chosen) == 1:
                G = P.mT @ G
                pending.append((G, where))
            else:
                G = where.reduce(P.mT @ G)
        return G

    def project_back(self, R: Tensor, state: State, like: Tensor) -> Tensor:
        """The inverse of :meth:`project`: this process's rows of ``P N`` (left) or ``N P`` (right)."""
        R = local(R)
        for side in sides(self.proj_type, rows(like).shape):
            P = local(self.projector.matrix(state["proj"][side], side)).to(R.dtype)
            R = P @ R if side == LEFT else R @ P
        return R

    def update_many(self, items: list[tuple[Tensor, State, Tensor]]) -> list[Tensor] | None:
        """:meth:`update` of several weights (``(grad, state, param)``), Adam's moment updates done by
        multi-tensor (foreach) kernels over all of them: the same arithmetic as :class:`ScaleByAdam`, op for
        op, in a handful of kernel launches instead of several per weight. Row-sharded (FSDP2) gradients are
        updated on their local rows, the left projections of all of them summed by one all-reduce; the
        updates returned are then local rows. None when the inner optimiser is not Adam or a sharded
        gradient cannot be updated on its rows (the caller then updates one weight at a time)."""
        adam = self.inner
        if not isinstance(adam, ScaleByAdam) or not items:
            return None
        wheres = []
        for grad, _, _ in items:
            where = rows_of(grad) if isinstance(grad, DTensor) else rows(grad)
            if where is None or (where.split and not self.shards_rows(tuple(grad.shape))):
                return None
            wheres.append(where)
        lows = []
        pending: list[tuple[Tensor, Rows]] = []
        for (grad, state, param), where in zip(items, wheres, strict=True):
            with use(where):
                if self.due(state):
                    self._refresh(local(grad), state)
                # Adam's moments are created (row-sharded, from a DTensor) on its first update only
                low = self.project(local(grad), state, pending, wrap="mu" not in state["inner"])
                lows.append((low, state["inner"], param))
            state["count"] += 1
        reduce_many(pending)
        us = adam.update_many(lows)
        out = []
        for u, (grad, state, _), where in zip(us, items, wheres, strict=True):
            with use(where):
                out.append(self.project_back(u, state, local(grad)) * self.scale)
        return out

    def update(self, grad: Tensor, state: State, param: Tensor) -> tuple[Tensor, State]:
        if self.due(state):
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
