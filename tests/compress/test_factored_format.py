"""``--format weightsmith`` for the structured factorisations: MASA's shared atoms and Monarch's factors are
stored compactly, reload into modules with fewer parameters and give the dense model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from compress_fixtures import tiny_llama

from weightsmith.adapters.monarch import monarch_dense
from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress.masa import MASA, AtomLinear
from weightsmith.compress.monarch_compress import MonarchCompress, MonarchLinear, monarch_params
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _n(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _round_trip(config, tmp_path, bias=False):
    m = tiny_llama(bias=bias)
    n_dense = _n(m)
    m, report = compress(m, config)
    with torch.no_grad():
        want = m(IDS).logits
    out = save_compressed(m, report, tmp_path / "out", format="weightsmith")
    back = load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, want, atol=2e-5, rtol=2e-5)
    return report, back, n_dense, json.loads((out / "compression.json").read_text())


def test_monarch_factors_reload_as_monarch_linears(tmp_path):
    cfg = MonarchCompress(nblocks=4, block_rank=1)
    report, back, n_dense, info = _round_trip(cfg, tmp_path, bias=True)
    layers = [m for m in back.modules() if isinstance(m, MonarchLinear)]
    assert len(layers) == len(report.weights) == 14 and info["monarch"][
        "model.layers.0.mlp.up_proj.weight"
    ] == [4, 1]
    # each [out, in] weight became b·nblocks·(out + in) numbers (the biases stay)
    saved = sum(o * i - monarch_params((o, i), 4, 1) for o, i in (r.shape for r in report.layers))
    assert n_dense - _n(back) == saved > 0
    q = back.model.layers[0].self_attn.q_proj
    assert q.R.shape == (4, 4, 16) and q.L.shape == (4, 16, 4) and q.bias is not None


def test_monarch_linear_is_x_times_m_transposed():
    # the module never forms M: check it against M built by the dense product, worked on one input
    g = torch.Generator().manual_seed(0)
    R, L, bias = (
        torch.randn(2, 6, 5, generator=g),
        torch.randn(2, 4, 6, generator=g),
        torch.randn(8, generator=g),
    )
    x = torch.randn(3, 10, generator=g)
    torch.testing.assert_close(MonarchLinear(R, L, bias)(x), x @ monarch_dense(R, L).T + bias)


def test_masa_atoms_stored_once_and_shared_after_loading(tmp_path):
    report, back, n_dense, info = _round_trip(MASA(atoms=1), tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        atoms = [k for k in fh.keys() if k.endswith(".atoms")]  # noqa: SIM118
    assert sorted(atoms) == sorted(f"model.layers.0.self_attn.{p}_proj.atoms" for p in "qkvo")
    assert info["masa"]["model.layers.1.self_attn.k_proj.weight"] == [
        "model.layers.0.self_attn.k_proj.weight",
        1,
    ]
    a0, a1 = back.model.layers[0].self_attn, back.model.layers[1].self_attn
    assert isinstance(a1.v_proj, AtomLinear) and a1.v_proj.atoms is a0.v_proj.atoms
    # 2 layers x 4 projections of 64x64 / 32x64 become one atom per projection plus 8 coefficients
    assert n_dense - _n(back) == (2 * 4096 + 2 * 2048) - 8


def test_what_cannot_be_stored_is_refused_and_nothing_written(tmp_path):
    for cfg, held in ((MASA(atoms=1), "shared atoms"), (MonarchCompress(), "Monarch factors")):
        with pytest.raises(WeightsmithError, match=f"no layout for {held}; use --format weightsmith"):
            cfg.check_format("compressed-tensors")
    # lm_head is tied to the embeddings in tiny_llama: its Monarch factors could not keep the tie
    m, report = compress(tiny_llama(), MonarchCompress(targets="lm_head"))
    with pytest.raises(WeightsmithError, match="'lm_head.weight'.*tied to 'model.embed_tokens.weight'"):
        save_compressed(m, report, tmp_path / "tied", format="weightsmith")
    assert not (tmp_path / "tied").exists()
