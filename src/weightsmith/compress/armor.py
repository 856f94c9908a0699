"""ARMOR: an N:M (2:4) sparse core wrapped in block-diagonal correctors, fitted by block coordinate descent.

Liu, Liu, Wang, Zhao & Yang, "ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix
Factorization", 2025 (arXiv 2510.05528). Every weight is replaced by

    Ŵ = A · (W′ ⊙ M) · B

with ``M`` a 2:4 (N:M) mask, ``S = W′ ⊙ M`` the sparse core, and ``A`` [out, out], ``B`` [in, in]
block-diagonal with square blocks of ``block_size`` (both start as the identity), so ``x ↦ A(S(Bx))`` still
runs the sparse core on the 2:4 kernels and adds two cheap block-diagonal products. The factors minimise the
paper's layer-wise, calibration-weighted proxy loss (NoWag's: the input second moment kept on its diagonal)

    L(A, S, B) = Σ_ij h_j (W − A S B)_ij²,      h_j = ‖X_j‖₂² / n

by block coordinate descent; every step below is an exact minimisation over its block (or a descent step),
so L never rises above the loss of the initial pruning (the paper's guarantee):

1. ``A``: for each block of output rows, the weighted least-squares solution (closed form);
2. ``B``: for each block of input columns, the least-squares solution (``h`` drops out: it weights
   columns, and each column of ``B`` is solved on its own);
3. the kept values of ``S``: conjugate-gradient steps on the quadratic L restricted to the mask;
4. the mask (the discrete step): in every (output block × input block) tile of ``S``, the group of ``M``
   weights with the largest gradient L1 norm is re-chosen among all C(M, N) patterns, each with its optimal
   values, keeping the best; tiles do not interact because ``A`` and ``B`` are block-diagonal.

The initial core is Wanda's (``init="wanda"``, close to the paper's NoWag-P start) or SparseGPT's N:M
result. Unstructured sparsity is not offered: the paper's core is N:M only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer
from ._core import CompressReport
from ._sparse import Refiner, SparseWeight


def block_left(A: Tensor, X: Tensor) -> Tensor:
    """``A X`` for block-diagonal ``A`` given as its blocks [nb, b, b] and ``X`` [nb·b, n]."""
    nb, b, _ = A.shape
    return (A @ X.reshape(nb, b, -1)).reshape(nb * b, -1)


def block_right(X: Tensor, B: Tensor) -> Tensor:
    """``X B`` for ``X`` [m, nb·b] and block-diagonal ``B`` given as its blocks [nb, b, b]."""
    nb, b, _ = B.shape
    return torch.einsum("mkb,kbc->mkc", X.reshape(X.shape[0], nb, b), B).reshape(X.shape[0], nb * b)


def _t(blocks: Tensor) -> Tensor:
    return blocks.transpose(1, 2)


@dataclass
class ArmorWeight:
    """``Ŵ = A S B``: ``A`` [out/b, b, b] and ``B`` [in/b, b, b] diagonal blocks, ``core`` the sparse ``S``;
    ``losses``: the proxy loss at the start and after each iteration."""

    A: Tensor
    core: SparseWeight
    B: Tensor
    losses: list[float] = field(default_factory=list)

    def dequantize(self) -> Tensor:
        """The dense weight the model runs with."""
        return block_left(self.A, block_right(self.core.W, self.B))

    @property
    def mask(self) -> Tensor:
        return self.core.mask

    @property
    def params(self) -> int:
        """Stored values: the core's kept weights plus the corrector blocks."""
        return int(self.core.mask.sum()) + self.A.numel() + self.B.numel()


def proxy_loss(W: Tensor, A: Tensor, S: Tensor, B: Tensor, h: Tensor) -> float:
    """``Σ_ij h_j (W − A S B)_ij²``."""
    E = W - block_left(A, block_right(S, B))
    return float((E.square() * h).sum())


def _solve(K: Tensor, R: Tensor) -> Tensor:
    """``K⁻¹ R`` for a batch of symmetric PSD ``K``, with a tiny ridge for singular blocks."""
    ridge = 1e-7 * K.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(K + ridge[..., None, None] * eye, R)


def update_a(W: Tensor, S: Tensor, B: Tensor, h: Tensor, b: int) -> Tensor:
    """Blocks of ``A`` minimising L for fixed ``S``, ``B``: ``A_i = W_i H P_iᵀ (P_i H P_iᵀ)⁻¹``, P = S B."""
    P = block_right(S, B).reshape(-1, b, W.shape[1])
    Wv = W.reshape(-1, b, W.shape[1])
    K = (P * h) @ _t(P)
    R = (Wv * h) @ _t(P)
    return _t(_solve(K, _t(R)))


