"""``--exact-dtype``: mergekit YAMLs on bf16 / fp16 tiny Llamas give files bit-identical to mergekit 0.1.5's,
and ``dtype`` / ``out_dtype`` are honoured as mergekit does; without the option we compute in float32
(closer to a float64 reference than mergekit's bf16 arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge import mergekit_exact, recipe

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """A bf16 base and three bf16 'fine-tunes' of a 2-layer Llama."""
    root = tmp_path_factory.mktemp("bf16-llama")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    paths = {"base": root / "base"}
    model.to(torch.bfloat16).save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    for k in ("a", "b", "c"):
        ft = transformers.LlamaForCausalLM(cfg)
        ft.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[k] = root / k
        ft.to(torch.bfloat16).save_pretrained(paths[k])
    return {k: str(v) for k, v in paths.items()}


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    return _tensors(out)


def _ours(cfg: dict, out: Path, exact: bool = True) -> dict[str, torch.Tensor]:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    recipe.run(path, out, exact_dtype=exact)
    return _tensors(out)


def configs(m: dict[str, str]) -> dict[str, dict]:
    three: list[dict[str, Any]] = [
        {"model": m["a"], "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": m["b"], "parameters": {"weight": 0.3, "density": [0.9, 0.3]}},
        {"model": m["c"], "parameters": {"weight": 0.7, "density": 0.6}},
    ]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m["a"], "parameters": {"weight": 0.3}},
                {"model": m["b"], "parameters": {"weight": 0.3}},
                {"model": m["c"], "parameters": {"weight": [0.1, 0.9]}},
            ],
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": m["base"],
            "models": three,
            "parameters": {"lambda": 0.9},
            "dtype": "bfloat16",
        },
        "task_arithmetic-fp16": {
            "merge_method": "task_arithmetic",
            "base_model": m["base"],
            "models": [{"model": m[k], "parameters": {"weight": 0.4}} for k in "abc"],
            "dtype": "float16",
            "out_dtype": "bfloat16",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": m["base"],
            "models": [{**x, "parameters": {**x["parameters"], "gamma": 0.05}} for x in three],
            "parameters": {"rescale": True},
            "dtype": "bfloat16",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": m["a"],
            "slices": [
                {
                    "sources": [
                        {"model": m["a"], "layer_range": [0, 2]},
                        {"model": m["b"], "layer_range": [0, 2]},
                    ]
                }
            ],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.8]}, {"value": 0.35}]},
            "dtype": "bfloat16",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": m["a"], "layer_range": [0, 2]}]},
                {"sources": [{"model": m["b"], "layer_range": [1, 2], "parameters": {"scale": 0.7}}]},
            ],
            "dtype": "bfloat16",
        },
    }


@pytest.mark.parametrize("name", list(configs({k: k for k in ("a", "b", "c", "base")})))
def test_exact_dtype_is_bit_identical_to_mergekit(llamas, tmp_path, name):
    cfg = configs(llamas)[name]
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours = _ours(cfg, tmp_path / "ws")
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype, k
        assert torch.equal(ours[k], v), f"{name}: {k} differs by {(ours[k].float() - v.float()).abs().max()}"
    want = cfg.get("out_dtype") or cfg["dtype"]
    assert json.loads((tmp_path / "ws" / "config.json").read_text()).get("dtype") == want


def test_float32_default_is_closer_to_float64_than_bf16_arithmetic(llamas, tmp_path):
    """TIES in bf16 (mergekit, --exact-dtype) rounds every step; our default rounds once. Against the same
    merge computed in float64, the default's error is smaller."""
    cfg = configs(llamas)["ties"]
    exact = _ours(cfg, tmp_path / "exact")
    default = _ours(cfg, tmp_path / "default", exact=False)
    ref = _ours({**cfg, "dtype": "float64"}, tmp_path / "f64", exact=False)
    err = {
        k: sum(float((o[n].double() - ref[n]).abs().sum()) for n in ref)
        for k, o in (("exact", exact), ("f32", default))
    }
    assert err["f32"] < err["exact"], err
    assert any(not torch.equal(exact[n], default[n]) for n in exact)


def test_exact_dtype_refuses_what_it_cannot_reproduce(llamas, tmp_path):
    della = {
        "merge_method": "della",
        "base_model": llamas["base"],
        "models": [{"model": llamas["a"], "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    with pytest.raises(WeightsmithError, match="--exact-dtype.*'della'"):
        _ours(della, tmp_path / "della")
    ours = tmp_path / "ours.yaml"
    ours.write_text(yaml.safe_dump({"method": "average", "models": [llamas["a"], llamas["b"]]}))
    with pytest.raises(WeightsmithError, match="--exact-dtype"):
        recipe.run(ours, tmp_path / "avg", exact_dtype=True)
    assert not (tmp_path / "della").exists() and not (tmp_path / "avg").exists()


def test_exact_kernels_cover_the_documented_methods():
    assert set(mergekit_exact.KERNELS) == {
        "linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "passthrough"
    }  # fmt: skip


def test_cli_exact_dtype_flag(llamas, tmp_path):
    from merge_fixtures import cli_app
    from typer.testing import CliRunner

    cfg = configs(llamas)["linear"]
    path = tmp_path / "lin.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli_app(), ["merge", str(path), str(tmp_path / "out"), "--exact-dtype"])
    assert res.exit_code == 0, res.output
    theirs = _mergekit(cfg, tmp_path / "mk")
    assert all(torch.equal(_tensors(tmp_path / "out")[k], v) for k, v in theirs.items())


def test_exact_slerp_kernel_matches_mergekit_over_chunks():
    """Above 2^20 entries mergekit sums norms and dot products chunk by chunk; so do we."""
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1100, 1000, generator=g).to(torch.bfloat16)
    b = (a.float() + 0.3 * torch.randn(1100, 1000, generator=g)).to(torch.bfloat16)
    ours = mergekit_exact.slerp(a, b, 0.3)
    theirs = mk_slerp(torch.tensor([0.3]), a.unsqueeze(0), b.unsqueeze(0))[0]
    assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_modules_default_with_module_parameters_matches_mergekit(llamas, tmp_path):
    """``modules: {default: ...}`` (mergekit's single-module form) with module-level parameters between the
    slice's and the global ones: bit-identical under --exact-dtype."""
    cfg = {
        "merge_method": "ties",
        "base_model": llamas["base"],
        "modules": {
            "default": {
                "models": [
                    {"model": llamas["a"], "parameters": {"weight": 0.6}},
                    {"model": llamas["b"], "parameters": {"weight": 0.4}},
                ],
                "parameters": {"density": [{"filter": "mlp", "value": 0.3}], "lambda": 0.8},
            }
        },
        "parameters": {"density": 0.7, "lambda": 1.2},
        "dtype": "bfloat16",
    }
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours = _ours(cfg, tmp_path / "ws")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        ({"vision_tower": {"models": ["x"]}}, "only the 'default' module"),
        ({"default": {"models": ["x"], "slices": [{"sources": []}]}}, "exactly one of 'models' and 'slices'"),
        ({"default": {"models": ["x"], "extra": 1}}, "modules.default is"),
    ],
)
def test_bad_modules_name_the_key(tmp_path, modules, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "slerp", "modules": modules}))
    with pytest.raises(WeightsmithError, match=needle):
        recipe.load_recipe(path)
