"""Projectors: where a low-rank gradient optimiser finds its r-dimensional subspace.

A projector fills a layer's projector state at each refresh (``refresh``; matrices are computed in float32
and stored in the gradient's dtype, as galore-torch does) and returns the projection matrix (``matrix``) in
galore-torch's orientation: for ``side="left"`` an m x r matrix P with ``R = P^T G`` and
``G ~ P R``; for ``side="right"`` an r x n matrix P with ``R = G P^T`` and ``G ~ R P``. The state holds
tensors and plain values only (a checkpoint reloads it with ``torch.load(weights_only=True)``).

- ``SVD``: exact top-r singular vectors of the gradient ("GaLore: Memory-Efficient LLM Training by Gradient
  Low-Rank Projection", Zhao et al., 2024, Algorithm 2: ``U, S, V = SVD(G_t); P_t = U[:, :r]``).
- ``RandomizedSVD``: the randomized range finder with power iterations ("Finding structure with randomness",
  Halko, Martinsson & Tropp, 2011, Algorithms 4.3/5.1: ``Q = orth((G G^T)^q G Omega)``, SVD of ``Q^T G``),
  seeded by the layer's seed and the step, warm-started from the previous subspace when there is one.
- ``DCT``: SVD-free column selection from the orthonormal DCT-II basis D: keep the r columns with the largest
  projected energy ``||D[:, j]^T G||^2`` ("SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
  Models", Modoranu et al., 2025). Only the r indices are stored; D is recomputed (and cached) when needed.
- ``RandomProjection``: a Gaussian matrix with entries N(0, 1/r), or the very sparse random projection of
  "Very Sparse Random Projections" (Li, Hastie & Church, 2006) with ``s = sqrt(k)``: entries
  ``sqrt(s/r) * {+1, 0, -1}`` with probabilities ``{1/2s, 1 - 1/s, 1/2s}``; both have ``E[P P^T] = I``.
- ``Quantized``: wraps another projector and stores P in 4 bits, symmetric per group of ``group_size``
  values ("Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients", Zhang et
  al., 2024, Sec. 3.2). Lazy, layer-adaptive refresh lives in :mod:`weightsmith.optim.projection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .sharded import current, local, reduce_many, rows
from .transform import State

LEFT, RIGHT = "left", "right"


class Projector(Protocol):
    @property
    def name(self) -> str: ...

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        """Compute a new subspace from gradient ``G`` (m x n) and store it in ``state``."""
        ...

    def matrix(self, state: State, side: str) -> Tensor:
        """The projection matrix (left: m x r, right: r x n)."""
        ...


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed % (2**63))
    return g


@dataclass(frozen=True)
class SVD:
    """Exact economy SVD of the gradient in float32, as galore-torch computes it."""

    name: str = "svd"
    row_sides: tuple[str, ...] = ()  # galore-torch's SVD of the whole gradient: gathered under FSDP2

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        state["P"] = (U[:, :rank] if side == LEFT else Vh[:rank, :]).to(G.dtype).contiguous()

    def matrix(self, state: State, side: str) -> Tensor:
        return state["P"]


@dataclass(frozen=True)
class RandomizedSVD:
    """Top-r singular subspace by a randomized range finder with ``power_iters`` power iterations.

    A warm-started refresh runs ``warm_power_iters`` (1): the previous subspace is already close, so each
    refresh continues one subspace iteration across refreshes rather than starting over.

    The subspace iteration runs on the row space, ``Q <- orth(G^T G Q)`` ("Finding structure with
    randomness", Halko, Martinsson & Tropp, 2011, Alg. 4.4), started from the previous subspace (warm start)
    and seeded random columns; it ends with the eigenproblem of ``(G Q)^T (G Q) = V S^2 V^T``: the right
    singular vectors are ``Q V``, the left ones ``G Q V S^-1`` (directions whose singular value is below
    1e-6 of the largest are left out as zero columns). Every product is a sum over the gradient's rows, so
    under FSDP2 the same code runs on row shards with all-reduces of n x k and k x k matrices
    (:mod:`weightsmith.optim.sharded`); a left projector is then split by rows as the gradient. Signs are
    fixed (the largest entry of each right vector positive) so that the result does not depend on the split.
    """

    oversample: int = 8
    power_iters: int = 2
    warm_power_iters: int = 1
    warm_start: bool = True
    name: str = "rsvd"
    row_sides: tuple[str, ...] = (LEFT, RIGHT)

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        self.refresh_batch([G], side, rank, [state], [seed])

    def refresh_batch(
        self, Gs: list[Tensor], side: str, rank: int, states: list[State], seeds: list[int]
    ) -> None:
        """:meth:`refresh` of same-shaped gradients at once (batched matrix products, QR and eigh)."""
        where = rows(Gs[0])
        A = torch.stack([G.float() for G in Gs])  # this process's rows of each gradient
        m, n = where.shape
        k = min(rank + self.oversample, m, n)
        starts = []
        warm = self.warm_start and all("P" in state for state in states)
        bases: list[Tensor | None] = []  # the old row spaces; a left one's sums over rows in one all-reduce
        for G, state in zip(Gs, states, strict=True):
            prev = local(state["P"]).float() if self.warm_start and "P" in state else None
            bases.append(None if prev is None else prev.mT if side == RIGHT else G.float().mT @ prev)
        if side == LEFT:
            reduce_many([(b, where) for b in bases if b is not None])
        for basis, seed in zip(bases, seeds, strict=True):
            start = torch.randn(n, k, device=A.device, generator=_generator(seed, A.device))
            if basis is not None:
                start = torch.cat([basis[:, :k], start[:, basis.shape[1] :]], dim=1)
            starts.append(start)
        Q = orthonormal(where.reduce(A.mT @ (A @ torch.stack(starts))))
        for _ in range(self.warm_power_iters if warm else self.power_iters):
            Q = orthonormal(where.reduce(A.mT @ (A @ Q)))
        C = (A @ Q).double()  # rows of G Q
        evals, V = torch.linalg.eigh(where.reduce(C.mT @ C))
        V, sigma = V.flip(-1)[..., :rank], evals.flip(-1)[..., :rank].clamp_min(0).sqrt()
        W = Q.double() @ V  # the right singular vectors, n x r
        sign = torch.where(W.gather(1, W.abs().argmax(dim=1, keepdim=True)) >= 0, 1.0, -1.0)
        if side == RIGHT:
            P = (W * sign).mT
        else:
            keep = sigma > 1e-6 * sigma[..., :1].clamp_min(1e-30)
            P = (C @ (V * sign)) * torch.where(keep, 1.0 / sigma.clamp_min(1e-30), 0.0).unsqueeze(-2)
        for i, state in enumerate(states):
            Pi = P[i].to(Gs[i].dtype).contiguous()
            state["P"] = Pi if side == RIGHT else where.wrap(Pi)

    def matrix(self, state: State, side: str) -> Tensor:
        return state["P"]  # type: ignore[no-any-return]


def orthonormal(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of (batched) ``Y``, by CholeskyQR2 in float64.

    Two passes of ``Y <- Y chol(Y^T Y)^-T`` ("CholeskyQR2: a simple and communication-avoiding algorithm for
    computing a tall-skinny QR factorization", Fukaya, Nakatsukasa, Yanagisawa & Yamamoto, 2014) are
    orthonormal to working precision while ``cond(Y)`` stays below about ``1e8``; on the GPU they cost a
    GEMM and a small batched Cholesky instead of a Householder QR per matrix (24x faster on an H200 for 22
    matrices of 2048 x 520). A Gram matrix that is not numerically positive definite falls back to
    Householder QR.
    """
    Z = Y.double()
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Z.mT @ Z)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y)[0]
        Z = torch.linalg.solve_triangular(L, Z.mT, upper=False).mT
    return Z.to(Y.dtype)


