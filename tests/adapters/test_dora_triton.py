"""DoRA's fused row-scale backward (adapters/_dora_triton.py): ``g ⊙ c`` and ``Σ_t g_t ⊙ z_t`` in one pass.

With a GPU the kernel runs on CUDA against the torch ops and inside a DoRA step. Without one it runs under
Triton's interpreter on CPU tensors: Triton must be imported with ``TRITON_INTERPRET=1``, so
:func:`test_kernel_under_the_interpreter` runs this file again in a child process with it set. Skipped where
Triton is missing (CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters import _dora_triton as dt
from weightsmith.adapters import dora
from weightsmith.adapters.dora import DoRA

pytest.importorskip("triton")
torch.set_num_threads(1)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
runs_kernel = pytest.mark.skipif(
    DEV == "cpu" and not INTERPRETED, reason="runs in test_kernel_under_the_interpreter's child process"
)
KERNEL_TESTS = 7  # the tests marked runs_kernel (parameters counted) and the CPU-path test


@pytest.mark.skipif(DEV != "cpu" or INTERPRETED, reason="only a GPU-less parent process spawns the child")
def test_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(
        cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == KERNEL_TESTS, run.stdout[-2000:]


def inputs(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    return make(rows, cols), make(rows, cols), make(cols)


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(97, 300), (64, 256)], ids=["ragged", "whole-tiles"])
def test_fused_equals_the_torch_ops(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """dz is g * c (bit for bit on CUDA; the interpreter truncates its casts to 16 bits, so within one unit
    of the last place there); the column sums are the exact float32 products' sums (float64 reference)."""
    g, z, c = inputs(*shape, dtype)
    dz, gz = dt.row_scale_backward(g, z, c)
    assert dz.dtype == dtype and dz.shape == g.shape and gz.dtype == torch.float32 and gz.shape == c.shape
    want = g * c
    if DEV == "cuda" or dtype == torch.float32:
        assert torch.equal(dz, want)
    else:
        torch.testing.assert_close(dz, want, rtol=2**-7, atol=0)
    ref = (g.double() * z.double()).sum(0)
    torch.testing.assert_close(gz.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_dora_step_with_and_without_the_kernel(monkeypatch, dtype: torch.dtype) -> None:
    """A DoRA layer's input and adapter gradients equal the torch path's (∂m to the rounding of g * z in
    the torch path's dtype)."""
    torch.manual_seed(0)
    base = nn.Linear(256, 320, bias=False).to(DEV, dtype)
    x = torch.randn(4, 50, 256, device=DEV, dtype=dtype)

    def step(fused: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(dora, "FUSED", fused)
        layer = nn.Sequential(nn.Linear(256, 320, bias=False)).to(DEV, dtype)
        layer[0].load_state_dict(base.state_dict())
        adapters.adapt(layer, DoRA(rank=8, alpha=16), targets="0")
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if p.requires_grad and n.endswith(".B"):
                    p.normal_(0, 0.05, generator=torch.Generator(DEV).manual_seed(1))
        xi = x.clone().requires_grad_()
        (layer(xi).float() ** 2).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        return {"x": xi.grad, **grads}

    fused, plain = step(True), step(False)
    assert fused.keys() == plain.keys()
    for k in fused:
        if k.endswith("magnitude") or k.endswith(".m"):
            torch.testing.assert_close(
                fused[k], plain[k], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0
            )
        else:
            assert torch.equal(fused[k], plain[k]), k


def test_cpu_tensors_take_the_torch_path() -> None:
    g, z, c = (t.cpu() for t in inputs(8, 16, torch.float32))
    assert not dt.usable(g, z, c)
    assert not dt.usable(g.t(), z.t(), c)  # and never a non-contiguous gradient
