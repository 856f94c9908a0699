"""Binary-coding quantisation (Xu et al. 2018; ShiftAddLLM, You et al. 2024) against its equations."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import RTN, compress, load_compressed, save_compressed
from weightsmith.compress._alloc import allocate_bits, mean_bits
from weightsmith.compress.bcq import (
    BCQ,
    BCQWeight,
    _codes,
    bcq_fit,
    greedy_bcq,
    nearest_codes,
    po2_refine,
    refit_alpha,
    sensitivity,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _rel(W: torch.Tensor, Wh: torch.Tensor) -> float:
    return float((W - Wh).norm() / W.norm())


def test_greedy_then_als_error_is_non_increasing_and_below_greedy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 4, 32, generator=g)
    B, alpha, history = bcq_fit(W, bits=3, iters=10)
    for before, after in zip(history, history[1:], strict=False):
        assert after <= before * (1 + 1e-6)
    assert history[-1] < 0.9 * history[0]  # alternating refinement clearly improves on the greedy codes
    assert (alpha >= 0).all()
    Wh = BCQWeight(_codes(B).reshape(16, 128).to(torch.uint8), alpha, 3, 32).dequantize()
    assert abs(float((W.reshape(16, 128) - Wh).square().sum()) - history[-1]) < 1e-3 * history[-1]


def test_one_bit_is_sign_times_mean_abs_per_row_by_hand():
    # row 0: mean|w| = (1 + 3 + 2 + 2) / 4 = 2, signs [+, -, +, -]; row 1: mean|w| = 0.5, w = 0 counts as +1
    W = torch.tensor([[1.0, -3.0, 2.0, -2.0], [0.0, 1.0, -0.5, 0.5]])
    B, alpha, _ = bcq_fit(W, bits=1, iters=3)
    torch.testing.assert_close(alpha, torch.tensor([[2.0], [0.5]]))
    codes = _codes(B)
    assert codes.tolist() == [[1, 0, 1, 0], [1, 1, 0, 1]]
    Wh = BCQWeight(codes.to(torch.uint8), alpha.unsqueeze(1), 1, 0).dequantize()
    assert Wh.tolist() == [[2.0, -2.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]]


def test_two_bit_greedy_and_least_squares_by_hand():
    # greedy on [4, 2, -1, -3]: b0 = [+,+,-,-], a0 = 2.5; r = [1.5, -0.5, 1.5, -0.5], b1 = [+,-,+,-], a1 = 1
    W = torch.tensor([[4.0, 2.0, -1.0, -3.0]])
    B, a = greedy_bcq(W, 2)
    torch.testing.assert_close(a, torch.tensor([[2.5, 1.0]]))
    # b0, b1 orthogonal: least squares is <b_i, w> / 4, the same scales
    torch.testing.assert_close(refit_alpha(W, B), torch.tensor([[2.5, 1.0]]))
    # levels ±2.5 ±1 = {-3.5, -1.5, 1.5, 3.5}: 4 -> 3.5 (code 3), 2 -> 1.5 (code 1: +a0 -a1), -1 -> -1.5
    # (code 2: -a0 +a1), -3 -> -3.5 (code 0)
    assert nearest_codes(W, a).tolist() == [[3, 1, 2, 0]]


def test_po2_refinement_is_non_increasing_from_the_rounded_scales():
    # Student-t rows: plain rounding of the ALS scales is far off; refinement only lowers the error
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=g) / torch.randn(32, 64, 2, generator=g).square().mean(-1).sqrt()
    B, alpha, _ = bcq_fit(W, bits=3, iters=5)
    _, a2, history = po2_refine(W, B, alpha, rounds=5)
    for before, after in zip(history, history[1:], strict=False):
        assert after <= before * (1 + 1e-6)
    assert history[-1] < float(W.square().sum())
    assert torch.equal(a2, torch.exp2(torch.log2(a2).round()))


def test_po2_scales_are_exact_powers_of_two():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 0.03
    qw = BCQ(bits=3, group_size=16, po2_scales=True).quantize(W, None)
    exps = torch.log2(qw.alpha)
    assert torch.equal(exps, exps.round())
    assert torch.equal(qw.alpha, torch.exp2(exps.round()))
    assert _rel(W, qw.dequantize()) < 1.0


@pytest.mark.parametrize("dist", ["gaussian", "student-t"])
def test_bcq_vs_rtn_at_equal_bits(dist: str, capsys):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 128, generator=g)
    if dist == "student-t":  # t with 2 degrees of freedom: z / sqrt(chi2_2 / 2)
        W = W / torch.randn(64, 128, 2, generator=g).square().mean(-1).sqrt()
    rows = []
    for bits in (2, 3, 4):
        b = _rel(W, BCQ(bits=bits, group_size=32).quantize(W, None).dequantize())
        r = _rel(W, RTN(bits=bits, group_size=32).quantize(W, None).dequantize())
        rows.append((bits, b, r))
        # guaranteed: the first greedy term alone removes g * mean|w|^2 > 0 and no later step adds error
        assert b < 1.0
    with capsys.disabled():
        print(
            f"\n[{dist}] bits: BCQ rel. error / RTN rel. error: "
            + "; ".join(f"{k}: {b:.4f} / {r:.4f}" for k, b, r in rows)
        )


def test_compress_tiny_llama_dense_and_weightsmith_roundtrip(tmp_path):
    m = tiny_llama()
    q, report = compress(copy.deepcopy(m), BCQ(bits=3, group_size=16, iters=5))
    assert len(report.layers) == 14 and all(0 < r.rel_error < 1 for r in report.layers)
    assert report.bits_per_weight is None
    assert (
        report.config.describe(report) == f"{3 + 3 * 16 / 16:.2f} bits/weight (binary codes, 3.00 code bits)"
    )
    layer = "model.layers.0.mlp.down_proj.weight"
    w = report.weights[layer]
    assert isinstance(w, BCQWeight)
    assert torch.equal(w.alpha, w.alpha.half().float())  # the scales are stored in float16, exactly
    assert torch.equal(q.get_parameter(layer), w.dequantize())
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(q(ids).logits).all()
    for fmt in ("dense", "weightsmith"):
        back = load_compressed(save_compressed(q, report, tmp_path / fmt, format=fmt))
        for name, wq in report.weights.items():
            assert torch.equal(back.get_parameter(name), wq.dequantize()), (fmt, name)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "weightsmith" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.bcq_codes")
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 * 3 // 32)  # 3 bits per weight
    with pytest.raises(WeightsmithError, match="binary codes"):
        save_compressed(q, report, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_sensitivity_by_hand_with_identity_hessian():
    # H = I: (H + λI)⁻¹ = I / (1 + λ), its Cholesky factor: diagonal 1 / sqrt(1 + λ), so W_H = W sqrt(1 + λ)
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    lam = 0.01  # damp · mean diag H
    WH = W * (1 + lam) ** 0.5
    assert sensitivity(W, torch.eye(2), 0.01) == pytest.approx(float(WH.norm() * WH.std() ** 2), rel=1e-5)


def test_allocate_bits_by_hand():
    # budget 2.5 bits over sizes 100/100/200: all at 2 (800 bits of 1000), then by sensitivity: c (+200)
    # fits, a (+100) does not (1100 > 1000) ... b is less sensitive than a, so nothing else
    sens = {"a": 3.0, "b": 1.0, "c": 5.0}
    sizes = {"a": 100, "b": 100, "c": 200}
    bits = allocate_bits(sens, sizes, 2.5, [2, 3])
    assert bits == {"a": 2, "b": 2, "c": 3}
    assert mean_bits(bits, sizes) == 2.5
    assert allocate_bits(sens, sizes, 2.75, [2, 3]) == {"a": 3, "b": 2, "c": 3}


def test_mixed_bits_meet_the_budget_and_reload_exactly(tmp_path):
    q, report = compress(tiny_llama(), BCQ(avg_bits=2.5, group_size=16, iters=3), calib=calib())
    sizes = {r.name: r.shape[0] * r.shape[1] for r in report.layers}
    bits = {n: w.bits for n, w in report.weights.items()}
    assert set(bits.values()) == {2, 3} and 2.3 < mean_bits(bits, sizes) <= 2.5
    assert f"{mean_bits(bits, sizes):.2f} code bits" in report.config.describe(report)
    back = load_compressed(save_compressed(q, report, tmp_path / "mixed", format="weightsmith"))
    for name, w in report.weights.items():
        assert torch.equal(back.get_parameter(name), w.dequantize()), name


def test_bad_options():
    with pytest.raises(WeightsmithError, match="--bits 1"):
        BCQ(bits=1)
    with pytest.raises(WeightsmithError, match="iters"):
        BCQ(iters=-1)
    with pytest.raises(WeightsmithError, match="asymmetric"):
        BCQ(symmetric=False)
    with pytest.raises(WeightsmithError, match="group size"):
        compress(tiny_llama(), BCQ(group_size=48))
    with pytest.raises(WeightsmithError, match="avg_bits 1"):
        BCQ(avg_bits=1.5)
    with pytest.raises(WeightsmithError, match="needs calibration data"):
        compress(tiny_llama(), BCQ(avg_bits=2.5, group_size=16))