_DCT_CACHE: dict[tuple[int, str], Tensor] = {}


def dct_basis(k: int, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal DCT-II basis as the columns of a k x k float32 matrix: ``D[i, j] = sqrt(2/k) * c_j *
    cos(pi * (i + 1/2) * j / k)``, ``c_0 = 1/sqrt(2)``, ``c_j = 1`` otherwise."""
    key = (k, str(device))
    if key not in _DCT_CACHE:
        i = torch.arange(k, dtype=torch.float64).unsqueeze(1)
        j = torch.arange(k, dtype=torch.float64).unsqueeze(0)
        D = math.sqrt(2.0 / k) * torch.cos(math.pi * (i + 0.5) * j / k)
        D[:, 0] /= math.sqrt(2.0)
        if len(_DCT_CACHE) > 32:
            _DCT_CACHE.clear()
        _DCT_CACHE[key] = D.to(device=device, dtype=torch.float32)
    return _DCT_CACHE[key]


@dataclass(frozen=True)
class DCT:
    """The r DCT-II basis vectors with the most gradient energy; the state is their indices (``idx``)."""

    name: str = "dct"
    # on row shards: right, the column energies are sums over rows (an all-reduce of n values); left,
    # ``D^T G = sum_i D_i^T G_i`` (an all-reduce of m x n at a refresh only), the basis then split by rows
    row_sides: tuple[str, ...] = (LEFT, RIGHT)

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        where = rows(G)
        dim = where.shape[0] if side == LEFT else where.shape[1]
        D = dct_basis(dim, G.device)
        if side == LEFT:
            energy = where.reduce(where.take(D).mT @ G.float()).square().sum(dim=1)
        else:
            energy = where.reduce((D.mT @ G.float().mT).square().sum(dim=1))
        state["idx"] = torch.topk(energy, min(rank, energy.numel())).indices
        state["dim"] = int(dim)

    def matrix(self, state: State, side: str) -> Tensor:
        """Left: the selected columns (this process's rows of them inside a row-shard context); right:
        their transpose."""
        idx = state["idx"]
        cols = dct_basis(int(state["dim"]), idx.device)[:, idx]
        if side == LEFT:
            where = current()
            return where.take(cols) if where is not None else cols
        return cols.mT.contiguous()


@dataclass(frozen=True)
class RandomProjection:
    """A fresh seeded random matrix at each refresh: ``kind="gaussian"`` or ``"sparse"`` (very sparse)."""

    kind: str = "gaussian"
    name: str = "random"
    row_sides: tuple[str, ...] = (LEFT, RIGHT)  # drawn whole from the seed; a left one split by rows

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        where = rows(G)
        k = where.shape[0] if side == LEFT else where.shape[1]
        gen = _generator(seed, G.device)
        if self.kind == "gaussian":
            P = torch.randn(k, rank, device=G.device, generator=gen) / math.sqrt(rank)
        else:
            s = math.sqrt(k)
            u = torch.rand(k, rank, device=G.device, generator=gen)
            signs = (u < 1 / (2 * s)).float() - (u > 1 - 1 / (2 * s)).float()
            P = signs * math.sqrt(s / rank)
        P = P.to(G.dtype)
        state["P"] = where.wrap(where.take(P).contiguous()) if side == LEFT else P.mT.contiguous()

    def matrix(self, state: State, side: str) -> Tensor:
        return state["P"]


def quantize_int4(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric 4-bit quantisation per group: codes ``round(x / s)`` in [-8, 7] with ``s = max|x| / 7``,
    stored two to a byte (uint8); returns ``(packed, scales)``."""
    flat = x.float().reshape(-1)
    pad = (-flat.numel()) % (2 * group_size)
    flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, group_size)
    scale = groups.abs().amax(dim=1).clamp_min(1e-12) / 7.0
    codes = (torch.round(groups / scale[:, None]).clamp(-8, 7) + 8).to(torch.uint8).view(-1)
    return codes[0::2] | (codes[1::2] << 4), scale


def dequantize_int4(packed: Tensor, scale: Tensor, shape: list[int], group_size: int) -> Tensor:
    codes = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1).float() - 8.0
    values = (codes.view(-1, group_size) * scale[:, None]).view(-1)
    return values[: math.prod(shape)].view(shape)


