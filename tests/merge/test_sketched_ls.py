"""Sketched least squares (weightsmith.sketching) and PLeaS's sketched solvers vs numpy, scipy, theory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from weightsmith.errors import WeightsmithError
from weightsmith.merge.pleas import least_squares, pleas_merge
from weightsmith.sketching import (
    SKETCHES,
    fwht,
    sketch_and_solve,
    sketch_preconditioned_lsq,
    sketch_rows,
)

torch.set_num_threads(1)


def problem(m=600, d=8, k=2, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    X = torch.randn(d, k, generator=g, dtype=torch.float64)
    return A, A @ X + noise * torch.randn(m, k, generator=g, dtype=torch.float64)


def test_fwht_is_sylvester_hadamard():
    X = torch.randn(32, 3, dtype=torch.float64)
    ref = scipy.linalg.hadamard(32) @ X.numpy() / np.sqrt(32)
    assert np.abs(fwht(X).numpy() - ref).max() < 1e-12


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketches_embed_a_subspace(kind):
    """Singular values of S U (U orthonormal [m, d]) near 1: ‖S U x‖ ≈ ‖x‖ (the embedding property)."""
    U = torch.linalg.qr(torch.randn(3000, 4, dtype=torch.float64))[0]
    sv = torch.linalg.svdvals(sketch_rows(U, 600, kind, seed=3))
    assert float(sv.min()) > 0.75 and float(sv.max()) < 1.25


def test_keep_rows_pass_through():
    M = torch.randn(50, 3, dtype=torch.float64)
    out = sketch_rows(M, 10, "countsketch", keep=4)
    assert out.shape == (14, 3) and torch.equal(out[10:], M[46:])


@pytest.mark.parametrize("kind", SKETCHES)
def test_preconditioned_lsq_matches_numpy_lstsq(kind):
    A, B = problem()
    ref = np.linalg.lstsq(A.numpy(), B.numpy(), rcond=None)[0]
    X, iters = sketch_preconditioned_lsq(A, B, 40, kind, seed=1)
    assert np.abs(X.numpy() - ref).max() < 1e-8 and iters < 60


def test_gaussian_sketch_error_matches_inverse_wishart_mean():
    """E‖x' − x*‖² = ‖r*‖² tr((AᵀA)⁻¹) / (s − d − 1) for a Gaussian sketch (r* ⊥ range(A), so S r* is
    independent of S A); and the coordinates share the error evenly (the ℓ∞ bound's point)."""
    A, B = problem(m=400, d=6, k=1, seed=2)
    xs = np.linalg.lstsq(A.numpy(), B.numpy(), rcond=None)[0]
    r2 = float(((A.numpy() @ xs - B.numpy()) ** 2).sum())
    s, d = 30, 6
    expected = r2 * np.trace(np.linalg.inv(A.numpy().T @ A.numpy())) / (s - d - 1)
    errs, linf = [], []
    for seed in range(300):
        e = sketch_and_solve(A, B, s, "gaussian", seed=seed).numpy() - xs
        errs.append(float((e**2).sum()))
        linf.append(float(np.abs(e).max()))
    assert abs(np.mean(errs) / expected - 1) < 0.2
    # ℓ∞ form (Price, Song & Woodruff): √d ‖e‖∞ ≤ ε ‖r*‖ ‖A⁺‖ with ε the ℓ2 rate; check it holds on 95 %
    sigma_min = float(np.linalg.svd(A.numpy(), compute_uv=False).min())
    eps = np.sqrt(d / (s - d - 1)) * 3  # 3 standard ℓ2 radii
    bound = eps / np.sqrt(d) * np.sqrt(r2) / sigma_min
    assert np.mean(np.array(linf) <= bound) > 0.95


def test_pleas_least_squares_sketched_solvers():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(2000, 12, generator=g)
    T = H @ torch.randn(12, 5, generator=g) + 0.5 * torch.randn(2000, 5, generator=g)
    W0, b0 = least_squares(H, T, ridge=1e-3)
    W1, b1 = least_squares(H, T, ridge=1e-3, solver="sketch-lsqr")
    assert float((W1 - W0).abs().max()) < 1e-5 and float((b1 - b0).abs().max()) < 1e-5
    W3, b3 = least_squares(H, T, ridge=1e-3, solver="normal")
    assert float((W3 - W0).abs().max()) < 1e-5 and float((b3 - b0).abs().max()) < 1e-5
    W4, b4 = least_squares(
        torch.ones(30, 2), torch.ones(30, 1), solver="normal"
    )  # singular: gelsd's min norm
    assert torch.allclose(W4, torch.zeros(1, 2) + 1 / 3, atol=1e-5) and abs(float(b4) - 1 / 3) < 1e-5
    W2, _ = least_squares(H, T, ridge=1e-3, solver="sketch")
    res = [float((H @ W.T - T).pow(2).sum()) for W in (W0, W2)]
    assert res[0] <= res[1] <= 1.5 * res[0]  # (1 + ε) residual, ε ≈ d / s


def test_pleas_solver_option_is_checked():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(WeightsmithError, match="solver='qr'"):
        pleas_merge(net, net, torch.randn(20, 3), solver="qr")
    with pytest.raises(WeightsmithError, match="sketch_factor=1"):
        least_squares(torch.randn(20, 3), torch.randn(20, 2), solver="sketch", sketch_factor=1)
    with pytest.raises(WeightsmithError, match="sketch='fjlt'"):
        least_squares(torch.randn(20, 3), torch.randn(20, 2), solver="sketch", sketch="fjlt")


def test_pleas_merge_with_exact_solvers_agrees():
    """``normal`` and ``sketch-lsqr`` give the same merged MLP as ``gelsd`` (width 1.5: masked solves too)."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 3))  # fmt: skip
    b = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 3))  # fmt: skip
    x = torch.randn(300, 6)
    ref = pleas_merge(a, b, x, 1.5)(x)
    for solver, sketch in (("normal", "srht"), ("sketch-lsqr", "countsketch")):
        got = pleas_merge(a, b, x, 1.5, solver=solver, sketch=sketch)(x)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
