"""Codes recovered from the written weight instead of kept (compress/_grid.py, "Codes recovered from the
written weight"; issue 9: peak memory).

The rule is checked against its own arithmetic worked out independently: for every width 2-8, symmetric and
asymmetric, and float32 / bfloat16 / float16, every code ``k`` of the grid times scales chosen so that
``s · k`` lands next to a rounding midpoint of the dtype (the worst case of the cast) must come back from
``fl_d(fl32(s · k))`` where the rule says it does, and a counterexample must exist where it says it does not.
Then RTN through every torch path (layer by layer, in batches) keeps no codes and saves the same bytes as
with the codes kept, in both formats; scales outside the exact range (float16 underflow and overflow, zero
scales) keep their codes; a weight changed after compression is refused by name. The fused kernel's flag is
tested in test_rtn_triton.py (under Triton's interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import tiny_llama
from safetensors.torch import load_file

from weightsmith.compress import RTN, compress, save_compressed
from weightsmith.compress import _datafree as df
from weightsmith.compress import _grid as grid
from weightsmith.compress._core import target_layers
from weightsmith.compress._format import WEIGHTS, unpack_codes
from weightsmith.compress._grid import (
    QuantizedWeight,
    WrittenAt,
    exact_dtype,
    exact_scales,
    qmax,
    quantize_rtn,
    reach,
)
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def not_exact(bits: int, sym: bool, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and bits == 8 and not sym


def test_the_rule_keeps_codes_only_for_bfloat16_at_8_bits_asymmetric():
    """K (u / (1 + u) + 2^-22) < 1/2: bfloat16 (u = 2^-8) fails at K = 255 (8 bits asymmetric) and holds
    at K = 128 (8 bits symmetric, 128 / 257 < 1/2) and K = 127 (7 bits asymmetric); float16 and float32
    hold everywhere; an integer dtype never."""
    for bits in range(2, 9):
        for sym in (True, False):
            for dtype in DTYPES:
                assert exact_dtype(bits, sym, dtype) == (not not_exact(bits, sym, dtype)), (bits, sym, dtype)
    assert not exact_dtype(4, True, torch.int8)


def adversarial_scales(k: torch.Tensor, dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Float32 scales [n · 5, len(k)] putting ``s · k`` at (and one or two float32 steps around) a rounding
    midpoint of ``dtype``: ``v + ulp(v) / 2`` for ``n`` random ``dtype`` values ``v`` of random magnitude."""
    g = torch.Generator().manual_seed(seed)
    span = 12 if dtype == torch.float16 else 40  # magnitudes 2^±span: inside float16's normal range
    v = (torch.rand(n, generator=g) + 1) * torch.exp2(torch.randint(-span, span, (n,), generator=g).float())
    v = v.to(dtype).double()
    ulp = torch.exp2(torch.floor(torch.log2(v))) * torch.finfo(dtype).eps
    mid = (v + ulp / 2)[:, None] / k.double()[None, :]  # s · k = the midpoint, exactly in float64
    s = mid.float().abs()
    inf, nil = torch.tensor(float("inf")), torch.tensor(0.0)
    up, down = torch.nextafter(s, inf), torch.nextafter(s, nil)
    return torch.cat([s, up, down, torch.nextafter(up, inf), torch.nextafter(down, nil)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_code_comes_back_where_the_rule_says_so(dtype):
    """For each width and grid, every ``k = q − z`` the grid has (asymmetric: −(2^b − 1) .. 2^b − 1;
    symmetric: −2^(b−1) .. 2^(b−1) − 1) times adversarial and random scales: ``round(fl32(fl_d(fl32(s k)) /
    s)) = k`` everywhere where the rule holds; where it does not, it fails somewhere. The adversarial scales
    reach the rule's bound ``K u / (1 + u)`` on ``|x − k|`` to 1 % in bfloat16 and float16 (0.49805 of
    128 / 257 at 8 bits symmetric in bfloat16), so the worst case is what is tested."""
    for bits in range(2, 9):
        for sym in (True, False):
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (-qmax(bits), qmax(bits))
            k = torch.arange(lo, hi + 1, dtype=torch.float32)
            k = k[k != 0]
            g = torch.Generator().manual_seed(bits)
            rand = torch.exp2(torch.empty(200, 1).uniform_(-20, 8, generator=g)).expand(-1, len(k))
            s = torch.cat([adversarial_scales(k, dtype, 200, bits), rand])
            W_hat = (k * s).to(dtype)  # the float32 product, then the cast: what every path writes
            x = W_hat.float() / s
            back = torch.round(x)
            exact = bool((back == k).all())
            if dtype != torch.float32:
                u = torch.finfo(dtype).eps / 2
                assert float((x - k).abs().max()) > 0.99 * reach(bits, sym) * u / (1 + u), (bits, sym)
            assert exact == (not not_exact(bits, sym, dtype)), (bits, sym, dtype, int((back != k).sum()))


def weights(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows with outliers, an all-zero row (scale 1) and a row of one sign (zero point at an end)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.05
    W[0, :3] = torch.tensor([0.9, -0.7, 0.31])
    W[1] = 0
    W[2] = W[2].abs()
    return W.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rtn_codes_come_back_from_the_written_weight(dtype, monkeypatch):
    """RTN on random float32 weights, ``Ŵ`` written in ``dtype`` (as a quantiser working in float32 writes
    into a model of that dtype): without codes where the rule holds, the codes read back equal the
    quantiser's; where it does not (bfloat16, 8 bits asymmetric) reading them back from ``Ŵ`` would give
    wrong ones, and they are kept. Read back 3 rows at a time (16 steps), from a transposed view (as a
    Conv1D layer's weight is read)."""
    monkeypatch.setattr(grid, "RECOVER_ELEMENTS", {"cpu": 1000})
    for bits in range(2, 9):
        for sym in (True, False):
            W = weights((48, 256), torch.float32, bits)
            qw = quantize_rtn(W.float(), bits, 64, sym)
            W_hat = qw.dequantize().to(dtype)
            if bits % 2:
                W_hat = W_hat.T.contiguous().T
            got = qw.written_to(W_hat, "w")
            assert got.holds_codes == not_exact(bits, sym, dtype), (bits, sym)
            assert torch.equal(got.q, qw.q) and got.shape == qw.shape
            assert torch.equal(got.dequantize(), qw.dequantize())
            if not_exact(bits, sym, dtype):
                naive = (W_hat.float().view(48, 4, 64) / qw.scale[..., None]).round() + qw.zero[..., None]
                assert (naive.view(48, 256) != qw.q).any()  # what recovering would have written


def test_scales_where_the_dtype_cannot_hold_every_code_keep_them():
    """float16 underflow (float32 weights of a few float16 subnormals: s < 2^-22, where ``s · k`` rounds to
    a neighbouring code) and overflow (s · 7 and s · 8 beyond 65504: both written as −inf), and a zero scale:
    the codes are kept; reading codes from such a weight when none were kept is refused by name."""
    tiny = torch.linspace(-3.1, 2.9, 64) * 2**-24  # float32, between float16's subnormals
    big = torch.linspace(-75000, 60000, 64)  # two codes beyond float16: both written as −inf
    for row, case in ((tiny, "underflow"), (big, "overflow")):
        W = torch.stack([row, torch.linspace(-1, 1, 64)])
        qw = quantize_rtn(W, 4, 64, True)
        W_hat = qw.dequantize().half()
        assert not bool(exact_scales(qw, torch.float16)) and bool(exact_scales(qw, torch.float32)), case
        got = qw.written_to(W_hat, "w")
        assert got.holds_codes and torch.equal(got.q, qw.q), case
        naive = (W_hat.float() / qw.scale).round() + qw.zero
        assert (naive.clamp(0, 15) != qw.q).any(), case  # recovering would be wrong here
        lost = QuantizedWeight(None, qw.scale, qw.zero, 4, 0, True, WrittenAt(W_hat, torch.float16, "m.w"))
        with pytest.raises(WeightsmithError, match="'m.w': cannot recover.*underflow or overflow"):
            lost.q  # noqa: B018 (the read is the test)
    assert torch.isinf(W_hat[0, 0])  # the overflow case's model weight itself
    q = torch.tensor([[1, 2], [3, 0]], dtype=torch.uint8)
    zero_scale = QuantizedWeight(q, torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [2.0]]), 2, 0, True)
    assert zero_scale.written_to(torch.zeros(2, 2), "w") is zero_scale  # kept as it is


def run(model, cfg: RTN, batched: bool, monkeypatch):
    """``compress`` on the CPU: layer by layer, or RTN's batches (as on CUDA without Triton)."""
    monkeypatch.setattr(df, "BATCH_DEVICES", ("cpu", "cuda") if batched else ("cuda",))
    monkeypatch.setattr(df, "FUSED_DEVICES", ())
    return compress(model, cfg)


def with_codes(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.q, qw.scale, qw.zero, qw.bits, qw.group_size, qw.symmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_checkpoints_are_the_same_bytes_as_with_codes_kept(tmp_path, monkeypatch, dtype):
    """A tiny Llama compressed layer by layer and in batches, saved in both formats: every tensor equal to
    the save of the same compress with every code kept (the rule forced off), and the packed codes equal to
    RTN's on the original weights; no result holds codes after compress."""
    base = tiny_llama().to(dtype)
    cfg = RTN(bits=4, group_size=16, symmetric=False)
    want = {ly.name: quantize_rtn(ly.weight().float(), 4, 16, False) for ly in target_layers(base, cfg)}
    for batched in (False, True):
        saved = []
        for keep in (True, False):
            with monkeypatch.context() as m:
                if keep:  # as before: every result keeps (or, from a float32 stack, makes) its codes
                    m.setattr(
                        df, "written", lambda results, places, check=True: [with_codes(r) for r in results]
                    )
                model, report = run(copy.deepcopy(base), cfg, batched, m)
            assert all(w.holds_codes == keep for w in report.weights.values())  # type: ignore[attr-defined]
            out = []
            for fmt in ("compressed-tensors", "weightsmith"):
                path = tmp_path / f"{batched}-{keep}-{fmt}"
                save_compressed(model, report, path, format=fmt)
                out.append(load_file(str(path / WEIGHTS)))
            saved.append(out)
        for a, b in zip(*saved, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (batched, key)
        state = saved[1][0]
        for name, qw in want.items():
            path = name[: -len(".weight")]
            assert torch.equal(unpack_codes(state[f"{path}.weight_packed"], 4, qw.q.shape[1]), qw.q.long())


def test_a_weight_changed_after_compression_is_refused_by_name(tmp_path):
    """Codes are recovered only from the ``Ŵ`` they were written as: a weight changed afterwards (or cast to
    a dtype that does not hold its values) is refused, naming it, and nothing is written; a lossless cast
    (bfloat16 to float32) still gives the codes back."""
    model, report = compress(tiny_llama().to(torch.bfloat16), RTN(bits=4, group_size=16))
    name = "model.layers.1.mlp.down_proj.weight"
    qw = report.weights[name]
    assert isinstance(qw, QuantizedWeight) and not qw.holds_codes
    codes = qw.q.clone()
    model.float()  # every parameter replaced: read through the layer, the new one is what is checked
    assert torch.equal(qw.q, codes)
    with torch.no_grad():
        model.get_parameter(name)[3, 5] += 2**-6
    with pytest.raises(WeightsmithError, match=f"'{name}': the weight no longer holds the quantised values"):
        save_compressed(model, report, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model, report = compress(tiny_llama(), RTN(bits=4, group_size=16))
    model.bfloat16()
    with pytest.raises(
        WeightsmithError, match=r"is now torch.bfloat16 and no longer holds the torch.float32"
    ):
        report.weights[name].q  # type: ignore[attr-defined]  # noqa: B018