@dataclass(frozen=True)
class Quantized:
    """``inner``'s projection matrix kept in INT4 (two codes a byte, one float32 scale per group)."""

    inner: Projector
    group_size: int = 64

    row_sides: tuple[str, ...] = ()  # packed codes do not split by rows: gathered under FSDP2

    @property
    def name(self) -> str:
        return f"q4-{self.inner.name}"

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        if "q" in state:  # the inner projector may warm-start from the previous subspace
            state["P"] = self.matrix(state, side)
        self.inner.refresh(G, side, rank, state, seed)
        P = state.pop("P")
        state["q"], state["qscale"] = quantize_int4(P, self.group_size)
        state["qshape"] = list(P.shape)

    def matrix(self, state: State, side: str) -> Tensor:
        return dequantize_int4(state["q"], state["qscale"], state["qshape"], self.group_size)


PROJECTORS = ("svd", "rsvd", "dct", "random", "sparse")


def make_projector(name: str, quantized: bool = False) -> Projector:
    """A projector by its CLI name (``svd``, ``rsvd``, ``dct``, ``random``, ``sparse``), optionally INT4."""
    table: dict[str, Projector] = {
        "svd": SVD(),
        "rsvd": RandomizedSVD(),
        "dct": DCT(),
        "random": RandomProjection("gaussian"),
        "sparse": RandomProjection("sparse", name="sparse"),
    }
    if name not in table:
        raise ValueError(f"unknown projector '{name}'; known: {', '.join(PROJECTORS)}")
    return Quantized(table[name]) if quantized else table[name]
