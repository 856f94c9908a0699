"""``weightsmith merge-moe`` against mergekit-moe 0.1.5 (``mergekit.scripts.moe.build``) on tiny Llamas
with a BPE tokenizer built here: the same Mixtral tensors (1e-5) and config for the ``hidden``,
``hidden_avg``, ``cheap_embed`` and (same seed) ``random`` gate modes, and an output transformers loads
and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_fixtures import cli_app
from safetensors.torch import load_file
from typer.testing import CliRunner

from weightsmith.errors import WeightsmithError
from weightsmith.merge import moe

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch.set_num_threads(1)


def _tokenizer() -> Any:
    chars = list("▁abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """A bf16 base and three experts (the base plus Gaussian noise) of a 2-layer Llama."""
    root = tmp_path_factory.mktemp("moe-llamas")
    tok = _tokenizer()
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    paths = {}
    g = torch.Generator().manual_seed(1)
    for k in ("base", "e0", "e1", "e2"):
        if k != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        paths[k] = root / k
        model.save_pretrained(paths[k])
        tok.save_pretrained(paths[k])
    return {k: str(v) for k, v in paths.items()}


def config(m: dict[str, str], mode: str, **extra: Any) -> dict:
    return {
        "base_model": m["base"],
        "gate_mode": mode,
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": m["e0"], "positive_prompts": ["def add a b", "code"], "residual_scale": 0.5},
            {"source_model": m["e1"], "positive_prompts": ["once upon a time"], "negative_prompts": ["code"]},
            {"source_model": m["e2"], "positive_prompts": ["the cat sat"]},
        ],
        **extra,
    }


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _mergekit(cfg: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)
    build(MoEMergeConfig.model_validate(cfg), str(out), MergeOptions(quiet=True), device="cpu")
    return _tensors(out)


def _ours(cfg: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    moe.run(path, out, seed=seed)
    return _tensors(out)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed", "random"])
def test_moe_matches_mergekit_moe(llamas, tmp_path, mode):
    cfg = config(llamas, mode)
    theirs = _mergekit(cfg, tmp_path / "mk", seed=3)
    ours = _ours(cfg, tmp_path / "ws", seed=3)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype == torch.bfloat16, k
        torch.testing.assert_close(ours[k].float(), v.float(), rtol=0, atol=1e-5, msg=k)
    c_ours = json.loads((tmp_path / "ws" / "config.json").read_text())
    c_mk = json.loads((tmp_path / "mk" / "config.json").read_text())
    for key in ("architectures", "model_type", "num_local_experts", "num_experts_per_tok", "sliding_window"):
        assert c_ours[key] == c_mk[key], key


def test_moe_output_loads_and_routes(llamas, tmp_path):
    out = tmp_path / "ws"
    res = CliRunner().invoke(_app(), ["merge-moe", str(_write(config(llamas, "hidden"), tmp_path)), str(out)])
    assert res.exit_code == 0, res.output
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    logits = model(**tok(["once upon a time"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    # expert e's MLP of layer l is the expert model's, residual_scale applied to its down_proj
    e0 = load_file(str(Path(llamas["e0"]) / "model.safetensors"))
    got = _tensors(out)
    gate_up = got["model.layers.1.mlp.experts.gate_up_proj"][0]
    assert torch.equal(gate_up[:24], e0["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[24:], e0["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(
        got["model.layers.1.mlp.experts.down_proj"][0], e0["model.layers.1.mlp.down_proj.weight"] * 0.5
    )


def _app() -> Any:
    import typer

    from weightsmith.cli.merge_moe import HELP, merge_moe_cmd

    app = cli_app()
    assert isinstance(app, typer.Typer)
    app.command("merge-moe", help=HELP)(merge_moe_cmd)
    return app


def _write(cfg: dict, tmp_path: Path) -> Path:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"gate_mode": "psychic"}, "gate_mode"),
        ({"experts_per_token": 4}, "experts_per_token"),
        ({"shared_experts": [{"source_model": "x"}]}, "shared_experts"),
        ({"architecture": "qwen"}, "architecture"),
        ({"experts": [{"source_model": "x"}, {"source_model": "y"}]}, r"experts\[0\].positive_prompts"),
        ({"experts": [{"source_model": "x", "positive_prompts": ["a"]}] * 2}, "same positive_prompts"),
        ({"experts": [{"model": "x"}]}, r"experts\[0\] needs 'source_model"),
    ],
)
def test_bad_moe_config_names_the_key(llamas, tmp_path, change, needle):
    cfg = {**config(llamas, "hidden"), **change}
    with pytest.raises(WeightsmithError, match=needle):
        moe.run(_write(cfg, tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_same_experts_need_the_flag(llamas, tmp_path):
    cfg = config(llamas, "random")
    cfg["experts"] = [{"source_model": llamas["e0"]}, {"source_model": llamas["e0"]}]
    res = CliRunner().invoke(_app(), ["merge-moe", str(_write(cfg, tmp_path)), str(tmp_path / "o1")])
    assert isinstance(res.exception, WeightsmithError) and "--allow-all-same" in str(res.exception)
    res = CliRunner().invoke(
        _app(), ["merge-moe", str(_write(cfg, tmp_path)), "--out", str(tmp_path / "o2"), "--allow-all-same"]
    )
    assert res.exit_code == 0, res.output
