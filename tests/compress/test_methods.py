"""Quantisers checked against their papers' formulas worked by hand, and against each other."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import AWQ, GPTQ, HQQ, RTN, compress
from weightsmith.compress._grid import QuantizedWeight, quantize_rtn
from weightsmith.compress.awq import search_scale
from weightsmith.compress.gptq import gptq_quantize
from weightsmith.compress.hqq import shrink_lp
from weightsmith.errors import WeightsmithError


def test_rtn_asymmetric_by_hand():
    # 2 bits, range [-1, 2]: s = 3/3 = 1, z = round(1/1) = 1; q = round(w) + 1 = [0, 1, 1, 3]
    qw = quantize_rtn(torch.tensor([[-1.0, 0.0, 0.4, 2.0]]), bits=2, group_size=0, symmetric=False)
    assert qw.q.tolist() == [[0, 1, 1, 3]]
    assert qw.scale.item() == 1.0 and qw.zero.item() == 1.0
    assert qw.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_rtn_symmetric_groups_by_hand():
    # 4 bits symmetric: s = max|w| / 7.5, z = 8, two groups of 2. 1.5 / 0.2 = 7.5 rounds (half to even) to
    # 8, code 16, clamped to 15 -> 1.4; -0.7 / 0.2 = -3.5 -> -4 -> -0.8; 0.75 / 0.1 -> 0.7; 0.1 -> code 9.
    W = torch.tensor([[1.5, -0.7, 0.75, 0.1]])
    qw = quantize_rtn(W, bits=4, group_size=2, symmetric=True)
    torch.testing.assert_close(qw.scale, torch.tensor([[0.2, 0.1]]))
    assert qw.zero.tolist() == [[8.0, 8.0]]
    assert qw.q.tolist() == [[15, 4, 15, 9]]
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[1.4, -0.8, 0.7, 0.1]]), atol=1e-6, rtol=0)


def test_gptq_obs_update_by_hand():
    # 2 bits, per-channel grid from the row [3.0, 1.4, 1.3]: s = 1, z = 0. H couples columns 1 and 2:
    # after rounding column 1 (error 0.4), OBS moves column 2 by -err * Hinv12 / Hinv11 = +0.9 * 0.4.
    W = torch.tensor([[3.0, 1.4, 1.3]])
    H = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]])
    qw = gptq_quantize(W, H, bits=2, group_size=0, symmetric=False, damp=1e-6)
    Hinv = torch.linalg.inv(H)
    w2 = 1.3 - (1.4 - 1.0) * Hinv[1, 2] / Hinv[1, 1]
    assert abs(float(w2) - 1.66) < 1e-4
    assert qw.q.tolist() == [[3, 1, 2]]  # RTN would give [3, 1, 1]
    assert quantize_rtn(W, 2, 0, False).q.tolist() == [[3, 1, 1]]


@pytest.mark.parametrize("group_size,act_order", [(0, False), (8, False), (8, True)])
def test_gptq_with_identity_hessian_is_rtn(group_size, act_order):
    W = torch.randn(16, 32)
    g = gptq_quantize(W, torch.eye(32), 3, group_size, symmetric=False, damp=1e-8, block_size=8,
                      act_order=act_order)  # fmt: skip
    r = quantize_rtn(W, 3, group_size, False)
    assert torch.equal(g.q, r.q) and torch.allclose(g.scale, r.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error_on_correlated_inputs(act_order):
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)
    H = 2 * X.T @ X / X.shape[0]
    g = gptq_quantize(W, H, 3, 16, symmetric=False, block_size=16, act_order=act_order)
    r = quantize_rtn(W, 3, 16, False)
    err = lambda qw: float(((W - qw.dequantize()) @ X.T).norm())  # noqa: E731
    assert err(g) < 0.7 * err(r)


def test_awq_grid_alpha_zero_is_identity_scale_and_salient_channel_wins():
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    X = torch.randn(256, 32)
    X[:, 3] *= 50  # one salient input channel
    s, alpha = search_scale([W], X, X.abs().mean(0), 3, 8, False, n_grid=1)
    assert alpha == 0.0 and torch.allclose(s, torch.ones(32))
    s, alpha = search_scale([W], X, X.abs().mean(0), 3, 8, False, n_grid=20)
    assert alpha > 0 and int(s.argmax()) == 3
    expect = X.abs().mean(0).pow(alpha)
    torch.testing.assert_close(s, expect / (expect.max() * expect.min()).sqrt())


def test_hqq_shrinkage_by_hand_and_beats_rtn_on_heavy_tails():
    # shrink_p(2, beta=1, p=0.5) = 2 - 2^(-0.5)
    assert abs(float(shrink_lp(torch.tensor(2.0), 1.0, 0.5)) - (2 - 2**-0.5)) < 1e-6
    torch.manual_seed(0)
    W = torch.distributions.StudentT(2.0).sample((64, 128))
    h = HQQ(bits=3, group_size=32, integer_zero=False).quantize(W, None)
    r = RTN(bits=3, group_size=32, symmetric=False).quantize(W, None)
    l1 = lambda qw: float((W - qw.dequantize()).abs().mean())  # noqa: E731
    assert l1(h) < l1(r)
    hi = HQQ(bits=3, group_size=32).quantize(W, None)
    assert hi.integer_zero and l1(hi) < l1(r)


def _logit_error(cfg) -> float:
    m = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in calib(n=8, length=32, seed=5)])
    with torch.no_grad():
        ref = m(ids).logits
        q, report = compress(copy.deepcopy(m), cfg, calib=calib(n=8, length=32))
        assert len(report.layers) == 14 and report.seconds > 0
        return float((q(ids).logits - ref).norm() / ref.norm())


def test_calibrated_methods_beat_rtn_on_a_tiny_llama():
    rtn = _logit_error(RTN(bits=3, group_size=16, symmetric=False))
    assert _logit_error(GPTQ(bits=3, group_size=16, symmetric=False)) < rtn
    assert _logit_error(AWQ(bits=3, group_size=16, symmetric=False)) < rtn


def test_awq_folding_keeps_the_function_before_rounding():
    # 8-bit AWQ without clipping: scales are folded exactly, only 8-bit rounding remains
    m = tiny_llama()
    ids = calib()[0]["input_ids"]
    with torch.no_grad():
        ref = m(ids).logits
        q, _ = compress(copy.deepcopy(m), AWQ(bits=8, group_size=16, clip=False), calib=calib())
        assert float((q(ids).logits - ref).norm() / ref.norm()) < 0.01
    norm = q.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, m.model.layers[0].input_layernorm.weight)  # the scales went into the norm


def test_quantized_weight_roundtrip_and_bad_options():
    W = torch.randn(4, 8)
    qw = RTN(bits=8, group_size=4).quantize(W, None)
    assert isinstance(qw, QuantizedWeight) and qw.q.dtype == torch.uint8
    assert float((qw.dequantize() - W).abs().max()) <= float(qw.scale.max()) / 2 + 1e-6
    for bad in (dict(bits=1), dict(bits=9), dict(group_size=-1)):
        with pytest.raises(WeightsmithError):
            RTN(**bad)
    with pytest.raises(WeightsmithError, match="damp"):
        GPTQ(damp=0)
    with pytest.raises(WeightsmithError, match="symmetric"):
        HQQ(symmetric=True)


def test_a_model_without_blocks_is_calibrated_in_one_pass():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = net(x)
    q, report = compress(copy.deepcopy(net), GPTQ(bits=4, group_size=8), calib=[x])
    assert [r.name for r in report.layers] == ["0.weight", "2.weight"]
    r, _ = compress(copy.deepcopy(net), RTN(bits=4, group_size=8))
    with torch.no_grad():
        assert float((q(x) - ref).norm()) < float((r(x) - ref).norm())
    with pytest.raises(WeightsmithError, match="matches no quantisable layer"):
        compress(torch.nn.Sequential(torch.nn.Embedding(4, 4)), RTN())
