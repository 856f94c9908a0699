"""Exact LoRA merging vs PEFT's add_weighted_adapter: PEFT's ``linear`` mode is not the weighted sum of
the updates (cross terms B_i A_j); rank concatenation (ours, and PEFT's ``cat``) is."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from weightsmith.merge.lora_merge import load_adapter, merge_loras
from weightsmith.store import open_store

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(12, 8)


def lora_pair(tmp_path):
    """Two saved PEFT LoRA adapters (different ranks/alphas, nonzero B) on one tiny base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i, (r, alpha) in enumerate([(2, 4), (3, 3)]):
        m = get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"]))
        m.base_model.model.load_state_dict(base_state, strict=False)
        g = torch.Generator().manual_seed(10 + i)
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        m.save_pretrained(tmp_path / f"ad{i}")
        paths.append(tmp_path / f"ad{i}")
    return base_state, paths


def exact_sum(paths, weights):
    ads = [load_adapter(p) for p in paths]
    return {
        n: sum(w * a.modules[n].delta() for a, w in zip(ads, weights, strict=True)) for n in ads[0].modules
    }


def peft_combined_delta(base_state, paths, weights, combination):
    from peft import PeftModel

    base = Tiny()
    base.load_state_dict(base_state)
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    model.load_adapter(str(paths[1]), adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination)
    out = {}
    for mod in ("q", "v"):
        layer = getattr(model.base_model.model, mod)
        out[f"{mod}.weight"] = layer.get_delta_weight("mix").detach()
    return out


