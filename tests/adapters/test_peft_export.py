"""``weightsmith export`` of PEFT folders made by PEFT itself (``--base``), and of classification runs
into a directory ``AutoModelForSequenceClassification`` loads with the trained head."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import weightsmith.cli.adapt  # noqa: F401  (registers adapt on the app)
import weightsmith.cli.export  # noqa: F401  (registers export on the app)
from weightsmith.cli._app import app
from weightsmith.errors import WeightsmithError
from weightsmith.train import load_finetuned

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
runner = CliRunner()
TINY = ["--task", "rotten_tomatoes", "--max-steps", "2", "--max-examples", "16", "--eval-examples", "16",
        "--max-len", "24", "--batch-size", "8", "--device", "cpu"]  # fmt: skip


def _inputs(tok):
    return tok(["a gripping, beautiful film", "dull and far too long"], padding=True, return_tensors="pt")


def _error(result) -> str:
    assert isinstance(result.exception, WeightsmithError), result.output
    return str(result.exception)


def _randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _seq_cls(minilm_dir):
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=3).eval()


def test_export_any_peft_folder_merged(tmp_path, minilm_dir):
    """A PEFT SEQ_CLS LoRA (embedding LoRA, bias="all", the head in modules_to_save) made by PEFT on MiniLM:
    ``export --base minilm --out OUT`` writes a model that transformers loads with PEFT's outputs."""
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "word_embeddings"],
        bias="all",
    )
    pm = peft.get_peft_model(_seq_cls(minilm_dir), cfg)
    _randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    r = runner.invoke(
        app, ["export", str(tmp_path / "peft"), "--base", str(minilm_dir), "--out", str(tmp_path / "m")]
    )
    assert r.exit_code == 0, r.output
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    x = _inputs(tok)
    merged, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = peft.PeftModel.from_pretrained(_seq_cls(minilm_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs, ours = ref(**x).logits, merged.eval()(**x).logits
        plain = _seq_cls(minilm_dir)(**x).logits
    assert float((theirs - plain).abs().max()) > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_export_peft_folder_as_peft_lora(tmp_path, minilm_dir):
    """VeRA made by PEFT, rewritten as an exact PEFT LoRA (``--format peft``)."""
    pm = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(minilm_dir),
        peft.VeraConfig(r=8, target_modules=["query", "value"]),
    )
    _randomize(pm)
    pm.save_pretrained(tmp_path / "vera")
    r = runner.invoke(
        app, ["export", str(tmp_path / "vera"), "--base", str(minilm_dir), "--out", str(tmp_path / "lora"),
              "--format", "peft"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    x = _inputs(tok)
    with torch.no_grad():
        vera = peft.PeftModel.from_pretrained(
            transformers.AutoModel.from_pretrained(minilm_dir), tmp_path / "vera"
        )
        lora = peft.PeftModel.from_pretrained(
            transformers.AutoModel.from_pretrained(minilm_dir), tmp_path / "lora"
        )
        a, b = vera.eval()(**x).last_hidden_state, lora.eval()(**x).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_export_refusals(tmp_path, minilm_dir):
    pm = peft.get_peft_model(
        _seq_cls(minilm_dir), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    pm.save_pretrained(tmp_path / "peft")
    no_base = runner.invoke(app, ["export", str(tmp_path / "peft"), "--out", str(tmp_path / "o")])
    assert "--base" in _error(no_base)
    head_as_peft = runner.invoke(
        app, ["export", str(tmp_path / "peft"), "--base", str(minilm_dir), "--peft", str(tmp_path / "o")]
    )
    assert "classifier" in _error(head_as_peft) and not (tmp_path / "o").exists()
    biased = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(minilm_dir),
        peft.LoraConfig(r=2, target_modules=["query"], bias="all"),
    )
    biased.save_pretrained(tmp_path / "biased")
    as_peft = runner.invoke(
        app, ["export", str(tmp_path / "biased"), "--base", str(minilm_dir), "--peft", str(tmp_path / "o")]
    )
    assert "bias" in _error(as_peft) and not (tmp_path / "o").exists()
    bad = runner.invoke(
        app, ["export", str(tmp_path / "peft"), "--base", "x", "--out", "o", "--format", "gguf"]
    )
    assert "--format" in _error(bad)
    two = runner.invoke(app, ["export", str(tmp_path / "peft"), "--merged", "a", "--peft", "b"])
    assert "exactly one" in _error(two)


def test_classification_run_exports_with_its_head(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["adapt", "minilm", "--method", "lora", "--rank", "4", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(out), "--merged", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert model.config.num_labels == 2 and model.config.id2label == {0: "rotten", 1: "fresh"}
    net, _, task = load_finetuned(out)
    torch.testing.assert_close(model.classifier.weight, task.head(net).weight)
    torch.testing.assert_close(model.classifier.bias, task.head(net).bias)
    encoder = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "e"), "--encoder-only"])
    assert encoder.exit_code == 0, encoder.output
    _, info = transformers.AutoModel.from_pretrained(tmp_path / "e", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (tmp_path / "e" / "head.safetensors").is_file() and not (tmp_path / "e" / "run.json").exists()
