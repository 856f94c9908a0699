"""PLeaS: partial permutation matching, then layer-wise least squares, to a chosen width.

PLeaS - Merging Models with Permutations and Least Squares. Anshul Nasery, Jonathan Hayase, Pang Wei Koh,
Sewoong Oh, CVPR 2025, arXiv:2407.02447.

Step 1 (Permutations): per hidden layer, match A's units to B's by activation correlation (a linear
assignment). With a budget of ``m`` merged units out of ``n`` per model (``n <= m <= 2n``), the
``k = 2n - m`` best-correlated pairs are merged and the other ``n - k`` units of each model are kept
apart, so the width interpolates between 1x (fully merged) and 2x (the ensemble).
Step 2 (Least Squares): layer by layer, the merged weights ``W`` minimise
``||W [H_M; 1] - T||^2``, where ``H_M`` are the merged model's own features at the previous layer and
``T`` the permuted features of the originals: the mean of a merged pair's pre-activations, a kept unit's
own pre-activation, and the mean of the two models' logits at the output. As in the reference code,
rows of a unit kept from A never read units kept only from B (and vice versa).

Scope and one extension, stated: this file merges MLPs (an ``nn.Sequential`` of ``Linear`` and
element-wise activations). For ``m < n`` it keeps the ``m`` best-correlated pairs and drops the rest
(pruning, then least squares), which the paper does not cover.
``zip_average`` builds the same units without least squares (matched units averaged, kept units
copied), the "align then average" baseline; at ``m = n`` it is the average of the aligned models.

Solvers for Step 2 (``solver``): "exact" (LAPACK ``gelsd``, minimum norm), "normal" (Cholesky of the
normal equations ``[H 1]ᵀ[H 1] + ridge``, the same solution when that matrix is positive definite, which
``ridge > 0`` ensures; else ``gelsd``; 2.3-2.7x faster than ``gelsd`` on MiniLM-sized features, see
docs/components.md), "sketch" (sketch-and-solve with a ``sketch`` = "srht" / "countsketch" / "gaussian" of
``sketch_factor · (d + 1)`` rows: ``(1 + ε)`` residual and the ℓ∞ coordinate bound of Price, Song & Woodruff
2017) and "sketch-lsqr" (the sketch as a preconditioner, then CGLS to the exact solution); see
:mod:`weightsmith.sketching`. The ridge rows are never sketched. A layer whose feature matrix has no more
rows than the sketch is solved exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..errors import WeightsmithError
from ..sketching import SKETCHES, sketch_and_solve, sketch_preconditioned_lsq

SOLVERS = ("exact", "normal", "sketch", "sketch-lsqr")


@dataclass(frozen=True)
class Units:
    """Merged units of one layer, in order: ``pairs`` (A unit, B unit), then ``a_only``, then ``b_only``."""

    pairs: list[tuple[int, int]]
    a_only: list[int]
    b_only: list[int]

    @property
    def width(self) -> int:
        return len(self.pairs) + len(self.a_only) + len(self.b_only)

    def merge_matrices(self, n: int) -> tuple[Tensor, Tensor]:
        """``M_A, M_B`` (width x n): merged feature = ``M_A f_A + M_B f_B`` (pairs averaged)."""
        MA, MB = torch.zeros(self.width, n), torch.zeros(self.width, n)
        for u, (i, j) in enumerate(self.pairs):
            MA[u, i] = MB[u, j] = 0.5
        off = len(self.pairs)
        for u, i in enumerate(self.a_only):
            MA[off + u, i] = 1.0
        for u, j in enumerate(self.b_only):
            MB[off + len(self.a_only) + u, j] = 1.0
        return MA, MB

    def unmerge_matrices(self, n: int) -> tuple[Tensor, Tensor]:
        """``U_A, U_B`` (n x width): A's unit ``i`` is read back from the merged unit holding it."""
        MA, MB = self.merge_matrices(n)
        return (MA > 0).float().T, (MB > 0).float().T