def test_peft_linear_is_not_the_weighted_sum_but_concat_is(tmp_path):
    base_state, paths = lora_pair(tmp_path)
    w = [0.6, 0.4]
    exact = exact_sum(paths, w)
    # PEFT's "linear" needs equal ranks: make the second adapter rank 2 too, then compare
    _, same_rank = lora_pair_equal_rank(tmp_path)
    lin = peft_combined_delta(base_state, same_rank, w, "linear")
    exact_same = exact_sum(same_rank, w)
    gap = max(float((lin[k] - exact_same[k]).abs().max()) for k in lin)
    assert gap > 1e-2  # cross terms: not the weighted sum of the adapters' updates
    cat = peft_combined_delta(base_state, paths, w, "cat")
    out = merge_loras(paths, tmp_path / "merged", w, mode="concat")
    ours = load_adapter(out)
    for k in exact:
        torch.testing.assert_close(ours.modules[k].delta(), exact[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cat[k], exact[k], rtol=1e-5, atol=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5


def lora_pair_equal_rank(tmp_path):
    sub = tmp_path / "eq"
    sub.mkdir()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    paths = []
    for i in range(2):
        m = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
        g = torch.Generator().manual_seed(20 + i)
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        m.save_pretrained(sub / f"ad{i}")
        paths.append(sub / f"ad{i}")
    return base_state, paths


def test_our_concat_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    base_state, paths = lora_pair(tmp_path)
    out = merge_loras(paths, tmp_path / "merged", [1.0, -0.5])
    base = Tiny()
    base.load_state_dict(base_state)
    model = PeftModel.from_pretrained(base, str(out))
    exact = exact_sum(paths, [1.0, -0.5])
    for mod in ("q", "v"):
        got = getattr(model.base_model.model, mod).get_delta_weight("default")
        torch.testing.assert_close(got, exact[f"{mod}.weight"], rtol=1e-5, atol=1e-6)


def test_dense_mode_merges_into_the_base(tmp_path):
    from safetensors.torch import save_file

    base_state, paths = lora_pair(tmp_path)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base_state, str(base_dir / "model.safetensors"))
    out = merge_loras(paths, tmp_path / "dense", [0.5, 2.0], mode="dense", base=base_dir)
    got = open_store(out)
    exact = exact_sum(paths, [0.5, 2.0])
    for k in base_state:
        want = base_state[k] + exact[k] if k in exact else base_state[k]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- extras: heads, embeddings, biases


def _tiny_bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _outputs(model):
    ids = torch.tensor([[1, 5, 7, 2, 9, 11, 3], [4, 4, 8, 1, 0, 6, 12]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def _saved(tmp_path, name, seed, **kw):
    m = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(r=2, lora_alpha=4, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_dense_keeps_head_embedding_biases_and_lora_bias(tmp_path):
    """A SEQ_CLS adapter with embedding LoRA and bias="all" merged into the base equals PEFT's model."""
    torch.set_num_threads(1)
    import transformers

    _tiny_bert().save_pretrained(tmp_path / "base")
    targets = ["query", "value", "word_embeddings"]
    ad = _saved(tmp_path, "ad", 1, task_type="SEQ_CLS", target_modules=targets, bias="all")
    ref = _outputs(peft.PeftModel.from_pretrained(_tiny_bert(), ad).eval())
    merge_loras([ad], tmp_path / "out", mode="dense", base=tmp_path / "base")
    got = _outputs(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval())
    assert float((_outputs(_tiny_bert()) - ref).abs().max()) > 1e-3
    assert float((got - ref).abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("kw_a", "kw_b"),
    [
        ({"target_modules": ["query", "word_embeddings"]}, {"target_modules": ["value", "word_embeddings"]}),
        ({"target_modules": ["query"]}, {"target_modules": ["query", "value"], "lora_bias": True}),
    ],
    ids=["embedding", "lora_bias"],
)
def test_concat_keeps_embedding_and_lora_bias(tmp_path, kw_a, kw_b):
    """Concatenated adapters with embedding LoRA or lora_bias: PEFT loads the result and its update is the
    weighted sum (checked against the dense merge of the same two)."""
    torch.set_num_threads(1)
    import transformers

    _tiny_bert().save_pretrained(tmp_path / "base")
    ads = [_saved(tmp_path, "a", 1, **kw_a), _saved(tmp_path, "b", 2, **kw_b)]
    merge_loras(ads, tmp_path / "cat", weights=[0.7, 0.4], mode="concat")
    merge_loras(ads, tmp_path / "dense", weights=[0.7, 0.4], mode="dense", base=tmp_path / "base")
    cat = _outputs(peft.PeftModel.from_pretrained(_tiny_bert(), tmp_path / "cat").eval())
    dense = _outputs(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "dense").eval())
    assert float((cat - _outputs(_tiny_bert())).abs().max()) > 1e-3
    assert float((cat - dense).abs().max()) < 1e-5


def test_concat_refuses_lora_bias_beside_embedding_lora(tmp_path):
    from weightsmith.errors import WeightsmithError

    ads = [
        _saved(tmp_path, "a", 1, target_modules=["query", "word_embeddings"]),
        _saved(tmp_path, "b", 2, target_modules=["query"], lora_bias=True),
    ]
    with pytest.raises(WeightsmithError, match="lora_bias"):
        merge_loras(ads, tmp_path / "cat", mode="concat")


def test_concat_refuses_two_different_heads_and_dense_needs_the_head(tmp_path):
    from weightsmith.errors import WeightsmithError

    ads = [
        _saved(tmp_path, n, s, task_type="SEQ_CLS", target_modules=["query"]) for n, s in (("a", 1), ("b", 2))
    ]
    with pytest.raises(WeightsmithError, match="classifier"):
        merge_loras(ads, tmp_path / "cat", weights=[0.5, 0.5], mode="concat")
    assert not (tmp_path / "cat").exists()
    merge_loras(ads[:1], tmp_path / "one", mode="concat")  # one adapter of weight 1: its head is copied
    assert "base_model.model.classifier.weight" in open_store(tmp_path / "one" / "adapter_model.safetensors")
    _tiny_bert().bert.save_pretrained(tmp_path / "encoder")  # a checkpoint without the head
    with pytest.raises(WeightsmithError, match="has no tensor"):
        merge_loras(ads[:1], tmp_path / "d", mode="dense", base=tmp_path / "encoder")
    assert not (tmp_path / "d").exists()


def test_refuses_unknown_tensor_and_alora(tmp_path):
    from safetensors.torch import load_file, save_file

    from weightsmith.errors import WeightsmithError

    ad = _saved(tmp_path, "a", 1, target_modules=["query"])
    f = ad / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_X"] = torch.ones(2)
    save_file(tensors, str(f))
    with pytest.raises(WeightsmithError, match="lora_X"):
        merge_loras([ad], tmp_path / "out")
    ad2 = _saved(tmp_path, "b", 1, target_modules=["query"])
    cfg = json.loads((ad2 / "adapter_config.json").read_text())
    cfg["alora_invocation_tokens"] = [3]
    (ad2 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsmithError, match="aLoRA"):
        merge_loras([ad2], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_folder_with_a_peft_adapter_is_an_input(tmp_path):
    """``adapt --format peft`` writes RUN/adapter/; merge takes RUN itself as well as the adapter folder."""
    import shutil

    ad = _saved(tmp_path, "a", 1, target_modules=["query"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    shutil.copytree(ad, run / "adapter")
    direct, via_run = load_adapter(ad), load_adapter(run)
    assert set(direct.modules) == set(via_run.modules) and direct.modules
    for n, f in direct.modules.items():
        assert torch.equal(f.delta(), via_run.modules[n].delta())
