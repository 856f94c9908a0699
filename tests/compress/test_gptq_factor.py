"""GPTQ's inverse-Hessian factor: the reversed-order route (one Cholesky, one triangular solve; the CUDA
default) gives the reference route's ``U = chol((H + λI)⁻¹)ᵀ`` to float32 rounding, and GPTQ's codes."""

from __future__ import annotations

import pytest
import torch
from compress_fixtures import hessian_problem

from weightsmith.compress.gptq import gptq_quantize, inverse_hessian_factor

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [48, 200])
def test_reversed_factor_is_the_cholesky_factor_of_the_damped_inverse(n):
    _, H = hessian_problem(4, n)
    U = inverse_hessian_factor(H, 0.01, reversed_factor=True)
    ref = inverse_hessian_factor(H, 0.01, reversed_factor=False)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    Hd = H.double()
    Hd.diagonal().add_(0.01 * float(H.diagonal().mean()))
    exact = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)  # by definition, in float64
    err = float((U.double() - exact).norm() / exact.norm())
    err_ref = float((ref.double() - exact).norm() / exact.norm())
    assert err < 1e-4 and err < 10 * err_ref, (err, err_ref)
    assert torch.allclose((U.double().T @ U.double()) @ Hd, torch.eye(n, dtype=torch.float64), atol=1e-3)


def test_cpu_default_is_the_reference_route_bit_for_bit():
    _, H = hessian_problem(4, 64)
    assert torch.equal(
        inverse_hessian_factor(H, 0.01), inverse_hessian_factor(H, 0.01, reversed_factor=False)
    )


def test_gptq_codes_agree_across_the_two_routes(monkeypatch):
    from weightsmith.compress import gptq as gptq_module

    W, H = hessian_problem(64, 128, seed=3)
    ref = gptq_quantize(W, H, 4, 32, True, 0.01, 32, True, fused=False)
    real = gptq_module.inverse_hessian_factor
    monkeypatch.setattr(gptq_module, "inverse_hessian_factor", lambda H, d: real(H, d, reversed_factor=True))
    alt = gptq_quantize(W, H, 4, 32, True, 0.01, 32, True, fused=False)
    same = float((alt.q == ref.q).float().mean())
    assert same > 0.99, same  # a rounding tie may flip a code and be carried on; the job is the same
    loss = [float(((W - q.dequantize()) @ H @ (W - q.dequantize()).T).trace()) for q in (ref, alt)]
    assert abs(loss[1] - loss[0]) <= 0.01 * loss[0], loss
