"""``to_peft`` writes each method in its own PEFT form when it has one (LoRA, DoRA, HRA, MiSS/Bone),
else as exact LoRA factors; PEFT loads every folder with the same outputs as ours, and ``from_peft``
reads it back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from weightsmith import adapters
from weightsmith.adapters.bone import Bone
from weightsmith.adapters.dora import DoRA
from weightsmith.adapters.hra import HRA
from weightsmith.adapters.ia3 import IA3
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.vera import VeRA
from weightsmith.errors import WeightsmithError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def hidden(model):
    ids = torch.tensor([[1, 5, 7, 2, 9, 11, 3], [4, 4, 8, 1, 0, 6, 12]])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize(
    ("config", "targets", "peft_type"),
    [
        (LoRA(rank=4, alpha=6.0, rslora=True), r"re:.*(query|word_embeddings)\.weight", "LORA"),
        (DoRA(rank=2, alpha=4.0), r"re:.*(query|value)\.weight", "LORA"),
        (HRA(rank=4), r"re:.*(query|value|dense)\.weight", "HRA"),
        (Bone(rank=4), r"re:.*value\.weight", "MISS"),
        (Bone(rank=4, variant="bat"), r"re:.*value\.weight", "MISS"),
        (VeRA(rank=8), r"re:.*(query|value)\.weight", "LORA"),  # bases from our seed: exact LoRA factors
    ],
    ids=["lora-rslora-embedding", "dora", "hra", "miss", "bat", "vera"],
)
def test_peft_loads_what_we_write(tmp_path, config, targets, peft_type):
    model = tiny_bert()
    adapters.adapt(model, config, targets=targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours = hidden(model)
    assert float((ours - hidden(tiny_bert())).abs().max()) > 1e-3
    errors = adapters.to_peft(model, tmp_path / "p")
    assert max(errors.values()) == 0.0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == peft_type
    with warnings.catch_warnings():  # no unknown fields, peft_version present: PEFT says nothing
        warnings.filterwarnings("error", category=UserWarning, module=r"peft(\.|$)")
        theirs = hidden(peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "p").eval())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    back = tiny_bert()
    adapters.from_peft(back, tmp_path / "p")
    torch.testing.assert_close(hidden(back), ours, atol=1e-5, rtol=1e-5)


def test_imported_shared_bases_are_not_saved_natively(tmp_path):
    """VeRA imported from PEFT carries PEFT's random bases, which our seed cannot regenerate: the native
    format would reload different bases, so save_adapters refuses and points to to_peft."""
    pm = peft.get_peft_model(tiny_bert(), peft.VeraConfig(r=8, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "vera")
    model = tiny_bert()
    adapters.from_peft(model, tmp_path / "vera")
    with pytest.raises(WeightsmithError, match="to_peft"):
        adapters.save_adapters(model, tmp_path / "native")
    assert not (tmp_path / "native").exists()


def biased_bert():
    """``tiny_bert`` with random (non-zero) biases: BERT initialises them to 0."""
    model = tiny_bert()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_ia3_scales_the_bias_like_peft(tmp_path):
    """BERT's key / value have biases: PEFT computes l ⊙ (W0 x + b) there, and so do we, in forward,
    merge (the bias is scaled too), unmerge (the bias comes back) and in the folder we write."""
    cfg = peft.IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
    )
    pm = peft.get_peft_model(biased_bert(), cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    want = hidden(pm)
    model = biased_bert()
    adapters.from_peft(model, tmp_path / "peft")
    assert isinstance(model.encoder.layer[0].attention.self.key.configs["default"], IA3)
    assert float((want - hidden(biased_bert())).abs().max()) > 1e-3
    torch.testing.assert_close(hidden(model), want, atol=1e-5, rtol=1e-5)
    before = {k: v.clone() for k, v in adapters.base_state_dict(model).items()}
    merged_peft = pm.merge_and_unload().state_dict()
    adapters.merge_adapters(model)
    torch.testing.assert_close(hidden(model), want, atol=1e-5, rtol=1e-5)
    merged = adapters.base_state_dict(model)
    bias = "encoder.layer.0.attention.self.key.bias"
    assert not torch.allclose(merged[bias], before[bias])
    for k in merged:
        torch.testing.assert_close(merged[k], merged_peft[k], atol=1e-5, rtol=1e-5)
    adapters.unmerge_adapters(model)
    for k, v in adapters.base_state_dict(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    adapters.to_peft(model, tmp_path / "ours")
    assert "bias" not in json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module=r"peft(\.|$)")
        again = peft.PeftModel.from_pretrained(biased_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(hidden(again), want, atol=1e-5, rtol=1e-5)
