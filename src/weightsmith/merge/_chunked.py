"""Row-chunked evaluation of one :class:`~weightsmith.merge.task_arithmetic.GTA` merge of one tensor, and
the fold over task vectors it runs (``gta_init`` / ``gta_update`` / ``gta_finalize``).

Float32 work buffers are the size of a chunk (about 4 M elements), not of the tensor, so a 128k x 2048
embedding merges with its bf16 inputs plus one output buffer in memory. Quantities that need the whole
tensor (the top-k threshold and its tie budget, mergekit's L1 rescale factor) come from a pre-pass over
the same chunks; random masks are drawn per (task, chunk) from seeds, so a re-draw is identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from ..linalg import above_threshold, magnitude_threshold, stable_seed


class Row(Protocol):
    """What the kernels read of a :class:`~weightsmith.merge.task_arithmetic.GTA` row (its fields)."""

    @property
    def sparsify(self) -> str: ...
    @property
    def density(self) -> float: ...
    @property
    def trim(self) -> str: ...
    @property
    def rescale(self) -> str: ...
    @property
    def elect(self) -> str: ...
    @property
    def normalize(self) -> str: ...
    @property
    def scaling(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def uses_base(self) -> bool: ...


CHUNK = 1 << 22


# ------------------------------------------------------------------------ the fold over task vectors


@dataclass
class GTAState:
    """Running sums for one tensor. Without election: ``pos`` holds sum_i w_i tau_i and ``pos_div`` the
    divisor. With election: positive / negative kept parts, their divisors, and the vote (``sum``)."""

    pos: Tensor
    pos_div: Tensor
    neg: Tensor | None = None
    neg_div: Tensor | None = None
    vote: Tensor | None = None


def gta_init(like: Tensor, spec: Row) -> GTAState:
    z = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    if spec.elect == "none":
        return GTAState(z, torch.zeros((), dtype=torch.float32, device=like.device))
    return GTAState(
        z,
        torch.zeros_like(z),
        torch.zeros_like(z),
        torch.zeros_like(z),
        torch.zeros_like(z) if spec.elect == "sum" else None,
    )


def gta_update(state: GTAState, tau: Tensor, weight: float, spec: Row) -> GTAState:
    """Add one (already sparsified, float32) task vector. The state's tensors are updated in place."""
    unit = 1.0 if spec.normalize == "count" else weight
    if spec.elect == "none":
        state.pos.add_(tau, alpha=weight)
        state.pos_div.add_(unit)
        return state
    assert state.neg is not None and state.neg_div is not None
    x = tau * weight
    s = tau if spec.elect == "sum" else x  # the sign each task votes with
    up, down = s > 0, s < 0
    state.pos.add_(torch.where(up, x, 0.0))
    state.neg.add_(torch.where(down, x, 0.0))
    state.pos_div.add_(up, alpha=unit)
    state.neg_div.add_(down, alpha=unit)
    if state.vote is not None:
        state.vote.add_(tau)
    return state


def gta_finalize(state: GTAState, spec: Row) -> Tensor:
    """The merged update: lambda * (elected part) / (divisor); sign ties (sum 0) go to +."""
    if spec.elect == "none":
        mixed, div = state.pos, state.pos_div
        if spec.normalize != "none":
            mixed = mixed / (div if float(div.abs()) >= 1e-8 else 1.0)
    else:
        assert state.neg is not None and state.neg_div is not None
        vote = state.vote if state.vote is not None else state.pos + state.neg
        plus = vote >= 0
        mixed = torch.where(plus, state.pos, state.neg)
        if spec.normalize != "none":
            div = torch.where(plus, state.pos_div, state.neg_div)
            mixed = mixed / torch.where(div == 0, 1.0, div)
    return mixed * spec.scaling if spec.scaling != 1.0 else mixed


def chunk_generator(seed: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stable_seed(f"{seed}/{chunk}"))


