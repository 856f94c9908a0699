"""UDFC (Bai et al. 2023): the closed-form combination worked by hand, exact recovery when the assumption
holds exactly, and lower output error than no compensation on Llama (grouped-query attention) and BERT."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import compress
from weightsmith.compress.udfc import UDFC, combination, compensate, self_combination
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_combination_by_hand():
    # two original rows e1, e2 stood for by the one kept row (1, 1): S = W Ŵᵀ (Ŵ Ŵᵀ)⁻¹ = [[1], [1]] / 2
    S = combination(torch.eye(2), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(S, torch.tensor([[0.5], [0.5]]), atol=1e-6, rtol=0)
    # one channel, quantised: the scalar <w, ŵ> / ‖ŵ‖² = (1·1 + 2·2 + 3·2) / (1 + 4 + 4) = 11 / 9
    S = combination(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 2.0]]))
    assert float(S) == pytest.approx(11 / 9, rel=1e-6)
    # combine="self": the kept channel by itself (11 / 9), the pruned one (0, 1, 0) from the kept one: 2 / 9
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    S = self_combination(W, torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([True, False]))
    torch.testing.assert_close(S, torch.tensor([[11 / 9], [2 / 9]]))


def test_pruned_channel_that_is_a_combination_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64).float()
    W[3] = 2 * W[0] - W[1]  # channel 3 lies in the span of the others (UDFC's assumption, exactly)
    b = torch.randn(4, generator=g)
    b[3] = 2 * b[0] - b[1]
    C, c = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    keep = torch.tensor([True, True, True, False])
    Wq = W * keep.unsqueeze(1)
    rows = torch.arange(4)
    C2, c2 = compensate(W, b, Wq, None, keep, [rows], C, c, [[rows]])
    assert torch.equal(C2[:, 3], torch.zeros(5))
    x = torch.randn(6, 7, generator=g)
    before = C @ (W @ x + b.unsqueeze(1)) + c.unsqueeze(1)
    after = C2 @ (Wq @ x + (b * keep).unsqueeze(1)) + c2.unsqueeze(1)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_data_free_error_never_exceeds_uncompensated():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g)
    Wq = (W * 2).round() / 2  # a coarse grid
    S = combination(W, Wq)
    assert float((W - S @ Wq).norm()) <= float((W - Wq).norm())


def _err(model, ref, run):
    with torch.no_grad():
        out = run(model)
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("opts", [
    {"bits": 2, "group_size": 16},
    {"prune_only": True, "sparsity": 0.25},
    {"bits": 3, "group_size": 16, "sparsity": 0.25},
])  # fmt: skip
def test_compensation_lowers_the_output_error_on_llama_with_gqa(opts):
    m = tiny_llama()  # 4 query heads share 2 key/value heads
    ids = calib()[0]["input_ids"]

    def run(model):
        return model(ids).logits

    with torch.no_grad():
        ref = run(m)
    off = _err(compress(copy.deepcopy(m), UDFC(compensate=False, **opts))[0], ref, run)
    on = _err(compress(copy.deepcopy(m), UDFC(**opts))[0], ref, run)
    assert on < 0.95 * off, (opts, on, off)


def test_compensation_lowers_the_output_error_on_bert_with_biases():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128)  # fmt: skip
    b = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    def run(model):
        return model(ids).last_hidden_state

    with torch.no_grad():
        ref = run(b)
    for opts in ({"bits": 2, "group_size": 16}, {"prune_only": True, "sparsity": 0.25}):
        off = _err(compress(copy.deepcopy(b), UDFC(compensate=False, **opts))[0], ref, run)
        on = _err(compress(copy.deepcopy(b), UDFC(**opts))[0], ref, run)
        assert on < 0.95 * off, (opts, on, off)


def test_bad_options_and_formats(tmp_path):
    with pytest.raises(WeightsmithError, match="sparsity=1.5"):
        UDFC(sparsity=1.5)
    with pytest.raises(WeightsmithError, match="nothing to compress"):
        UDFC(prune_only=True)
    with pytest.raises(WeightsmithError, match="prune_only=true"):
        UDFC(prune_only=True, sparsity=0.2).check_format("compressed-tensors")
    with pytest.raises(WeightsmithError, match="group sizes that divide"):
        compress(tiny_llama(), UDFC(group_size=48))
    q, rep = compress(tiny_llama(), UDFC(bits=4, group_size=16))
    assert rep.quantized and len(rep.layers) == 14
    assert rep.config.describe(rep) == f"{4 + 16 / 16:.2f} bits/weight"
    q, rep = compress(tiny_llama(), UDFC(prune_only=True, sparsity=0.25))
    assert rep.config.describe(rep) == "25 % of producer channels pruned"
    v = rep.weights["model.layers.0.self_attn.v_proj.weight"]
    assert float(v.mask.float().mean()) == 0.75  # whole output channels (rows) pruned
