"""mergekit ``model: BASE+LORA`` references: the PEFT LoRA applied as tensors are read, as mergekit gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import LLAMA_CONFIG, make_family
from safetensors.torch import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge import inputs, recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama, a fine-tune of it, and a PEFT LoRA made with PEFT (random non-zero B, rsLoRA off,
    a per-module rank, a trained lm_head in modules_to_save); returns PEFT's own merged state too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mplus")
    base, fts = make_family(root, n=1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    peft_model.save_pretrained(root / "lora")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert LLAMA_CONFIG["tie_word_embeddings"] is False
    return base, fts[0], root / "lora", merged


def _run(cfg: dict, root: Path, name: str) -> dict[str, torch.Tensor]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_file(str(recipe.run(path, root / f"ws-{name}") / "model.safetensors"))


def test_store_applies_lora_as_peft_merges_it(lora_family):
    base, _, lora, merged = lora_family
    store = inputs.open_input(f"{base}+{lora}")
    assert set(store) == set(merged)
    for k, v in merged.items():
        torch.testing.assert_close(store[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(
        store["lm_head.weight"], load_file(str(base / "model.safetensors"))["lm_head.weight"]
    )


def test_linear_recipe_with_relative_model_plus_lora(lora_family, tmp_path):
    base, ft, lora, merged = lora_family
    (tmp_path / "b").symlink_to(base)
    (tmp_path / "l").symlink_to(lora)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": "b+l", "parameters": {"weight": 0.25}},
                      {"model": str(ft), "parameters": {"weight": 0.75}}]}  # fmt: skip
    ours = _run(cfg, tmp_path, "linear")
    f = load_file(str(ft / "model.safetensors"))
    for k, v in merged.items():
        torch.testing.assert_close(ours[k], 0.25 * v + 0.75 * f[k], rtol=1e-5, atol=1e-6, msg=k)


def test_slerp_with_lora_matches_mergekit(lora_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, ft, lora, _ = lora_family
    ref_model = f"{base}+{lora}"
    cfg = {"merge_method": "slerp", "base_model": ref_model, "dtype": "float32",
           "parameters": {"t": [0.2, 0.7]}, "models": [{"model": ref_model}, {"model": str(ft)}]}  # fmt: skip
    opts = MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False, write_model_card=False,
                        lora_merge_cache=str(tmp_path / "cache"))  # fmt: skip
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), opts)
    ref = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = _run(cfg, tmp_path, "slerp")
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_bad_references_are_refused(lora_family, tmp_path):
    base, ft, lora, _ = lora_family
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsmithError, match="not a PEFT adapter folder"):
        inputs.open_input(f"{base}+{tmp_path / 'empty'}")
    with pytest.raises(WeightsmithError, match="is not a folder"):
        inputs.open_input(f"{base}+{tmp_path / 'missing'}")
    with pytest.raises(WeightsmithError, match="exactly one"):
        inputs.open_input(f"{base}+{lora}+{lora}")
    with pytest.raises(WeightsmithError, match="does not have"):  # a LoRA for another model
        inputs.open_input(f"{_other_model(tmp_path)}+{lora}")


def _other_model(root: Path) -> Path:
    from merge_fixtures import write_checkpoint

    return write_checkpoint(root / "other", {"model.norm.weight": torch.ones(16)})


def test_cli_exit_2_and_nothing_written(lora_family, tmp_path):
    base, ft, _, _ = lora_family
    (tmp_path / "notlora").mkdir()
    r = tmp_path / "r.yaml"
    bad = f"{ft}+{tmp_path / 'notlora'}"
    cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "models": [{"model": str(base)}, {"model": bad}]}  # fmt: skip
    r.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-c",
        "from weightsmith.cli import main; main()",
        "merge",
        str(r),
        str(tmp_path / "o"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "not a PEFT adapter folder" in res.stderr
    assert not (tmp_path / "o").exists()


def test_extract_lora_from_a_model_plus_lora_gives_the_lora_back(lora_family, tmp_path):
    from weightsmith.merge.extract_lora import extract_lora

    base, _, lora, merged = lora_family
    done = extract_lora(base, f"{base}+{lora}", 4, tmp_path / "again")
    assert max(done.errors.values()) < 1e-5  # the updates have rank <= 4: exact
    assert sorted(done.ranks) == sorted(
        k for k in merged if any(p in k for p in ("q_proj", "v_proj", "down_proj"))
    )
    assert done.ranks["model.layers.0.mlp.down_proj.weight"] == 4  # rank 2 update, extracted at 4
    assert done.saved == ["lm_head.weight"]
