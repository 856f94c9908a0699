"""extract-lora: PEFT rebuilds TUNED from BASE + the adapter; mergekit agrees; bad input is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_fixtures import llama_shapes, write_checkpoint
from safetensors.torch import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge.extract_lora import extract_lora

torch.set_num_threads(1)


def _pair(root: Path, delta_rank: int | None, seed: int = 0) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama and a 'fine-tune': Linear updates of rank ``delta_rank`` (full when None), a changed
    norm and embedding, the other tensors unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.2 for k, s in llama_shapes().items()}
    tuned = dict(base)
    for k, v in base.items():
        if "proj" in k and "layers.2." not in k:  # layer 2 stays as it was
            o, i = v.shape
            r = delta_rank or min(o, i)
            tuned[k] = v + 0.1 * torch.randn(o, r, generator=g) @ torch.randn(r, i, generator=g) / r**0.5
    tuned["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] + 0.3
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.01
    return write_checkpoint(root / "base", base), write_checkpoint(root / "tuned", tuned), tuned


def _peft_merged(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_exact_when_update_rank_fits_and_peft_reproduces_tuned(tmp_path):
    base, tuned, want = _pair(tmp_path, delta_rank=3)
    done = extract_lora(base, tuned, 4, tmp_path / "lora")
    assert set(done.ranks) == {k for k in want if "proj" in k and "layers.2." not in k}
    assert max(done.errors.values()) < 1e-5
    assert sorted(done.saved) == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and set(cfg["modules_to_save"]) == {
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
    }
    got = _peft_merged(base, tmp_path / "lora")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5, msg=k)


def test_truncation_error_and_embedding_lora(tmp_path):
    base, tuned, want = _pair(tmp_path, delta_rank=None)
    done = extract_lora(base, tuned, 4, tmp_path / "lora", embed_lora=True)
    assert "model.embed_tokens.weight" in done.ranks  # as PEFT embedding LoRA
    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert state["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 40)
    assert state["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 4)
    got = _peft_merged(base, tmp_path / "lora")
    b = load_file(str(base / "model.safetensors"))
    for k, rel in done.errors.items():
        delta, approx = want[k] - b[k], got[k] - b[k]
        measured = float((delta - approx).norm() / delta.norm())
        assert abs(measured - rel) < 1e-4, k  # the reported error is the error PEFT's model has
        if k != "model.embed_tokens.weight":
            assert 0.05 < rel < 1.0, k  # a full-rank update truncated at rank 4 of 16


@pytest.mark.skipif(shutil.which("mergekit-extract-lora", path=str(Path(sys.executable).parent)) is None,
                    reason="mergekit-extract-lora not installed")  # fmt: skip
def test_same_products_as_mergekit_extract_lora(tmp_path):
    base, tuned, _ = _pair(tmp_path, delta_rank=None, seed=1)
    extract_lora(base, tuned, 5, tmp_path / "ours")
    exe = Path(sys.executable).parent / "mergekit-extract-lora"
    cmd = [str(exe), "--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "mk"),
           "--max-rank", "5", "--device", "cpu"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "mk" / "adapter_model.safetensors"))
    checked = 0
    for key, A in theirs.items():
        if key.endswith("lora_A.weight"):
            B = theirs[key.replace("lora_A", "lora_B")]
            if float((B @ A).abs().max()) == 0.0:
                assert key not in ours  # an unchanged weight is left out of ours
                continue
            ours_ba = ours[key.replace("lora_A", "lora_B")] @ ours[key]
            torch.testing.assert_close(ours_ba, B @ A, atol=1e-5, rtol=1e-4, msg=key)
            checked += 1
        elif key in ours:  # modules_to_save tensors saved whole: identical
            assert torch.equal(ours[key], A), key
    assert checked == 14


def test_bad_input_names_the_tensor_and_writes_nothing(tmp_path):
    base, tuned, want = _pair(tmp_path, delta_rank=2)
    with pytest.raises(WeightsmithError, match="positive"):
        extract_lora(base, tuned, 0, tmp_path / "out")
    with pytest.raises(
        WeightsmithError, match=r"--rank 17 .* tensor 'model\.layers\.\d\.\S+\.weight' \((16, \d+|\d+, 16)\)"
    ):
        extract_lora(base, tuned, 17, tmp_path / "out")
    other = dict(want)
    other["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 16)
    bad = write_checkpoint(tmp_path / "bad", other)
    with pytest.raises(WeightsmithError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        extract_lora(base, bad, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exit_2_on_rank_larger_than_matrix(tmp_path):
    base, tuned, _ = _pair(tmp_path, delta_rank=2)
    cli = "from weightsmith.cli import main; main()"
    cmd = [sys.executable, "-c", cli, "extract-lora", str(base), str(tuned),
           "--rank", "99", "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "--rank 99" in res.stderr and "_proj.weight" in res.stderr
    assert not (tmp_path / "out").exists()


def test_linear_bias_update_goes_to_lora_bias(tmp_path):
    from merge_fixtures import LLAMA_CONFIG

    cfg = {**LLAMA_CONFIG, "attention_bias": True}
    g = torch.Generator().manual_seed(3)
    shapes = llama_shapes(cfg)
    for layer in range(cfg["num_hidden_layers"]):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{layer}.self_attn.{n}.bias"] = (16,)
    base = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    tuned = dict(base)
    q, k = "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    tuned[f"{q}.weight"] = base[f"{q}.weight"] + torch.randn(16, 1, generator=g) @ torch.randn(
        1, 16, generator=g
    )
    tuned[f"{q}.bias"] = base[f"{q}.bias"] + 0.5
    tuned[f"{k}.bias"] = base[f"{k}.bias"] - 0.5  # its weight did not change: the module is saved whole
    b_dir, t_dir = write_checkpoint(tmp_path / "b", base, cfg), write_checkpoint(tmp_path / "t", tuned, cfg)
    done = extract_lora(b_dir, t_dir, 2, tmp_path / "lora")
    assert list(done.ranks) == [f"{q}.weight"] and sorted(done.saved) == [f"{k}.bias", f"{k}.weight"]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] == [k]
    got = _peft_merged(b_dir, tmp_path / "lora")
    for name, v in tuned.items():
        torch.testing.assert_close(got[name], v, atol=2e-6, rtol=1e-5, msg=name)