def row_chunks(shape: Sequence[int]) -> tuple[int, list[slice]]:
    rows = int(shape[0]) if len(shape) else 1
    per_row = max(1, int(torch.Size(shape).numel()) // max(rows, 1))
    step = max(1, CHUNK // per_row)
    return rows, [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def _taus(tau: Callable[[int, slice], Tensor], i: int, chunks: list[slice]) -> Iterator[Tensor]:
    return (tau(i, c) for c in chunks)


def merge_streamed(
    base: Tensor | None,
    thetas: Sequence[Tensor],
    spec: Row,
    weights: Sequence[float],
    densities: Sequence[float],
    thresholds: Sequence[float | None] | None = None,
    seeds: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``base + spec(tau_1..tau_n)`` (or the weighted average when ``not spec.uses_base``), chunk by chunk.
    ``thresholds`` are model-wide magnitude cuts (TIES ``trim="model"``); ``seeds`` one per task (DARE)."""
    shape, ref = thetas[0].shape, thetas[0]
    if ref.numel() == 0:  # a zero-size tensor (an empty buffer) merges to itself
        return torch.empty(shape, dtype=out_dtype or torch.float32, device=ref.device)
    rows, chunks = row_chunks(shape)
    B = base.reshape(rows, -1) if base is not None and spec.uses_base else None
    X = [t.reshape(rows, -1) for t in thetas]
    n = len(X)
    seeds = list(seeds) if seeds is not None else list(range(n))
    thr: list[float | None] = list(thresholds) if thresholds is not None else [None] * n
    ties_left = [float("inf")] * n
    scale = [1.0] * n

    def tau(i: int, c: slice) -> Tensor:
        x = X[i][c].float()
        return x - B[c].float() if B is not None else x

    def keep(i: int, j: int, t: Tensor, budget: list[float] | None) -> Tensor:
        d = densities[i]
        if spec.sparsify == "none" or d >= 1.0:
            return t
        if d <= 0.0:
            return torch.zeros_like(t)
        if spec.sparsify == "random":
            return t * (
                torch.rand(t.shape, device=t.device, generator=chunk_generator(seeds[i], j, t.device)) < d
            )
        cut = thr[i]
        assert cut is not None
        left = None if budget is None or budget[i] == float("inf") else int(budget[i])
        mask, n_tied = above_threshold(t.abs(), cut, left)  # keep exactly k: the first ties by position
        if budget is not None:
            budget[i] -= n_tied
        return t * mask

    for i in range(n):
        d = densities[i]
        if spec.sparsify == "magnitude" and 0.0 < d < 1.0 and thr[i] is None:
            k = max(1, int(d * ref.numel()))
            cut = magnitude_threshold(partial(_taus, tau, i, chunks), k)
            thr[i] = cut
            ties_left[i] = k - sum(int((tau(i, c).abs() > cut).sum()) for c in chunks)
        if spec.rescale == "l1" and spec.sparsify != "none" and 0.0 < d < 1.0:
            before = after = 0.0
            budget = list(ties_left)
            for j, c in enumerate(chunks):
                t = tau(i, c)
                before += float(t.abs().sum())
                after += float(keep(i, j, t, budget).abs().sum())
            scale[i] = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        elif spec.rescale == "inverse" and spec.sparsify != "none" and 0.0 < d < 1.0:
            scale[i] = 1.0 / d

    out = torch.empty((rows, X[0].shape[1]), dtype=out_dtype or torch.float32, device=ref.device)
    budget = list(ties_left)
    dense = spec.elect == "none" and all(spec.sparsify == "none" or d >= 1.0 for d in densities)
    for j, c in enumerate(chunks):
        bc = B[c].float() if B is not None else None
        if dense:  # sum_i w_i tau_i = sum_i w_i theta_i - (sum_i w_i) theta_0: no per-task temporaries
            acc = torch.zeros(X[0][c].shape, dtype=torch.float32, device=ref.device)
            for i in range(n):
                acc.add_(X[i][c], alpha=weights[i])
            if bc is not None:
                acc.sub_(bc, alpha=sum(weights))
            mixed = gta_finalize(_dense_state(acc, weights, n, spec), spec)
        else:
            state = gta_init(X[0][c], spec)
            for i in range(n):
                x = torch.sub(X[i][c], bc) if bc is not None else X[i][c].float()  # never in place
                t = keep(i, j, x, budget)
                state = gta_update(state, t * scale[i] if scale[i] != 1.0 else t, weights[i], spec)
            mixed = gta_finalize(state, spec)
        out[c] = mixed.add_(bc) if bc is not None else mixed
    return out.reshape(shape)


def _dense_state(acc: Tensor, weights: Sequence[float], n: int, spec: Row) -> GTAState:
    div = float(n) if spec.normalize == "count" else float(sum(weights))
    return GTAState(acc, torch.tensor(div, device=acc.device))
