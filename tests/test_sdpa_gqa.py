"""Grouped-query attention with its key/value heads repeated equals SDPA's own enable_gqa, and a calibration
forward on CUDA in float32 runs it on the memory-efficient kernel instead of the math one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightsmith import sdpa_gqa
from weightsmith.layers import calibration_forward

torch.set_num_threads(1)


def _qkv(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8)]
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)


def test_repeated_heads_are_the_grouping_enable_gqa_defines():
    q, k, v = _qkv(dtype=torch.float64)
    out = F.scaled_dot_product_attention(
        q, sdpa_gqa.repeat_heads(k, 8), sdpa_gqa.repeat_heads(v, 8), is_causal=True
    )
    # by hand: query head h attends with key/value head h // 4
    for h in range(8):
        ref = F.scaled_dot_product_attention(q[:, h], k[:, h // 4], v[:, h // 4], is_causal=True)
        torch.testing.assert_close(out[:, h], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rtol=1e-12, atol=1e-12
    )


def test_the_wrapper_repeats_only_grouped_full_precision_calls():
    seen: list[tuple[int, bool]] = []

    def sdpa(q, k, v, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append((k.shape[-3], bool(kw.get("enable_gqa"))))
        return F.scaled_dot_product_attention(q, k, v, *a, **kw)

    wrapped = sdpa_gqa._expanded(sdpa, devices=("cpu",))
    q, k, v = _qkv()
    a = wrapped(q, k, v, is_causal=True, enable_gqa=True)
    wrapped(*_qkv(dtype=torch.bfloat16), is_causal=True, enable_gqa=True)  # flash takes grouped heads
    wrapped(q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), is_causal=True)  # not grouped
    assert seen == [(8, False), (2, True), (8, False)]
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    original = F.scaled_dot_product_attention
    with calibration_forward():
        assert F.scaled_dot_product_attention is not original
    assert F.scaled_dot_product_attention is original  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_float32_grouped_call_on_cuda_runs_the_memory_efficient_kernel():
    q, k, v = _qkv("cuda")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        calibration_forward(),
    ):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    assert "fmha" in names or "efficient" in names.lower(), names
    assert "softmax" not in names.lower()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
