"""MASA: shared matrix atoms, checked against Eckart-Young on the stacked weights and a hand-made case."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress._lowrank import Weighting, weighted_svd
from weightsmith.compress.masa import MASA, AtomLinear, atom_linears, learn_dictionary, masa_params
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)
CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def test_dictionary_by_hand_and_eckart_young():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(5, 7, generator=g)
    atoms, C = learn_dictionary([D, 2 * D, -D], 1)  # one atom spans all three layers exactly
    for i, c in enumerate((1.0, 2.0, -1.0)):
        torch.testing.assert_close(C[i, 0] * atoms[0], c * D, atol=1e-5, rtol=1e-5)
    Ws = [torch.randn(6, 4, generator=g) for _ in range(5)]
    atoms, C = learn_dictionary(Ws, 2)
    err = sum(float((W - torch.einsum("s,soi->oi", C[i], atoms)).norm() ** 2) for i, W in enumerate(Ws))
    X = torch.stack([W.reshape(-1) for W in Ws])
    assert err == pytest.approx(float(torch.linalg.svdvals(X)[2:].square().sum()), rel=1e-4)


def test_masa_on_attention_drops_parameters_and_reloads(tmp_path):
    m = _llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    m, report = compress(m, MASA(atoms=2))
    assert len(report.weights) == 24 and all("self_attn" in n for n in report.weights)  # attention only
    dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
    # q, o: 2 atoms of 64x64; k, v: 2 of 32x64; 6 layers x 4 projections x 2 coefficients
    assert masa_params(report.weights) == 2 * (2 * 4096 + 2 * 2048) + 48 < dense / 2
    with torch.no_grad():
        want = m(ids).logits
    n_dense = sum(p.numel() for p in m.parameters())
    atom_linears(m, report.weights)
    assert isinstance(m.model.layers[3].self_attn.k_proj, AtomLinear)
    assert m.model.layers[3].self_attn.k_proj.atoms is m.model.layers[0].self_attn.k_proj.atoms
    assert n_dense - sum(p.numel() for p in m.parameters()) == dense - masa_params(report.weights)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
    # --format weightsmith: each dictionary stored once, reloaded as shared AtomLinears (test_factored_format)
    dense_model, report = compress(_llama(), MASA(atoms=2))
    save_compressed(dense_model, report, tmp_path / "w", format="weightsmith")
    back = load_compressed(tmp_path / "w")
    assert back.model.layers[5].self_attn.q_proj.atoms is back.model.layers[0].self_attn.q_proj.atoms
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_shared_structure_beats_per_layer_svd_at_equal_parameters():
    # q_proj of every layer mixes the same two matrices (plus noise): 2 atoms capture it, while per-layer SVD
    # with the same parameters (rank 10: 6 x 10 x 128 = 7680 <= 2 x 4096 + 12) cannot
    m = _llama()
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.q_proj.weight.copy_(i * A - B + 0.05 * torch.randn(64, 64, generator=g))
    Ws = [layer.self_attn.q_proj.weight.detach().clone() for layer in m.model.layers]
    _, report = compress(m, MASA(atoms=2, targets="re:.*q_proj"))
    masa_err = max(r.rel_error for r in report.layers)
    svd_err = max(float((W - weighted_svd(W, Weighting(), 10).dequantize()).norm() / W.norm()) for W in Ws)
    assert masa_params(report.weights) >= 6 * 10 * 128 and masa_err < 0.1 < 0.5 < svd_err


def test_bad_masa_options():
    for bad in (dict(keep=0.0), dict(keep=1.5), dict(atoms=-1)):
        with pytest.raises(WeightsmithError):
            MASA(**bad)
    with pytest.raises(WeightsmithError, match="fewer atoms than layers"):
        compress(_llama(), MASA(atoms=6))
    with pytest.raises(WeightsmithError, match="no attention projections"):
        MASA().shared_layers([])
    MASA().check_format("weightsmith")  # the atoms and coefficients as such
    with pytest.raises(WeightsmithError, match="no layout for shared atoms; use --format weightsmith"):
        MASA().check_format("compressed-tensors")
