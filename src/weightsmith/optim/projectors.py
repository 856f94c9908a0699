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

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        state["P"] = (U[:, :rank] if side == LEFT else Vh[:rank, :]).to(G.dtype).contiguous()

    def matrix(self, state: State, side: str) -> Tensor:
        return state["P"]


@dataclass(frozen=True)
class RandomizedSVD:
    """Top-r singular subspace by a randomized range finder with ``power_iters`` power iterations."""

    oversample: int = 8
    power_iters: int = 2
    warm_start: bool = True
    name: str = "rsvd"

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        A = G.float() if side == LEFT else G.float().mT  # left singular vectors of A are wanted
        m, n = A.shape
        k = min(rank + self.oversample, m, n)
        gen = _generator(seed, A.device)
        if self.warm_start and "P" in state:
            prev = self.matrix(state, side).float()
            prev = prev if side == LEFT else prev.mT
            extra = (
                torch.randn(m, k - prev.shape[1], device=A.device, generator=gen)
                if k > prev.shape[1]
                else None
            )
            start = prev if extra is None else torch.cat([prev, extra], dim=1)
            Q, _ = torch.linalg.qr(A @ (A.mT @ start))
        else:
            Q, _ = torch.linalg.qr(A @ torch.randn(n, k, device=A.device, generator=gen))
        for _ in range(self.power_iters):
            Q, _ = torch.linalg.qr(A.mT @ Q)
            Q, _ = torch.linalg.qr(A @ Q)
        Ub, _, _ = torch.linalg.svd(Q.mT @ A, full_matrices=False)
        U = (Q @ Ub[:, :rank]).to(G.dtype)
        state["P"] = U.contiguous() if side == LEFT else U.mT.contiguous()

    def matrix(self, state: State, side: str) -> Tensor:
        return state["P"]


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

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        A = G.float() if side == LEFT else G.float().mT
        D = dct_basis(A.shape[0], A.device)
        energy = (D.mT @ A).square().sum(dim=1)
        state["idx"] = torch.topk(energy, min(rank, energy.numel())).indices
        state["dim"] = int(A.shape[0])

    def matrix(self, state: State, side: str) -> Tensor:
        idx = state["idx"]
        cols = dct_basis(int(state["dim"]), idx.device)[:, idx]
        return cols if side == LEFT else cols.mT.contiguous()


@dataclass(frozen=True)
class RandomProjection:
    """A fresh seeded random matrix at each refresh: ``kind="gaussian"`` or ``"sparse"`` (very sparse)."""

    kind: str = "gaussian"
    name: str = "random"

    def refresh(self, G: Tensor, side: str, rank: int, state: State, seed: int) -> None:
        k = G.shape[0] if side == LEFT else G.shape[1]
        gen = _generator(seed, G.device)
        if self.kind == "gaussian":
            P = torch.randn(k, rank, device=G.device, generator=gen) / math.sqrt(rank)
        else:
            s = math.sqrt(k)
            u = torch.rand(k, rank, device=G.device, generator=gen)
            signs = (u < 1 / (2 * s)).float() - (u > 1 - 1 / (2 * s)).float()
            P = signs * math.sqrt(s / rank)
        P = P.to(G.dtype)
        state["P"] = P if side == LEFT else P.mT.contiguous()

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
