"""Row-chunked evaluation of one :class:`~weightsmith.merge.task_arithmetic.GTA` merge of one tensor.

Float32 work buffers are the size of a chunk (about 4 M elements), not of the tensor, so a 128k x 2048
embedding merges with its bf16 inputs plus one output buffer in memory. Quantities that need the whole
tensor (the top-k threshold and its tie budget, mergekit's L1 rescale factor) come from a pre-pass over
the same chunks; random masks are drawn per (task, chunk) from seeds, so a re-draw is identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor

from .task_arithmetic import GTA, GTAState, gta_finalize, gta_init, gta_update, magnitude_threshold

CHUNK = 1 << 22


def chunk_generator(seed: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{chunk}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


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
    spec: GTA,
    weights: Sequence[float],
    densities: Sequence[float],
    thresholds: Sequence[float | None] | None = None,
    seeds: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``base + spec(tau_1..tau_n)`` (or the weighted average when ``not spec.uses_base``), chunk by chunk.
    ``thresholds`` are model-wide magnitude cuts (TIES ``trim="model"``); ``seeds`` one per task (DARE)."""
    shape, ref = thetas[0].shape, thetas[0]
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
        mag, cut = t.abs(), thr[i]
        assert cut is not None
        mask = mag > cut
        tied = mag == cut
        n_tied = int(tied.sum())
        if budget is not None and n_tied > budget[i]:  # keep exactly k: the first ties by position
            flat = tied.reshape(-1)
            flat[flat.nonzero()[int(budget[i]) :, 0]] = False
            n_tied = int(budget[i])
        if budget is not None:
            budget[i] -= n_tied
        return t * (mask | tied)

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


def _dense_state(acc: Tensor, weights: Sequence[float], n: int, spec: GTA) -> GTAState:
    div = float(n) if spec.normalize == "count" else float(sum(weights))
    return GTAState(acc, torch.tensor(div, device=acc.device))
