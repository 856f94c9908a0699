"""Writers: compressed-tensors pack-quantized (checked against the compressed-tensors package and a
transformers load), dense and weightsmith formats, and load_compressed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import GPTQ, HQQ, RTN, compress, load_compressed, save_compressed
from weightsmith.compress._format import pack_codes, unpack_codes
from weightsmith.errors import WeightsmithError


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip_and_matches_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (5, 77), generator=g)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-77 * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, 77), q)
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    offset = 1 << (bits - 1)
    theirs = ct.pack_to_int32((q - offset).to(torch.int8), bits)
    assert torch.equal(packed, theirs)
    zp = q[:, :3]
    assert torch.equal(
        pack_codes(zp.T, bits).T, ct.pack_to_int32((zp - offset).to(torch.int8), bits, packed_dim=0)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_on_gpu_equals_pack_on_cpu(bits):
    """The writer packs the codes where they live: the GPU's words must be the CPU's."""
    q = torch.randint(0, 1 << bits, (64, 1000), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    assert torch.equal(pack_codes(q.cuda(), bits).cpu(), pack_codes(q, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_of_a_transposed_view_without_padding(bits):
    """Zero points are packed transposed ([groups, rows] views): a width needing no padding packs too."""
    per_word = 32 // bits
    zp = torch.randint(0, 1 << bits, (per_word, 64), generator=torch.Generator().manual_seed(bits)).T
    assert not zp.is_contiguous()
    assert torch.equal(pack_codes(zp, bits), pack_codes(zp.contiguous(), bits))
    assert torch.equal(unpack_codes(pack_codes(zp, bits), bits, per_word), zp)
    q = torch.randint(0, 1 << bits, (3, 64), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    packed.zero_()
    assert q.any()  # the words are new memory, never a view of the codes


def _compressed(cfg):
    m = tiny_llama()
    q, report = compress(copy.deepcopy(m), cfg, calib=calib())
    return q, report


@pytest.mark.parametrize("group_size", [16, 0])
def test_transformers_loads_compressed_tensors_with_our_logits(tmp_path, group_size):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    q, report = _compressed(GPTQ(bits=4, group_size=group_size))
    out = save_compressed(q, report, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    ids = calib()[0]["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = q(ids).logits
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_compressed(out)(ids).logits, ours, rtol=1e-5, atol=1e-5)
    assert {"config.json", "generation_config.json", "model.safetensors", "compression.json"} <= {
        p.name for p in out.iterdir()}  # fmt: skip


@pytest.mark.parametrize("fmt,cfg", [
    ("compressed-tensors", RTN(bits=3, group_size=16, symmetric=False)),
    ("weightsmith", HQQ(bits=3, group_size=16, integer_zero=False)),
    ("dense", HQQ(bits=2, group_size=16, integer_zero=False)),
])  # fmt: skip
def test_every_format_loads_back_with_load_compressed(tmp_path, fmt, cfg):
    q, report = _compressed(cfg)
    out = save_compressed(q, report, tmp_path / fmt, format=fmt)
    ids = calib()[1]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(out)(ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)


def test_fractional_zero_needs_another_format_and_nothing_is_written(tmp_path):
    q, report = _compressed(HQQ(bits=3, group_size=16, integer_zero=False))
    with pytest.raises(WeightsmithError, match="integer zero points"):
        save_compressed(q, report, tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_packed_size_is_bits_per_weight(tmp_path):
    q, report = _compressed(RTN(bits=2, group_size=0))
    out = save_compressed(q, report, tmp_path / "ct")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert packed.shape == (64, 128 * 2 // 32)
    # per-channel symmetric: 2 bits per weight plus one 16-bit scale per output row
    rows = sum(r.shape[0] for r in report.layers)
    weights = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert report.bits_per_weight == pytest.approx(2 + 16 * rows / weights)


def test_gpt2_conv1d_quantises_and_writes_dense_only(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 16))
    q, report = compress(copy.deepcopy(m), GPTQ(bits=8, group_size=16), calib=[{"input_ids": ids}])
    assert len(report.layers) == 8 and all(r.rel_error < 0.02 for r in report.layers)
    with pytest.raises(WeightsmithError, match="Conv1D; use --format dense"):
        save_compressed(q, report, tmp_path / "ct")
    out = save_compressed(q, report, tmp_path / "dense", format="dense")
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(out)(ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)
