"""Every registered adapter trains under bf16 autocast (CPU here; the same code path runs on CUDA).

Hand-written autograd Functions (the LoRA-family fast path, DoRA, HRA, RandLoRA, SLTrain) used to
see bfloat16 gradients meet float32 parameters in backward ("expected mat1 and mat2 to have the
same dtype"). Each method's ``example()`` config is attached to the conformance suite's toy model.
"""

from __future__ import annotations

import pytest
import torch
from test_conformance import METHODS, attach, inputs, perturb, toy

from weightsmith import adapters


def _train_step_under_autocast(method: str, backward_inside: bool, device: str = "cpu") -> None:
    m = toy()
    x = inputs().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = toy().to(device)(x).dtype  # what autocast gives the plain (unadapted) model
    attach(m, method)
    perturb(m)  # non-zero B / Λ / ..., so every adapter parameter gets a gradient
    m.to(device)
    params = list(adapters.adapter_parameters(m))
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
        loss = y.float().square().mean() + adapters.adapter_regularization(m)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert expected == torch.bfloat16
    assert y.dtype == expected, f"{method}: output {y.dtype} under autocast, a plain Linear gives {expected}"
    assert torch.isfinite(y.float()).all()
    for p in params:
        assert p.grad is not None, f"{method}: a parameter {tuple(p.shape)} got no gradient"
        assert p.grad.dtype == p.dtype, f"{method}: gradient {p.grad.dtype} for a {p.dtype} parameter"
        assert torch.isfinite(p.grad).all(), f"{method}: non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in params), f"{method}: all gradients are zero"


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_under_cpu_bf16_autocast(method):
    _train_step_under_autocast(method, backward_inside=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_under_cuda_bf16_autocast(method):
    _train_step_under_autocast(method, backward_inside=False, device="cuda")


@pytest.mark.parametrize("method", ["lora", "dora", "hra", "randlora", "sltrain", "adalora"])
def test_backward_inside_the_autocast_region(method):
    _train_step_under_autocast(method, backward_inside=True)


@pytest.mark.parametrize("method", ["lora", "dora", "hra", "randlora", "sltrain"])
def test_autocast_gradients_match_float32(method):
    """The bf16 gradients are the float32 ones up to bf16 rounding (not merely finite)."""
    grads = []
    for enabled in (False, True):
        m = toy()
        attach(m, method)
        perturb(m)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y = m(inputs())
        y.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapters.adapter_parameters(m)]))
    ref, got = grads
    assert (got - ref).norm() <= 0.05 * ref.norm(), method
