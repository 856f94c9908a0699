"""FARMS windows decomposed in float32 (the default for non-float64 weights) give the float64 alpha to
round-off."""

from __future__ import annotations

import pytest
import torch

from weightsmith.analyze.farms import FarmsConfig, farms_alpha
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_float32_windows_give_the_float64_alpha_to_round_off() -> None:
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 96, 200, generator=g, dtype=torch.float64)
    spike = (
        torch.randn(3, 96, 1, generator=g, dtype=torch.float64) @ torch.randn(3, 1, 200, generator=g).double()
    )
    W += 4 * spike
    a32 = farms_alpha(W.float(), FarmsConfig())  # the default: float32 weights, float32 windows
    a64 = farms_alpha(W, FarmsConfig(precision="float64"))
    auto = farms_alpha(W, FarmsConfig(precision="auto"), torch.float64)
    assert a32.dtype == a64.dtype == torch.float64  # the fit always runs in float64
    torch.testing.assert_close(a32, a64, rtol=1e-4, atol=0)
    torch.testing.assert_close(auto, a64, rtol=0, atol=0)
    torch.testing.assert_close(farms_alpha(W, FarmsConfig()), a64, rtol=0, atol=0)  # float64 weights: float64
    with pytest.raises(WeightsmithError, match="precision"):
        FarmsConfig(precision="half")
