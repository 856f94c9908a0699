"""Each method's equation worked independently (numpy / hand-written small cases) and its parameter count.

Expected values are computed here from the papers' equations with plain numpy, never by calling the
method's own ``delta``; the PEFT comparisons for VeRA, RandLoRA, Bone/MiSS and HRA are in
``test_methods_peft.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from weightsmith.adapters import AdapterContext, SharedBases
from weightsmith.adapters.bone import Bone
from weightsmith.adapters.compacter import Compacter
from weightsmith.adapters.hra import HRA
from weightsmith.adapters.hydra import Hydra
from weightsmith.adapters.loldu import LoLDU
from weightsmith.adapters.monarch import Monarch, monarch_dense, monarch_project
from weightsmith.adapters.nola import NOLA
from weightsmith.adapters.randlora import RandLoRA, ScaledBasis
from weightsmith.adapters.sltrain import SLTrain
from weightsmith.adapters.svfit import SVFit
from weightsmith.adapters.vera import VeRA


def make(cfg, W0, name="w", shared=None, shapes=None, index=0):
    shared = shared if shared is not None else SharedBases(getattr(cfg, "seed", 0))
    ctx = AdapterContext(
        name, index, getattr(cfg, "seed", 0), "linear", shared, shapes=shapes or (tuple(W0.shape),)
    )
    return cfg.create(W0, ctx)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(adapter, seed=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def n(t):
    return t.detach().double().numpy()


@torch.no_grad()
def roundtrip(adapter, W0) -> float:
    """max |unmerge(merge(W0)) - W0|"""
    return float((adapter.unmerge(adapter.merge(W0)) - W0).abs().max())


def check(adapter, W0, expected, x_seed=9):
    """delta, merge and the fast path all equal the independently computed ΔW."""
    dW = n(adapter.delta(W0))
    assert np.abs(dW - expected).max() <= 1e-5 * (1 + np.abs(expected).max())
    x = rnd(5, W0.shape[1], seed=x_seed)
    y = n(adapter(x, W0, x @ W0.T))
    ref = n(x) @ (n(W0) + expected).T
    assert np.abs(y - ref).max() <= 1e-5 * (1 + np.abs(ref).max())


# ---------------------------------------------------------------- NOLA


def test_nola_equation_and_seeded_bases():
    W0 = rnd(12, 10)
    cfg = NOLA(rank=3, num_basis_A=7, num_basis_B=5, alpha=6.0)
    a = make(cfg, W0)
    randomize(a)
    Ab, Bb = n(a.A_basis), n(a.B_basis)
    assert Ab.shape == (7, 12, 3) and Bb.shape == (5, 3, 10)
    assert np.abs(Ab).max() <= 1 / math.sqrt(7) and np.abs(Bb).max() <= 1 / math.sqrt(5)
    A = np.einsum("k,kor->or", n(a.alpha), Ab)
    B = np.einsum("l,lri->ri", n(a.beta), Bb)
    check(a, W0, (6.0 / 3) * A @ B)
    # the bases are regenerated from the seed alone, never saved
    again = make(cfg, W0)
    assert torch.equal(again.A_basis, a.A_basis) and torch.equal(again.B_basis, a.B_basis)
    assert not torch.equal(make(NOLA(rank=3, num_basis_A=7, num_basis_B=5, seed=1), W0).A_basis, a.A_basis)
    assert set(a.state_dict()) == {"alpha", "beta"}


def test_nola_starts_at_zero_with_gradient_to_alpha():
    W0 = rnd(12, 10)
    a = make(NOLA(rank=3, num_basis_A=7, num_basis_B=5), W0)
    assert float(a.delta(W0).detach().abs().max()) == 0.0
    x = rnd(4, 10)
    a(x, W0, x @ W0.T).square().sum().backward()
    assert float(a.alpha.grad.abs().max()) > 0  # B = Σ β_j B_j is non-zero, so A's coefficients learn


# ---------------------------------------------------------------- VeRA


def test_vera_equation_and_shared_slices():
    shapes = ((12, 10), (8, 14))
    shared = SharedBases(0)
    a1 = make(VeRA(rank=4), rnd(*shapes[0]), shared=shared, shapes=shapes)
    a2 = make(VeRA(rank=4), rnd(*shapes[1]), shared=shared, shapes=shapes)
    assert a1.vera_A is a2.vera_A and tuple(a1.vera_A.shape) == (4, 14) and tuple(a1.vera_B.shape) == (12, 4)
    randomize(a1)
    A, B = n(a1.vera_A)[:, :10], n(a1.vera_B)[:12]
    expected = np.diag(n(a1.vera_lambda_b)) @ B @ np.diag(n(a1.vera_lambda_d)) @ A
    check(a1, rnd(*shapes[0]), expected)
    assert set(a1.state_dict()) == {"vera_lambda_d", "vera_lambda_b"}


# ---------------------------------------------------------------- RandLoRA


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_randlora_equation_is_full_rank(shape):
    W0 = rnd(*shape)
    a = make(RandLoRA(rank=5, alpha=10.0), W0)
    randomize(a, scale=1.0)
    d, D = min(shape), max(shape)
    nb = math.ceil(d / 5)
    assert (
        a.n == nb and tuple(a.randlora_lambda.shape) == (nb, 5) and tuple(a.randlora_gamma.shape) == (nb, d)
    )
    A = n(a.randlora_A)[:5, :d]
    Bs = n(a.randlora_B)[:D, :nb, :5]
    M = sum(
        Bs[:, i, :] @ np.diag(n(a.randlora_lambda)[i]) @ A @ np.diag(n(a.randlora_gamma)[i])
        for i in range(nb)
    )
    expected = 2.0 * (M if shape[0] >= shape[1] else M.T)
    check(a, W0, expected)
    assert np.linalg.matrix_rank(expected) == d  # full rank although every term has rank 5
    assert set(a.state_dict()) == {"randlora_lambda", "randlora_gamma"}  # no bases in the file


def test_randlora_scaled_basis_gradient():
    A = torch.randn(3, 6, dtype=torch.double)
    lam = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    gam = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l_, g_: ScaledBasis.apply(A, l_, g_), (lam, gam))


# ---------------------------------------------------------------- SVFit


def test_svfit_trains_top_singular_values():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.double))
    V, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.double))
    s = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5])
    W0 = torch.from_numpy(U.numpy()[:, :7] @ np.diag(s) @ V.numpy().T).float()
    a = make(SVFit(rank=3), W0)
    assert np.allclose(n(a.sigma), s[:3], atol=1e-4)
    with torch.no_grad():
        a.sigma.copy_(torch.tensor([10.0, 4.0, 6.0]))
    new_s = s.copy()
    new_s[:3] = [10.0, 4.0, 6.0]
    W_new = U.numpy()[:, :7] @ np.diag(new_s) @ V.numpy().T  # W' = U_r diag(σ) V_rᵀ + W_e
    check(a, W0, W_new - n(W0))


def test_svfit_energy_rank():
    W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    # cumulative energy 9, 13, 14 of 14: 90% needs r = 2
    assert make(SVFit(energy=0.9), W0).sigma.numel() == 2
    assert make(SVFit(), W0).sigma.numel() == 4


# ---------------------------------------------------------------- LoLDU


def test_loldu_by_hand_2x2():
    W0 = torch.tensor([[4.0, 3.0], [6.0, 3.0]])
    # partial pivoting: P swaps the rows, L = [[1, 0], [2/3, 1]], D = diag(6, 1), U = [[1, 1/2], [0, 1]]
    a = make(LoLDU(), W0)
    assert np.allclose(n(a.z), [6.0, 1.0]) and np.allclose(n(a.U), [[1, 0.5], [0, 1]])
    with torch.no_grad():
        a.z.copy_(torch.tensor([7.0, 3.0]))
    # ΔW = P L diag(1, 2) U = P [[1, 1/2], [2/3, 7/3]] = [[2/3, 7/3], [1, 1/2]]
    check(a, W0, np.array([[2 / 3, 7 / 3], [1.0, 0.5]]))
    with torch.no_grad():
        a.z.copy_(torch.tensor([6.0, 1.0]))
        a.sigma.fill_(2.0)
    check(a, W0, n(W0))  # σ = 2 with z = z0 doubles the (full-rank) decomposed part: W' = 2 W0


def test_loldu_factors_match_scipy_lu():
    W0 = rnd(7, 5)
    a = make(LoLDU(rank=3), W0)
    P, L, U = scipy.linalg.lu(n(W0))
    D = np.diag(U)
    assert np.allclose(n(a.PL), (P @ L)[:, :3], atol=1e-5)
    assert np.allclose(n(a.z0), D[:3], atol=1e-5) and np.allclose(n(a.U), (U / D[:, None])[:3], atol=1e-5)
    randomize(a)
    expected = (P @ L)[:, :3] @ np.diag(float(a.sigma.detach()) * n(a.z) - D[:3]) @ (U / D[:, None])[:3]
    check(a, W0, expected)


# ---------------------------------------------------------------- Bone / MiSS


def test_bone_miss_by_hand():
    W0 = rnd(3, 5)
    a = make(Bone(rank=2), W0)
    with torch.no_grad():
        a.miss_block.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # ΔW[o, i] = D[i mod 2, o]
    expected = np.array([[1, 4, 1, 4, 1], [2, 5, 2, 5, 2], [3, 6, 3, 6, 3]], dtype=float)
    check(a, W0, expected)


def test_bone_bat_by_hand_and_unmerge():
    W0 = rnd(2, 4)
    a = make(Bone(rank=2, variant="bat"), W0)
    D = np.array([[0.5, -1.0], [2.0, 0.25]])
    with torch.no_grad():
        a.miss_block.copy_(torch.from_numpy(D)[None].float())
    W = n(W0)
    blocks = [W[:, :2], W[:, 2:]]
    expected = np.concatenate([Wb @ D + D for Wb in blocks], axis=1)  # ΔW_ij = W_ij D_i + D_i
    check(a, W0, expected)
    assert roundtrip(a, W0) < 1e-5


# ---------------------------------------------------------------- HRA


def test_hra_by_hand_two_reflections():
    W0 = rnd(3, 2)
    a = make(HRA(rank=2), W0)
    with torch.no_grad():
        a.hra_u.copy_(torch.tensor([[2.0, 0.0], [0.0, -3.0]]))
    # H = (I - 2 e1 e1ᵀ)(I - 2 e2 e2ᵀ) = -I, so W' = -W0
    check(a, W0, -2 * n(W0))
    assert a.regularizer() is None
    lam = make(HRA(rank=2, ortho_lambda=0.5), W0)
    with torch.no_grad():
        lam.hra_u.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))  # u1 ∥ u2: ‖I - ÛᵀÛ‖² = 2
    assert abs(float(lam.regularizer().detach()) - 0.5 * 2) < 1e-6


def test_hra_is_orthogonal_and_unmerges():
    W0 = rnd(6, 8)
    a = make(HRA(rank=4), W0)
    randomize(a, scale=1.0)
    u = n(a.hra_u)
    H = np.eye(8)
    for i in range(4):
        v = u[:, i] / np.linalg.norm(u[:, i])
        H = H @ (np.eye(8) - 2 * np.outer(v, v))
    check(a, W0, n(W0) @ H - n(W0))
    Wm = a.merge(W0).detach()
    assert np.allclose(n(Wm) @ n(Wm).T, n(W0) @ n(W0).T, atol=1e-4)  # rows keep their lengths and angles
    assert roundtrip(a, W0) < 1e-5


# ---------------------------------------------------------------- Hydra


def test_hydra_equation_and_authors_reparameterisation():
    W0 = rnd(6, 5)
    a = make(Hydra(rank=2, scale=0.5), W0)
    randomize(a)
    Ap, Bp, As, Bs = (n(t) for t in (a.A_p, a.B_p, a.A_s, a.B_s))
    expected = 0.5 * (Bp @ Ap + Bs @ As @ n(W0))
    check(a, W0, expected)
    # the authors' merge, in their x @ W layout: W = W0 + s (Wp + W0 Ws), Wp = Apᵀ Bpᵀ, Ws = Asᵀ Bsᵀ
    W0t = n(W0).T
    merged_t = W0t + 0.5 * (Ap.T @ Bp.T + W0t @ (As.T @ Bs.T))
    assert np.allclose(n(a.merge(W0)), merged_t.T, atol=1e-5)
    assert roundtrip(a, W0) < 1e-5


# ---------------------------------------------------------------- Compacter


def test_compacter_sum_of_kronecker_products_and_shared_rule():
    shared = SharedBases(0)
    shapes = ((8, 12), (12, 8))
    a = make(Compacter(phm_dim=2, rank=2), rnd(8, 12), shared=shared, shapes=shapes)
    b = make(Compacter(phm_dim=2, rank=2), rnd(12, 8), shared=shared, shapes=shapes, name="v", index=1)
    assert a.phm_rule is b.phm_rule
    assert "phm_rule" in dict(a.named_parameters()) and "phm_rule" not in dict(b.named_parameters())
    randomize(a)
    A, s, t = n(a.phm_rule), n(a.phm_s), n(a.phm_t)
    expected = sum(np.kron(A[i], s[i] @ t[i].T) for i in range(2))
    check(a, rnd(8, 12), expected)


# ---------------------------------------------------------------- Monarch


def test_monarch_dense_is_P2_L_P1_R():
    k = l = 3
    b, p, s = 2, 4, 5  # in = k p = 12, out = l s = 15, q = b l = 6
    R, L = rnd(k, b * l, p, seed=1), rnd(l, s, k * b, seed=2)
    Rd = scipy.linalg.block_diag(*n(R))  # [k q, in]
    Ld = scipy.linalg.block_diag(*n(L))  # [out, l k b]
    mid = k * b * l
    P1 = np.zeros((mid, mid))  # (k q) -> (k b, l) -> transpose to (l, k b)
    for i in range(mid):
        rho, lam = divmod(i, l)
        P1[lam * (k * b) + rho, i] = 1
    P2 = np.zeros((l * s, l * s))  # (l, s) -> (s, l)
    for c in range(l):
        for sig in range(s):
            P2[sig * l + c, c * s + sig] = 1
    assert np.allclose(n(monarch_dense(R, L)), P2 @ Ld @ P1 @ Rd, atol=1e-5)


def test_monarch_projection_is_blockwise_optimal():
    k, b = 3, 2
    R, L = rnd(k, b * k, 4, seed=1), rnd(k, 5, k * b, seed=2)
    M = monarch_dense(R, L)
    R2, L2 = monarch_project(M, k, b)
    assert np.allclose(n(monarch_dense(R2, L2)), n(M), atol=1e-4)  # a Monarch matrix is its own projection
    W = rnd(15, 12, seed=3)
    err = np.linalg.norm(n(W) - n(monarch_dense(*monarch_project(W, k, b))))
    # Eckart-Young per permuted block: the error is the energy of each block's singular values beyond b
    blocks = n(W).reshape(5, k, k, 4).transpose(1, 2, 0, 3)
    tail = sum(
        (np.linalg.svd(blocks[c, a], compute_uv=False)[b:] ** 2).sum() for c in range(k) for a in range(k)
    )
    assert abs(err - math.sqrt(tail)) < 1e-4


def test_monarch_adapter_equation():
    W0 = rnd(8, 12)
    a = make(Monarch(nblocks=2, block_rank=2), W0)
    M0 = n(monarch_dense(a.R0, a.L0))
    randomize(a)
    check(a, W0, n(monarch_dense(a.R, a.L)) - M0)


# ---------------------------------------------------------------- SLTrain


def test_sltrain_equation_and_support():
    W0 = rnd(10, 20)
    a = make(SLTrain(rank=2, alpha=6.0, density=0.1), W0)
    rows, cols = (n(t).astype(int) for t in a.index)
    assert len(rows) == 20 and len({(r, c) for r, c in zip(rows, cols, strict=True)}) == 20
    randomize(a)
    S = np.zeros((10, 20))
    S[rows, cols] = n(a.values)
    check(a, W0, 3.0 * n(a.B) @ n(a.A) + S)
    same = make(SLTrain(rank=2, alpha=6.0, density=0.1), W0)
    other = make(SLTrain(rank=2, alpha=6.0, density=0.1), W0, name="other")
    assert torch.equal(same.index, a.index) and not torch.equal(other.index, a.index)
    assert set(a.state_dict()) == {"A", "B", "values"}


def test_sltrain_support_is_uniform():
    counts = torch.zeros(6, 8)
    for i in range(300):
        a = make(SLTrain(rank=1, density=0.25), torch.zeros(6, 8), name=f"w{i}")
        counts[a.index[0], a.index[1]] += 1
    # each of the 48 cells is picked with probability 12/48: mean 75 of 300, sd ≈ 7.5
    assert float(counts.sum()) == 300 * 12 and float((counts - 75).abs().max()) < 35


# ---------------------------------------------------------------- parameter counts (384 x 384, defaults)

D_IN = D_OUT = 384


def count(cfg) -> int:
    return sum(p.numel() for p in make(cfg, rnd(D_OUT, D_IN)).parameters())


@pytest.mark.parametrize(
    ("cfg", "paper"),
    [
        (NOLA(), lambda c: c.num_basis_A + c.num_basis_B),  # k + l coefficients
        (VeRA(), lambda c: c.rank + D_OUT),  # d [r] and b [out]
        (RandLoRA(), lambda c: math.ceil(D_IN / c.rank) * (c.rank + D_IN)),  # n (Λ_i [r] + Γ_i [d])
        (SVFit(), lambda c: min(D_OUT, D_IN)),  # one per singular value
        (LoLDU(), lambda c: min(D_OUT, D_IN) + 1),  # the diagonal z and the scale σ
        (Bone(), lambda c: c.rank * D_OUT),  # one [r, out] shard
        (HRA(), lambda c: c.rank * D_IN),  # r reflection vectors
        (Hydra(), lambda c: c.rank * (D_IN + D_OUT) + 2 * c.rank * D_OUT),  # parallel + sequential LoRA
        (Compacter(), lambda c: c.rank * (D_OUT + D_IN) + c.phm_dim**3),  # fast s_i, t_i + shared A_i
        (Monarch(), lambda c: c.block_rank * c.nblocks * (D_IN + D_OUT)),  # two block-diagonal factors
        (SLTrain(), lambda c: c.rank * (D_IN + D_OUT) + round(c.density * D_IN * D_OUT)),  # B, A, values
    ],
    ids=lambda v: type(v).__name__ if not callable(v) else "",
)
def test_parameter_count_matches_paper(cfg, paper):
    assert count(cfg) == paper(cfg)
