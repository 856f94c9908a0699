"""Import PEFT folders made by PEFT itself and compare the model outputs with PEFT's.

Each case builds a tiny random model, wraps it with PEFT, gives every trainable tensor random non-zero
values, saves it, imports the folder with :func:`weightsmith.adapters.from_peft` into a fresh copy of the
base model and compares outputs to PEFT's own reloaded model (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from weightsmith.adapters import adapted_layers, from_peft, remove_adapters  # noqa: E402
from weightsmith.adapters._peft import read_peft  # noqa: E402
from weightsmith.errors import WeightsmithError  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-5


def tiny_bert(num_labels: int = 3) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero random values in every trainable tensor (adapter, modules_to_save, trained biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 7, 2, 9, 11, 3], [4, 4, 8, 1, 0, 6, 12]])


def logits(model: nn.Module) -> torch.Tensor:
    """The logits and the last hidden states (tiny random heads hide small changes in the logits)."""
    with torch.no_grad():
        out = model(input_ids=ids(), output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def make_peft(tmp: Path, base: Callable[[], nn.Module], config: Any, seed: int = 1) -> Path:
    pm = peft.get_peft_model(base(), config)
    randomize(pm, seed)
    pm.save_pretrained(tmp / "peft")
    return tmp / "peft"


def peft_reference(base: Callable[[], nn.Module], folder: Path) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(base(), folder).eval())


def check_import(tmp: Path, base: Callable[[], nn.Module], config: Any, seed: int = 1) -> nn.Module:
    folder = make_peft(tmp, base, config, seed)
    ref = peft_reference(base, folder)
    ours = base()
    plain = logits(ours)
    from_peft(ours, folder)
    got = logits(ours)
    assert float((ref - plain).abs().max()) > 1e-3, "the PEFT adapter changes nothing"
    assert float((got - ref).abs().max()) < TOL * (1 + float(ref.abs().max()))
    return ours


def test_lora_seq_cls_head_embedding_bias_all_patterns(tmp_path):
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
        bias="all", rank_pattern={"value": 2}, alpha_pattern={"value": 3},
    )  # fmt: skip
    check_import(tmp_path, tiny_bert, cfg)


def test_lora_bias_only_and_rslora_layers_to_transform(tmp_path):
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=6, target_modules=["query", "dense"], bias="lora_only",
        use_rslora=True, layers_to_transform=[1], layers_pattern="layer",
    )  # fmt: skip
    model = check_import(tmp_path, tiny_bert, cfg)
    assert all(".layer.1." in p for p, _ in adapted_layers(model))


def test_lora_bias_true_on_llama_without_biases(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    check_import(tmp_path, tiny_llama, cfg)


def test_dora_gpt2_conv1d(tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True
    )
    check_import(tmp_path, tiny_gpt2, cfg)


def test_lora_gpt2_bin_file(tmp_path):
    pm = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    ref = peft_reference(tiny_gpt2, tmp_path / "peft")
    ours = tiny_gpt2()
    from_peft(ours, tmp_path / "peft")
    assert float((logits(ours) - ref).abs().max()) < TOL


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: peft.VeraConfig(r=8, target_modules=["query", "value", "dense"]), id="vera"),
        pytest.param(
            lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["query", "dense"]),
            id="randlora",
        ),
        pytest.param(lambda: peft.MissConfig(r=4, target_modules=["query", "value"]), id="miss"),
        pytest.param(
            lambda: peft.MissConfig(r=4, init_weights="bat", target_modules=["query", "value"]), id="bat"
        ),
        pytest.param(
            lambda: peft.MissConfig(r=4, init_weights="mini", mini_r=2, target_modules=["query", "dense"]),
            id="mini",
        ),
        pytest.param(lambda: peft.HRAConfig(r=4, target_modules=["query", "value"]), id="hra"),
        pytest.param(
            lambda: peft.AdaLoraConfig(
                init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["query", "value"]
            ),
            id="adalora",
        ),
    ],
)
def test_methods_match_peft(tmp_path, config):
    def base() -> nn.Module:
        return tiny_bert()

    check_import(tmp_path, base, config())


def test_adalora_with_allocated_rank_pattern(tmp_path):
    """After AdaLoRA's budget schedule the saved tensors keep only the surviving triplets and the config's
    rank_pattern holds one boolean mask per layer; PEFT reloads each layer at its own rank."""
    cfg = peft.AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=8, total_step=12, tinit=1, tfinal=2, deltaT=1,
        target_modules=["query", "value"],
    )  # fmt: skip
    pm = peft.get_peft_model(tiny_bert(), cfg)
    randomize(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for step in range(12):
        pm(input_ids=ids(), output_hidden_states=True).hidden_states[-1].square().mean().backward()
        pm.base_model.update_and_allocate(step)
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and len({sum(m) for m in pattern.values()}) > 1, "ranks should differ between layers"
    ref = peft_reference(tiny_bert, tmp_path / "peft")
    ours = tiny_bert()
    from_peft(ours, tmp_path / "peft")
    assert float((logits(ours) - ref).abs().max()) < TOL


def test_minilm_seq_cls_head_comes_in(tmp_path, minilm_dir):
    def base() -> nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_dir, num_labels=2
        ).eval()

    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    folder = make_peft(tmp_path, base, cfg)
    saved = read_peft(folder).tensors
    assert "base_model.model.classifier.weight" in saved
    ours = check_import(tmp_path / "again", base, cfg)
    assert torch.equal(ours.classifier.weight, saved["base_model.model.classifier.weight"])


def _saved_lora(tmp_path: Path, **kw: Any) -> Path:
    return make_peft(tmp_path, tiny_bert, peft.LoraConfig(r=2, target_modules=["query"], **kw))


def _edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
        ({"peft_type": "PROMPT_TUNING"}, "peft_type 'PROMPT_TUNING'"),
        ({"layer_replication": [[0, 1], [1, 2]]}, "layer_replication"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ],
)
def test_refuses_options_it_cannot_hold(tmp_path, change, message):
    folder = _saved_lora(tmp_path)
    _edit_config(folder, **change)
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(WeightsmithError, match=message):
        from_peft(model, folder)
    assert _unchanged(model, before)


def test_refuses_a_tensor_nothing_takes(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved_lora(tmp_path, bias="all")
    f = folder / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_C.weight"] = torch.ones(2, 2)
    save_file(tensors, str(f))
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(WeightsmithError, match=r"query\.lora_C\.weight"):
        from_peft(model, folder)
    assert _unchanged(model, before), "the biases must not be written when the import fails"
    assert not list(adapted_layers(model))


def test_refuses_a_head_the_model_lacks(tmp_path):
    folder = make_peft(
        tmp_path, tiny_bert, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    no_head = transformers.BertForMaskedLM(tiny_bert().config)  # the same encoder names, no classifier
    with pytest.raises(WeightsmithError, match="classifier"):
        from_peft(no_head, folder)
    assert not list(adapted_layers(no_head))


def test_refuses_a_wrong_shape(tmp_path):
    folder = _saved_lora(tmp_path)
    small = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=32, num_labels=3)
    )  # fmt: skip
    with pytest.raises(WeightsmithError, match="lora_A.weight"):
        from_peft(small, folder)
    assert not list(adapted_layers(small))


def test_native_roundtrip_after_import(tmp_path):
    """An imported LoRA is an ordinary weightsmith adapter: it can be removed again."""
    folder = _saved_lora(tmp_path)
    model = tiny_bert()
    plain = logits(model)
    from_peft(model, folder)
    remove_adapters(model)
    assert torch.equal(logits(model), plain)


def test_smollm2_lora_embedding_and_patterns(tmp_path, smollm2_dir):
    """SmolLM2-135M (tied embeddings): LoRA on two layers' q/v projections and the token embedding."""

    def base() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], layers_to_transform=[0, 1],
        layers_pattern="layers", alpha_pattern={"v_proj": 2}, use_rslora=True,
    )  # fmt: skip
    pm = peft.get_peft_model(base(), cfg)
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    del pm
    x = ids()[:, :5]
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(base(), tmp_path / "peft").eval()(input_ids=x).logits
        ours = base()
        plain = ours(input_ids=x).logits
        from_peft(ours, tmp_path / "peft")
        got = ours(input_ids=x).logits
    assert float((ref - plain).abs().max()) > 1e-2
    assert float((got - ref).abs().max()) < TOL * (1 + float(ref.abs().max()))


def test_bin_file_is_read_weights_only(tmp_path):
    """A pickle that references a function is refused by the weights-only unpickler, not called."""
    import os

    folder = _saved_lora(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save(
        {"base_model.model.x.lora_A.weight": torch.ones(1), "hook": os.getcwd}, folder / "adapter_model.bin"
    )
    with pytest.raises(WeightsmithError, match="weights-only"):
        from_peft(tiny_bert(), folder)
