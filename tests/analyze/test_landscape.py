"""Hessian power iteration, Hutchinson trace and mode connectivity against explicit Hessians by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.analyze.landscape import (
    hessian_trace,
    hessian_vector_product,
    mode_connectivity,
    top_hessian_eigenvalue,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _quadratic(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return B @ B.T + torch.diag(torch.arange(n, dtype=torch.float64)), torch.zeros(n, dtype=torch.float64)


def test_hvp_of_a_quadratic_is_the_matrix_times_the_vector() -> None:
    A, x0 = _quadratic()
    x = x0.clone().requires_grad_(True)
    v = torch.randn(6, dtype=torch.float64)
    (hv,) = hessian_vector_product(lambda: 0.5 * x @ A @ x, [x], [v])
    torch.testing.assert_close(hv, A @ v)


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic() -> None:
    A, x0 = _quadratic()
    x = x0.clone().requires_grad_(True)
    top = top_hessian_eigenvalue(lambda: 0.5 * x @ A @ x, [x], iters=500, tol=1e-10)
    evals, evecs = torch.linalg.eigh(A)
    assert top.converged
    assert top.eigenvalue == pytest.approx(float(evals[-1]), rel=1e-6)
    assert abs(float(top.vector[0] @ evecs[:, -1])) == pytest.approx(1.0, abs=1e-4)


_DATA: dict[str, torch.Tensor] = {}


def _functional_loss(net: nn.Module, shapes: list[torch.Size], flat: torch.Tensor) -> torch.Tensor:
    chunks, i = {}, 0
    for (name, _), s in zip(net.named_parameters(), shapes, strict=True):
        n = int(torch.Size(s).numel())
        chunks[name] = flat[i : i + n].reshape(s)
        i += n
    out = torch.func.functional_call(net, chunks, (_DATA["x"],))
    return nn.functional.cross_entropy(out, _DATA["y"])


def test_power_iteration_and_hutchinson_match_the_explicit_hessian_of_a_small_mlp() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    _DATA["x"], _DATA["y"] = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])
    H = torch.autograd.functional.hessian(lambda f: _functional_loss(net, shapes, f), flat0)
    evals = torch.linalg.eigvalsh(H)
    top_abs = float(evals[evals.abs().argmax()])

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(_DATA["x"]), _DATA["y"])

    top = top_hessian_eigenvalue(loss, params, iters=1000, tol=1e-9)
    assert top.eigenvalue == pytest.approx(top_abs, rel=1e-4)
    exact = float(torch.trace(H))
    est = hessian_trace(loss, params, samples=400, seed=1)
    # Hutchinson's variance is 2 * (||H||_F^2 - sum H_ii^2); 4 standard errors of the mean
    var = 2 * (float((H**2).sum()) - float((torch.diagonal(H) ** 2).sum()))
    assert abs(est - exact) <= 4 * (var / 400) ** 0.5
    assert abs(est - exact) < 0.2 * abs(exact)


def test_mode_connectivity_sign_follows_the_paper() -> None:
    assert mode_connectivity([1.0, 1.5, 3.0, 1.5, 1.0]) == pytest.approx(-2.0)  # a barrier: mc < 0
    assert mode_connectivity([1.0, 0.4, 0.2, 0.5, 1.0]) == pytest.approx(0.8)  # path below its ends
    assert mode_connectivity([0.5, 0.5, 0.5]) == 0.0


def test_bad_options_raise_naming_them() -> None:
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(WeightsmithError, match="iters"):
        top_hessian_eigenvalue(lambda: (x**2).sum(), [x], iters=0)
    with pytest.raises(WeightsmithError, match="samples"):
        hessian_trace(lambda: (x**2).sum(), [x], samples=0)
    with pytest.raises(WeightsmithError, match="3 points"):
        mode_connectivity([1.0, 2.0])