def correlation(h_a: Tensor, h_b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between every unit of A (columns of ``h_a``) and every unit of B."""
    za = (h_a - h_a.mean(0)) / (h_a.std(0) + eps)
    zb = (h_b - h_b.mean(0)) / (h_b.std(0) + eps)
    return za.T @ zb / (len(h_a) - 1)


def partial_match(corr: Tensor, width: int) -> Units:
    """Step 1: full assignment by correlation, then merge only the best-correlated pairs the width allows."""
    n = corr.shape[0]
    if not 1 <= width <= 2 * n:
        raise WeightsmithError(f"PLeaS width {width} is outside 1..{2 * n} for a layer of {n} units")
    rows, cols = linear_sum_assignment(corr.double().numpy(), maximize=True)
    order = sorted(range(n), key=lambda r: -float(corr[rows[r], cols[r]]))
    k = width if width <= n else 2 * n - width  # merged pairs
    pairs = [(int(rows[r]), int(cols[r])) for r in order[:k]]
    rest = order[k:] if width > n else []  # units kept apart, one of each model per leftover pair
    return Units(pairs, sorted(int(rows[r]) for r in rest), sorted(int(cols[r]) for r in rest))


def check_solver(solver: str, sketch_factor: float, sketch: str = "srht") -> None:
    if solver not in SOLVERS:
        raise WeightsmithError(f"PLeaS option solver={solver!r}: use one of {', '.join(SOLVERS)}")
    if sketch not in SKETCHES:
        raise WeightsmithError(f"PLeaS option sketch={sketch!r}: use one of {', '.join(SKETCHES)}")
    if solver.startswith("sketch") and not sketch_factor > 1:
        raise WeightsmithError(
            f"PLeaS option sketch_factor={sketch_factor}: the sketch needs more rows than columns (> 1)"
        )


def least_squares(
    H: Tensor,
    T: Tensor,
    ridge: float = 0.0,
    solver: str = "exact",
    sketch_factor: float = 4.0,
    seed: int = 0,
    sketch: str = "srht",
) -> tuple[Tensor, Tensor]:
    """Step 2 for one layer: ``(W, b) = argmin ||H W^T + b - T||^2 + ridge' ||W||^2`` in float64 (``ridge`` is
    relative to the mean feature energy; the bias is not penalised). ``solver``, ``sketch`` (the sketch's
    kind, :data:`weightsmith.sketching.SKETCHES`): module docstring."""
    check_solver(solver, sketch_factor, sketch)
    n, d = H.shape
    Ha = torch.cat([H.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    Td = T.double()
    if ridge > 0 and d:  # ridge as extra rows sqrt(reg) [I 0] -> 0 (better conditioned than normal equations)
        reg = ridge * float((H.double() ** 2).sum(0).mean())
        Ha = torch.cat(
            [
                Ha,
                torch.cat(
                    [reg**0.5 * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], 1
                ),
            ]
        )
        Td = torch.cat([Td, torch.zeros(d, T.shape[1], dtype=torch.float64)])
    rows = int(sketch_factor * (d + 1))
    if solver in ("sketch", "sketch-lsqr") and rows >= n:
        solver = "exact"  # the sketch would be no smaller than the data
    sol = _solve(Ha, Td, solver, rows, sketch, seed, keep=len(Ha) - n).T  # (out, in + 1)
    return sol[:, :-1].float(), sol[:, -1].float()


def _solve(A: Tensor, B: Tensor, solver: str, rows: int, sketch: str, seed: int, keep: int) -> Tensor:
    """``argmin_X ‖A X − B‖`` by ``solver`` (module docstring); the last ``keep`` rows are never sketched."""
    if solver == "sketch":
        return sketch_and_solve(A, B, rows, sketch, seed, keep)
    if solver == "sketch-lsqr":
        return sketch_preconditioned_lsq(A, B, rows, sketch, seed, keep)[0]
    if solver == "normal":  # Cholesky of AᵀA; a singular one falls back to gelsd
        L, info = torch.linalg.cholesky_ex(A.T @ A)
        if int(info) == 0:
            return torch.cholesky_solve(A.T @ B, L)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution  # minimum norm if rank-deficient


def _layers(seq: nn.Sequential) -> list[tuple[nn.Linear, nn.Module | None]]:
    mods = list(seq)
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            act = mods[i + 1] if i + 1 < len(mods) and not isinstance(mods[i + 1], nn.Linear) else None
            out.append((m, act))
        elif i == 0 or not isinstance(mods[i - 1], nn.Linear):
            raise WeightsmithError(
                f"PLeaS merges MLPs (Linear, activation, ...); got {type(m).__name__} at {i}"
            )
    return out


@torch.no_grad()
def _features(seq: nn.Sequential, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(pre-activation, post-activation) of every Linear layer."""
    feats, h = [], x
    for lin, act in _layers(seq):
        z = lin(h)
        h = act(z) if act is not None else z
        feats.append((z, h))
    return feats


