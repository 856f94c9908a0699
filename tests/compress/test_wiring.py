"""Pruners and low-rank compressors inside ``compress()`` and the writers: routing, up-front checks,
the weightsmith format's sparse and low-rank layouts, and refusals of compressed-tensors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import RTN, compress, load_compressed, save_compressed
from weightsmith.compress._core import Compressed
from weightsmith.compress._grid import QuantizedWeight
from weightsmith.compress._lowrank import LowRankLinear, LowRankWeight, compress_lowrank
from weightsmith.compress._sparse import SparseWeight
from weightsmith.compress.magnitude import Magnitude
from weightsmith.compress.svd import SVD
from weightsmith.compress.wanda import Wanda
from weightsmith.config import registered
from weightsmith.errors import WeightsmithError

ALL = [
    "armor", "asvd", "awq", "bcq", "bitstack", "cur", "dpruner", "dsnot", "fwsvd", "gptq", "hqq", "magnitude",
    "masa", "monarch", "pst", "rtn", "sparsegpt", "svd", "udfc", "wanda", "welore",
]  # fmt: skip


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_method_is_registered_under_compress():
    assert sorted(registered("compress")) == ALL


def test_compress_routes_lowrank_through_plan_with_global_ranks():
    m = tiny_llama()
    a, ra = compress(copy.deepcopy(m), SVD(keep=0.4))
    b, rb = compress_lowrank(copy.deepcopy(m), SVD(keep=0.4))
    assert all(isinstance(w, LowRankWeight) for w in ra.weights.values())
    assert {n: w.rank for n, w in ra.weights.items()} == {n: w.rank for n, w in rb.weights.items()}
    assert len({w.rank for w in ra.weights.values()}) > 1  # global allocation, not one rank for all
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert ra.bits_per_weight is None and not ra.quantized


def test_compress_prunes_layer_by_layer_and_every_result_is_compressed():
    m = tiny_llama()
    _, rep = compress(m, Magnitude(n=2, m=4))
    assert len(rep.weights) == 14
    for name, w in rep.weights.items():
        assert isinstance(w, SparseWeight) and isinstance(w, Compressed)
        assert w.sparsity == 0.5
        assert torch.equal(m.get_parameter(name).detach(), w.dequantize())
    assert rep.bits_per_weight is None
    _, q = compress(tiny_llama(), RTN(group_size=32))
    assert q.quantized and isinstance(next(iter(q.weights.values())), QuantizedWeight)
    assert isinstance(next(iter(q.weights.values())), Compressed) and q.bits_per_weight is not None


@pytest.mark.parametrize(
    "config,message",
    [
        (Magnitude(n=1, m=3), "M=3 does not divide the input size 64 of 'model.layers.0.self_attn.q_proj"),
        (SVD(rank=40), "rank=40 is larger than the matrix 'model.layers.0.self_attn.k_proj.weight'"),
        (RTN(group_size=48), "group sizes that divide every layer: 32, 64, 0"),
    ],
)
def test_options_that_do_not_fit_a_layer_are_refused_before_any_change(config, message):
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(WeightsmithError) as err:
        compress(m, config)
    assert message in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_weightsmith_lowrank_reloads_as_thin_linears_with_same_logits(tmp_path):
    m = tiny_llama(bias=True)
    dense_params = _params(m)
    q, rep = compress(m, SVD(keep=0.4, allocation="uniform"))
    save_compressed(q, rep, tmp_path / "lr", format="weightsmith")
    info = json.loads((tmp_path / "lr" / "compression.json").read_text())
    assert info["ranks"] == {n: w.rank for n, w in rep.weights.items()} and info["bits_per_weight"] is None
    back = load_compressed(tmp_path / "lr")
    thin = [mod for mod in back.modules() if isinstance(mod, LowRankLinear)]
    assert len(thin) == 14 and all(t.up.bias is not None for t in thin)
    saved = sum(
        ly[0] * ly[1] - w.params
        for ly, w in zip((r.shape for r in rep.layers), rep.weights.values(), strict=True)
    )
    assert _params(back) == dense_params - saved < dense_params
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(back, ids), _logits(q, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["weightsmith", "dense"])
def test_pruned_model_round_trips(tmp_path, fmt):
    q, rep = compress(tiny_llama(), Wanda(n=2, m=4), calib=calib())
    save_compressed(q, rep, tmp_path / fmt, format=fmt)
    back = load_compressed(tmp_path / fmt)
    for name in rep.weights:
        assert torch.equal(back.get_parameter(name).detach(), q.get_parameter(name).detach()), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(back, ids), _logits(q, ids))


@pytest.mark.parametrize(
    "config,message",
    [
        (Magnitude(sparsity=0.5), "compressed-tensors 0.20 no longer decompresses"),
        (SVD(keep=0.5), "no layout for low-rank factors"),
    ],
)
def test_compressed_tensors_refuses_pruned_and_lowrank(tmp_path, config, message):
    q, rep = compress(tiny_llama(), config)
    with pytest.raises(WeightsmithError) as err:
        save_compressed(q, rep, tmp_path / "out", format="compressed-tensors")
    assert message in str(err.value) and "--format dense" in str(err.value)
    assert list(tmp_path.iterdir()) == []