def update_b(W: Tensor, A: Tensor, S: Tensor, b: int) -> Tensor:
    """Blocks of ``B`` minimising L for fixed ``A``, ``S``: ``B_k = (Q_kᵀ Q_k)⁻¹ Q_kᵀ W_k``, Q = A S."""
    out_f, in_f = W.shape
    Q = block_left(A, S).reshape(out_f, in_f // b, b).transpose(0, 1)
    Wv = W.reshape(out_f, in_f // b, b).transpose(0, 1)
    return _solve(_t(Q) @ Q, _t(Q) @ Wv)


def update_values(W: Tensor, A: Tensor, S: Tensor, B: Tensor, keep: Tensor, h: Tensor, steps: int) -> Tensor:
    """Conjugate-gradient steps on the kept values of ``S`` (L is quadratic in them)."""

    def op(V: Tensor) -> Tensor:  # the Hessian of L/2 applied to V, restricted to the mask
        return block_right(block_left(_t(A), block_left(A, block_right(V, B)) * h), _t(B)) * keep

    E = W - block_left(A, block_right(S, B))
    r = block_right(block_left(_t(A), E * h), _t(B)) * keep
    p, rr = r.clone(), float(r.square().sum())
    for _ in range(steps):
        if rr == 0.0:
            break
        Ap = op(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0.0:
            break
        alpha = rr / pAp
        S = S + alpha * p
        r = r - alpha * Ap
        rr_new = float(r.square().sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    return S


def update_groups(
    W: Tensor, A: Tensor, S: Tensor, B: Tensor, keep: Tensor, h: Tensor, n: int, m: int
) -> tuple[Tensor, Tensor]:
    """The discrete step: in every tile, the N:M group with the largest gradient L1 norm gets the best of
    the C(M, N) patterns, each with its least-squares values (the rest of ``S`` fixed)."""
    out_f, in_f = W.shape
    nbo, bo, _ = A.shape
    nbi, bi, _ = B.shape
    gpb = bi // m  # groups per tile row
    E = W - block_left(A, block_right(S, B))
    grad = block_right(block_left(_t(A), E * h), _t(B))
    gnorm = grad.reshape(out_f, in_f // m, m).abs().sum(-1)  # [out, groups]
    tiles = gnorm.reshape(nbo, bo, nbi, gpb).permute(0, 2, 1, 3).reshape(nbo * nbi, bo * gpb)
    pick = tiles.argmax(1)
    ti = torch.arange(nbo * nbi, device=W.device)
    i, k = ti // nbi, ti % nbi
    r_loc, g_loc = pick // gpb, pick % gpb
    rows = i * bo + r_loc
    cols = (k * bi + g_loc * m).unsqueeze(1) + torch.arange(m, device=W.device)  # [T, m]
    a = A[i, :, r_loc]  # [T, bo]: column r_loc of A_i
    Bg = B[k.unsqueeze(1), (g_loc * m).unsqueeze(1) + torch.arange(m, device=W.device)]  # [T, m, bi]
    Et = E.reshape(nbo, bo, nbi, bi)[i, :, k, :]  # [T, bo, bi]
    hk = h.reshape(nbi, bi)[k]  # [T, bi]
    s_old = S[rows.unsqueeze(1), cols]  # [T, m]
    aa = a.square().sum(1).clamp_min(1e-30)  # [T]
    u = (Et * a.unsqueeze(2)).sum(1) + (Bg * s_old.unsqueeze(2)).sum(1) * aa.unsqueeze(1)  # E_resᵀ a
    rhs = (Bg * (hk * u).unsqueeze(1)).sum(2)  # [T, m]
    K = (Bg * hk.unsqueeze(1)) @ _t(Bg)  # [T, m, m]
    pats = torch.tensor(list(itertools.combinations(range(m), n)), device=W.device)  # [P, n]
    Kp = K[:, pats.unsqueeze(2), pats.unsqueeze(1)]  # [T, P, n, n]
    rp = rhs[:, pats]  # [T, P, n]
    sol = _solve(Kp, rp.unsqueeze(-1)).squeeze(-1)  # K_p⁻¹ rhs_p
    gain = (rp * sol).sum(-1) / aa.unsqueeze(1)  # reduction of L by the optimal values on pattern p
    best_gain, best = gain.max(1)
    now = 2 * (s_old * rhs).sum(1) - aa * (s_old.unsqueeze(1) @ K @ s_old.unsqueeze(2)).flatten()
    ok = best_gain > now * (1 + 1e-6) + 1e-12
    if not bool(ok.any()):
        return S, keep
    s_new = torch.zeros_like(s_old)
    s_new.scatter_(1, pats[best], sol[ti, best] / aa.unsqueeze(1))
    k_new = torch.zeros_like(s_old, dtype=torch.bool).scatter_(1, pats[best], True)
    S, keep = S.clone(), keep.clone()
    r_ok, c_ok = rows[ok].unsqueeze(1).expand(-1, m), cols[ok]
    S[r_ok, c_ok] = s_new[ok]
    keep[r_ok, c_ok] = k_new[ok]
    return S, keep


def armor_fit(
    W: Tensor,
    init: SparseWeight,
    h: Tensor,
    block_size: int = 64,
    iters: int = 30,
    cg_steps: int = 3,
    swaps: int = 1,
) -> ArmorWeight:
    """Block coordinate descent from the pruning ``init`` of ``W`` [out, in], channel weights ``h`` [in]."""
    W = W.float()
    h = h.to(W).clamp_min(0)
    h = h / h.mean().clamp_min(1e-30)
    n, m, b = init.n, init.m, block_size
    out_f, in_f = W.shape
    eye = torch.eye(b, dtype=W.dtype, device=W.device)
    A = eye.repeat(out_f // b, 1, 1)
    B = eye.repeat(in_f // b, 1, 1)
    S, keep = init.W.float().clone(), init.mask.clone()
    losses = [proxy_loss(W, A, S, B, h)]
    for _ in range(iters):
        cur = losses[-1]
        for step in ("A", "B"):
            new = update_a(W, S, B, h, b) if step == "A" else update_b(W, A, S, b)
            trial = proxy_loss(W, new, S, B, h) if step == "A" else proxy_loss(W, A, S, new, h)
            if trial <= cur:  # exact minimisers; the check only guards against the ridge
                A, B = (new, B) if step == "A" else (A, new)
                cur = trial
        S = update_values(W, A, S, B, keep, h, cg_steps)
        for _ in range(swaps):
            S, keep = update_groups(W, A, S, B, keep, h, n, m)
        losses.append(proxy_loss(W, A, S, B, h))
    return ArmorWeight(A, SparseWeight(S * keep, keep, n, m), B, losses)


@register_config("armor", kind="compress")
class ARMOR(Refiner):
    """ARMOR (N:M only, default 2:4; ``block_size`` of the correctors, dividing every layer's in and out
    sizes; ``iters`` of block coordinate descent; ``cg_steps`` per value update; ``swaps``: groups re-chosen
    per tile per iteration; ``init``: wanda or sparsegpt)."""

    inits = ("wanda", "sparsegpt")
    n: int = 2
    m: int = 4
    block_size: int = 64
    iters: int = 30
    cg_steps: int = 3
    swaps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.m:
            raise WeightsmithError(
                f"armor options n={self.n}, m={self.m}: ARMOR's sparse core is N:M (e.g. n=2, m=4); "
                "unstructured sparsity is not supported"
            )
        if self.block_size < 1 or self.block_size % self.m:
            raise WeightsmithError(
                f"armor option block_size={self.block_size}: must be a positive multiple of m={self.m}"
            )
        for opt in ("iters", "cg_steps", "swaps"):
            if getattr(self, opt) < 0:
                raise WeightsmithError(f"armor option {opt}={getattr(self, opt)}: must be >= 0")

    def check_layers(self, layers: Sequence[Layer]) -> None:
        super().check_layers(layers)
        for ly in layers:
            if ly.shape[0] % self.block_size or ly.shape[1] % self.block_size:
                raise WeightsmithError(
                    f"armor option block_size={self.block_size} does not divide the shape {ly.shape} of "
                    f"'{ly.name}' (the correctors' blocks tile both sizes)"
                )

    def describe(self, report: CompressReport) -> str:
        ws = [w for w in report.weights.values() if isinstance(w, ArmorWeight)]
        dense = sum(w.mask.numel() for w in ws)
        extra = sum(w.A.numel() + w.B.numel() for w in ws)
        share = 100 * extra / max(dense, 1)
        return f"{self.n}:{self.m} sparse cores; block-diagonal correctors add {share:.1f} % parameters"

    def prune(self, W: Tensor, stats: InputStats | None) -> ArmorWeight:  # type: ignore[override]
        if stats is None:
            raise WeightsmithError("armor needs calibration statistics (pass calib=)")
        if W.shape[0] % self.block_size or W.shape[1] % self.block_size:
            raise WeightsmithError(
                f"armor option block_size={self.block_size} does not divide the shape {tuple(W.shape)}"
            )
        init = self.base().prune(W, stats)
        h = stats.norms().square() / stats.n
        return armor_fit(W, init, h, self.block_size, self.iters, self.cg_steps, self.swaps)


def armor_tensors(name: str, path: str, w: ArmorWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """The weightsmith-format tensors of one ARMOR weight ``name`` (module ``path``): the core in the
    bitmask layout under ``name`` and the corrector blocks as ``path.armor_a`` / ``path.armor_b``."""
    from ._sparse import bitmask_tensors

    out = bitmask_tensors(name, w.core, dtype)
    out[f"{path}.armor_a"] = w.A.cpu().to(dtype).contiguous()
    out[f"{path}.armor_b"] = w.B.cpu().to(dtype).contiguous()
    return out


def densify_armor(state: dict[str, Tensor]) -> None:
    """In a state dict whose cores are already dense (``path.weight`` = S), replace each ``S`` by
    ``A S B`` and drop the corrector tensors, in place."""
    for key in [k for k in state if k.endswith(".armor_a")]:
        path = key[: -len(".armor_a")]
        A, B = state.pop(key).float(), state.pop(f"{path}.armor_b").float()
        S = state[f"{path}.weight"]
        state[f"{path}.weight"] = block_left(A, block_right(S.float(), B)).to(S.dtype)