def _build(template: nn.Sequential, weights: list[tuple[Tensor, Tensor]]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for (_lin, act), (W, b) in zip(_layers(template), weights, strict=False):
        new = nn.Linear(W.shape[1], W.shape[0])
        new.weight.data.copy_(W)
        new.bias.data.copy_(b)
        mods += [new] + ([type(act)()] if act is not None else [])
    return nn.Sequential(*mods).eval()


def _plan(seq_a: nn.Sequential, seq_b: nn.Sequential, x: Tensor, width: float) -> list[Units]:
    units = []
    for (_, ha), (_, hb) in zip(_features(seq_a, x)[:-1], _features(seq_b, x)[:-1], strict=False):
        units.append(partial_match(correlation(ha, hb), max(1, round(width * ha.shape[1]))))
    return units


@torch.no_grad()
def zip_average(seq_a: nn.Sequential, seq_b: nn.Sequential, x: Tensor, width: float = 1.0) -> nn.Sequential:
    """Baseline on the same units: ``W_M = M_A W_A U_A + M_B W_B U_B`` (merge/unmerge, no fitting)."""
    units, weights = _plan(seq_a, seq_b, x, width), []
    for li, ((la, _), (lb, _)) in enumerate(zip(_layers(seq_a), _layers(seq_b), strict=False)):
        n_out = la.out_features
        MA, MB = units[li].merge_matrices(n_out) if li < len(units) else (torch.eye(n_out) / 2,) * 2
        UA, UB = units[li - 1].unmerge_matrices(la.in_features) if li else (torch.eye(la.in_features),) * 2
        W = MA @ la.weight @ UA + MB @ lb.weight @ UB
        weights.append((W, MA @ la.bias + MB @ lb.bias))
    return _build(seq_a, weights)


@torch.no_grad()
def pleas_merge(
    seq_a: nn.Sequential,
    seq_b: nn.Sequential,
    x: Tensor,
    width: float = 1.0,
    ridge: float = 1e-4,
    solver: str = "exact",
    sketch_factor: float = 4.0,
    sketch: str = "srht",
) -> nn.Sequential:
    """Merge two MLPs into one whose hidden layers have ``round(width * n)`` units, fitting each layer by
    least squares on features of ``x`` (a batch of training inputs) with ``solver`` (module docstring)."""
    check_solver(solver, sketch_factor, sketch)
    lsq = LeastSquares(ridge, solver, sketch_factor, sketch)
    units = _plan(seq_a, seq_b, x, width)
    fa, fb = _features(seq_a, x), _features(seq_b, x)
    layers = _layers(seq_a)
    h, weights = x, []
    for li, (lin, act) in enumerate(layers):
        za, zb = fa[li][0], fb[li][0]
        if li == len(layers) - 1:
            T, groups = (za + zb) / 2, None
        else:
            MA, MB = units[li].merge_matrices(lin.out_features)
            T, groups = za @ MA.T + zb @ MB.T, units[li]
        prev = units[li - 1] if li else None
        W, b = _masked_least_squares(h, T, groups, prev, lsq)
        weights.append((W, b))
        z = h @ W.T + b
        h = act(z) if act is not None else z
    return _build(seq_a, weights)


@dataclass(frozen=True)
class LeastSquares:
    """The Step-2 options of one merge: ``solve(H, T)`` is :func:`least_squares` with them."""

    ridge: float = 0.0
    solver: str = "exact"
    sketch_factor: float = 4.0
    sketch: str = "srht"

    def solve(self, H: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
        return least_squares(H, T, self.ridge, self.solver, self.sketch_factor, sketch=self.sketch)


def _masked_least_squares(
    H: Tensor, T: Tensor, out: Units | None, inp: Units | None, lsq: LeastSquares
) -> tuple[Tensor, Tensor]:
    """Rows of units kept from one model read only shared inputs and that model's own kept inputs."""
    if out is None or inp is None or not (out.a_only and inp.b_only):
        return lsq.solve(H, T)
    W, b = torch.zeros(T.shape[1], H.shape[1]), torch.zeros(T.shape[1])
    p, na, nb = len(inp.pairs), len(inp.a_only), len(inp.b_only)
    cols_all = torch.arange(H.shape[1])
    shared_a = cols_all[: p + na]
    shared_b = torch.cat([cols_all[:p], cols_all[p + na : p + na + nb]])
    q, ma = len(out.pairs), len(out.a_only)
    for rows, cols in (
        (torch.arange(q), cols_all),
        (torch.arange(q, q + ma), shared_a),
        (torch.arange(q + ma, T.shape[1]), shared_b),
    ):
        if len(rows):
            Wr, br = lsq.solve(H[:, cols], T[:, rows])
            W[rows[:, None], cols[None, :]] = Wr
            b[rows] = br
    return W, b
