"""Permutation specs keep the function; weight matching recovers known permutations (Git Re-Basin)."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightsmith import zoo
from weightsmith.errors import WeightsmithError
from weightsmith.merge.permute import (
    apply_permutation,
    bert_spec,
    chain_spec,
    invert,
    llama_spec,
    mlp_spec,
    objective,
    random_permutation,
    spec_from_config,
    weight_matching,
)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _cnn_spec(m: zoo.CNN):
    return chain_spec(
        m.state_dict(), ["conv1", "conv2", "fc1", "fc2"], {"conv1": "bn1", "conv2": "bn2"}, {"fc1": m.spatial}
    )


def test_mlp_permutation_keeps_function():
    torch.manual_seed(0)
    m = zoo.MLP(64, (32, 24, 16), 10)
    spec = mlp_spec(m.state_dict(), m.linear_names())
    assert len(spec.perms) == 3
    x = torch.randn(7, 64)
    ref = m(x)
    state = _state(m)
    perm = random_permutation(spec, state, seed=3)
    m.load_state_dict(apply_permutation(state, spec, perm))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m.net[0].weight, state["net.0.weight"])  # really permuted


@pytest.mark.parametrize("dim,side", [(2, 8), (1, 40)])
def test_cnn_batchnorm_permutation_keeps_function(dim, side):
    torch.manual_seed(0)
    m = zoo.CNN(side, dim, channels=(6, 5), hidden=12)
    m.train()
    m(torch.randn(32, side**dim))  # non-trivial running statistics
    m.eval()
    spec = _cnn_spec(m)
    assert any(a.tensor == "bn1.running_var" for a in spec.perms["P_conv1"])
    x = torch.randn(5, side**dim)
    ref = m(x)
    state = _state(m)
    m.load_state_dict(apply_permutation(state, spec, random_permutation(spec, state, 1)))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_weight_matching_recovers_known_permutation_exactly():
    torch.manual_seed(0)
    m = zoo.MLP(20, (16, 16), 5)
    spec = mlp_spec(m.state_dict(), m.linear_names())
    a = _state(m)
    true = random_permutation(spec, a, seed=7)
    b = apply_permutation(a, spec, true)  # B = A with its hidden units shuffled
    found = weight_matching(spec, a, b, seed=1)
    expect = invert(true)  # B's unit true^-1[i] sits where A's unit i was
    for p in spec.perms:
        assert torch.equal(found[p], expect[p])
    aligned = apply_permutation(b, spec, found)
    for k in a:
        assert torch.equal(aligned[k], a[k])


def test_weight_matching_lap_is_optimal_by_brute_force():
    # One permutation of 5 units: the LAP optimum must equal the best of all 120 permutations.
    g = torch.Generator().manual_seed(2)
    a = {"l0.weight": torch.randn(5, 3, generator=g), "l1.weight": torch.randn(2, 5, generator=g)}
    b = {"l0.weight": torch.randn(5, 3, generator=g), "l1.weight": torch.randn(2, 5, generator=g)}
    spec = mlp_spec(a, ["l0", "l1"])
    best = max(
        itertools.permutations(range(5)),
        key=lambda p: objective(spec, a, b, {"P_l0": torch.tensor(p)}),
    )
    found = weight_matching(spec, a, b)
    assert found["P_l0"].tolist() == list(best)


def test_weight_matching_improves_objective_and_terminates():
    t = zoo.load_task("digits")
    ma = zoo.train_model("mlp", t, seed=1, width=32, depth=2, epochs=3)
    mb = zoo.train_model("mlp", t, seed=2, width=32, depth=2, epochs=3)
    a, b = _state(ma), _state(mb)
    spec = mlp_spec(a, ma.linear_names())
    found = weight_matching(spec, a, b, seed=0)
    assert objective(spec, a, b, found) > objective(spec, a, b, {}) + 1e-3
    x = t.x_test[:50]
    mb2 = zoo.make_model("mlp", t, 32, 2)
    mb2.load_state_dict(apply_permutation(b, spec, found))
    torch.testing.assert_close(mb2(x), mb(x), rtol=1e-5, atol=1e-5)


def test_bert_heads_mlp_and_residual_keep_function():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    state = _state(model)
    for residual in (False, True):
        spec = bert_spec(state, num_heads=4, head_dim=8, residual=residual)
        assert len(spec.perms) == 4 + residual
        perm = random_permutation(spec, state, seed=5)
        model.load_state_dict(apply_permutation(state, spec, perm))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        expect = ref.last_hidden_state[..., perm["P_residual"]] if residual else ref.last_hidden_state
        torch.testing.assert_close(out.last_hidden_state, expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-5)


def test_llama_gqa_heads_mlp_and_residual_keep_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    state = _state(model)
    spec = spec_from_config(state, cfg.to_dict(), residual=True)
    assert spec == llama_spec(state, 6, 2, 8, residual=True)
    perm = random_permutation(spec, state, seed=9)
    model.load_state_dict(apply_permutation(state, spec, perm))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_minilm_weight_matching_undoes_a_shuffle(minilm):
    model, _ = minilm
    state = {k: v for k, v in model.state_dict().items() if ".layer.0." in k or ".layer.1." in k}
    spec = bert_spec(state, num_heads=12, head_dim=32)
    shuffle = random_permutation(spec, state, seed=4)
    shuffled = apply_permutation(state, spec, shuffle)
    found = weight_matching(spec, state, shuffled, seed=0)
    aligned = apply_permutation(shuffled, spec, found)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_spec_mismatch_raises_clear_error():
    spec = mlp_spec({"a.weight": 0, "b.weight": 0}, ["a", "b"])
    with pytest.raises(WeightsmithError, match="b.weight"):
        spec.sizes({"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 5)})


def test_infer_chain_spec_matches_hand_written_cnn_and_mlp_specs():
    from weightsmith.merge.permute import infer_chain_spec

    cnn = zoo.CNN(8, 2, channels=(3, 4), hidden=5)
    assert infer_chain_spec(cnn.state_dict()) == _cnn_spec(cnn)
    mlp = zoo.MLP(10, (6, 7), 3)
    assert infer_chain_spec(mlp.state_dict()) == mlp_spec(mlp.state_dict(), mlp.linear_names())
