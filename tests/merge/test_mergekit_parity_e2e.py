"""End to end: a mergekit YAML (tensor-wise methods, ``slices:``, gradients, filters) run as
``weightsmith merge FILE OUT`` runs it (``recipe.run`` -> ``weightsmith.merge.mergekit_plan``) gives
mergekit 0.1.5's own output directory (1e-5 on float32), on a tiny 2-layer Llama built with transformers.

mergekit draws DELLA's masks from the global RNG in its task-graph order; ours come from one generator
per tensor, so DELLA is compared end to end only where it is deterministic (density 1) - its kernel is
compared exactly, seed for seed, in test_mergekit_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.errors import WeightsmithError
from weightsmith.merge import inputs, mergekit_plan

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """A base and three 'fine-tunes' of a 2-layer Llama (float32, untied head)."""
    root = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=48,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # norms start at exactly 1: give them some spread too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    for k in ("a", "b", "c"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[k] = root / k
        model.save_pretrained(paths[k])
    return {k: str(v) for k, v in paths.items()}


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def run_ours(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    """The YAML written to a file and run as ``weightsmith merge FILE OUT`` runs it."""
    import yaml

    from weightsmith.merge import recipe

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    recipe.run(path, out)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def configs(m: dict[str, str]) -> dict[str, dict]:
    gradient_t = [
        {"filter": "self_attn", "value": [0.0, 0.7]},
        {"filter": "mlp", "value": [1.0, 0.2]},
        {"value": 0.4},
    ]
    return {
        "slerp-slices-gradients": {
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
            "parameters": {"t": gradient_t},
        },
        "slerp-models": {
            "merge_method": "slerp",
            "base_model": m["base"],
            "models": [{"model": m["base"]}, {"model": m["c"]}],
            "parameters": {"t": [0.1, 0.9]},
        },
        "passthrough-frankenmerge": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": m["a"], "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": m["b"],
                            "layer_range": [1, 2],
                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                        }
                    ]
                },
                {"sources": [{"model": m["c"], "layer_range": [0, 1]}]},
            ],
        },
        "ties-slices": {
            "merge_method": "ties",
            "base_model": m["base"],
            "slices": [
                {
                    "sources": [
                        {"model": m["base"], "layer_range": [0, 2]},
                        {
                            "model": m["a"],
                            "layer_range": [0, 2],
                            "parameters": {"weight": 1.0, "density": 0.5},
                        },
                        {
                            "model": m["b"],
                            "layer_range": [0, 2],
                            "parameters": {"weight": [0.2, 0.8], "density": 0.7},
                        },
                    ]
                },
                {
                    "sources": [
                        {"model": m["base"], "layer_range": [1, 2]},
                        {
                            "model": m["c"],
                            "layer_range": [1, 2],
                            "parameters": {"weight": 0.5, "density": 0.3},
                        },
                    ]
                },
            ],
        },
        "linear-models": {
            "merge_method": "linear",
            "models": [
                {"model": m["a"], "parameters": {"weight": 0.3}},
                {"model": m["b"], "parameters": {"weight": 0.7}},
            ],
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": m["base"],
            "models": [{"model": m["a"]}, {"model": m["b"]}, {"model": m["c"]}],
        },
        "breadcrumbs_ties-gradient-density": {
            "merge_method": "breadcrumbs_ties",
            "base_model": m["base"],
            "models": [
                {"model": m["a"], "parameters": {"weight": 1.0, "density": [0.9, 0.5], "gamma": 0.02}},
                {"model": m["b"], "parameters": {"weight": 0.6, "density": 0.7}},
            ],
            "parameters": {"normalize": True, "lambda": 0.9},
        },
        "della-density-1": {
            "merge_method": "della",
            "base_model": m["base"],
            "models": [
                {"model": m["a"], "parameters": {"weight": 1.0}},
                {"model": m["b"], "parameters": {"weight": 0.5}},
            ],
        },
        "nuslerp-no-base": {
            "merge_method": "nuslerp",
            "models": [
                {"model": m["a"], "parameters": {"weight": 0.3}},
                {"model": m["b"], "parameters": {"weight": 0.7}},
            ],
            "parameters": {"nuslerp_flatten": False},
        },
        "nuslerp-base": {
            "merge_method": "nuslerp",
            "base_model": m["base"],
            "models": [
                {"model": m["a"], "parameters": {"weight": 1.0}},
                {"model": m["b"], "parameters": {"weight": 2.0}},
            ],
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": m["base"],
            "models": [
                {"model": k, "parameters": {"weight": w}}
                for k, w in ((m["a"], 1.0), (m["b"], 0.5), (m["c"], 0.7))
            ],
        },
        "karcher": {"merge_method": "karcher", "models": [{"model": m[k]} for k in ("a", "b", "c")]},
        "sce": {
            "merge_method": "sce",
            "base_model": m["base"],
            "models": [{"model": m[k]} for k in ("a", "b", "c")],
            "parameters": {"select_topk": 0.6},
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": m["base"],
            "models": [{"model": m["a"]}],
            "parameters": {"t": 0.01},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": m["base"],
            "models": [{"model": m["b"]}],
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": m["base"],
            "models": [{"model": m[k]} for k in ("a", "b")],
            "parameters": {"epsilon": 0.015},
        },
    }


NAMES = list(configs({k: k for k in ("base", "a", "b", "c")}))


@pytest.mark.parametrize("name", NAMES)
def test_mergekit_yaml_matches_mergekit(llamas, tmp_path, name):
    cfg = {**configs(llamas)[name], "dtype": "float32"}
    theirs = run_mergekit(json.loads(json.dumps(cfg)), tmp_path / "mk")
    ours = run_ours(cfg, tmp_path / "ws")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    ws_cfg = json.loads((tmp_path / "ws" / "config.json").read_text())
    assert ws_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


def test_frankenmerge_output_loads_with_transformers(llamas, tmp_path):
    out = tmp_path / "franken"
    mergekit_plan.run(
        configs(llamas)["passthrough-frankenmerge"],
        out,
        open_model=inputs.open_input,
        source_dir=inputs.source_dir,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 1]), "same number of layers"),
        (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 5]), "outside"),
        (lambda c: c["parameters"].update(t=1.5), "t=1.5"),
        (lambda c: c["parameters"].update(t="high"), "must be a number"),
        (lambda c: c["slices"][0]["sources"].append(dict(c["slices"][0]["sources"][0])), "exactly 2 inputs"),
        (lambda c: c["parameters"].pop("t"), "missing required parameter 't'"),
    ],
    ids=["mismatched-slices", "range-outside", "t-outside", "t-type", "three-models", "t-missing"],
)
def test_bad_slerp_configs_are_refused_with_the_key(llamas, tmp_path, mutate, match):
    cfg = json.loads(json.dumps(configs(llamas)["slerp-slices-gradients"]))
    mutate(cfg)
    with pytest.raises(WeightsmithError, match=match):
        run_ours(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ our recipe format and the CLI


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_our_recipe_format_runs_a_tensorwise_method(llamas, tmp_path):
    from weightsmith.merge import recipe
    from weightsmith.merge.slerp import SLERP
    from weightsmith.store import open_store

    r = write_recipe(
        tmp_path / "r.yaml", f"method: slerp\nt: 0.3\nbase: {llamas['base']}\nmodels:\n  - {llamas['a']}\n"
    )
    out = recipe.run(r, tmp_path / "out")
    base, a, got = open_store(llamas["base"]), open_store(llamas["a"]), open_store(out)
    assert sorted(got) == sorted(base)
    for k in base:
        torch.testing.assert_close(got[k], SLERP(t=0.3).merge(base[k], [a[k]]), rtol=0, atol=0)


def test_della_recipe_is_reproducible_and_seeded(llamas, tmp_path):
    from weightsmith.merge import recipe
    from weightsmith.store import open_store

    def run(seed: int, out: str):
        text = (
            f"method: della\ndensity: 0.5\nseed: {seed}\nbase: {llamas['base']}\nmodels:\n  - {llamas['a']}\n"
        )
        text += f"  - model: {llamas['b']}\n    weight: 0.5\n"
        return open_store(recipe.run(write_recipe(tmp_path / f"{out}.yaml", text), tmp_path / out))

    one, again, other = run(0, "one"), run(0, "again"), run(1, "other")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(one[name], again[name])
    assert not torch.equal(one[name], other[name])


def test_cli_refuses_slerp_t_outside_unit_interval(llamas, tmp_path):
    import subprocess
    import sys

    r = write_recipe(
        tmp_path / "r.yaml", f"method: slerp\nt: 1.5\nbase: {llamas['base']}\nmodels:\n  - {llamas['a']}\n"
    )
    cmd = [
        sys.executable,
        "-c",
        "from weightsmith.cli import main; main()",
        "merge",
        str(r),
        str(tmp_path / "out"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "t=1.5" in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ the handle the recipe layer will use


def test_mergekit_yaml_handle_resolves_relative_paths(llamas, tmp_path):
    import shutil

    import yaml

    for k in ("a", "b"):
        shutil.copytree(llamas[k], tmp_path / k)
    cfg = configs({"a": "a", "b": "b", "c": "c", "base": "base"})["nuslerp-no-base"]
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = mergekit_plan.MergekitYAML(yaml.safe_load(path.read_text()), path).run(None, tmp_path / "ws")
    theirs = run_mergekit({**configs(llamas)["nuslerp-no-base"]}, tmp_path / "mk")
    got = load_file(str(out / "model.safetensors"))
    for k in theirs:
        torch.testing.assert_close(got[k], theirs[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"merge_method": "slerp", "parameters": {"t": 0.5, "tt": 1}}, "unknown parameter 'tt'"),
        ({"merge_method": "slerp", "modules": {"x": {}}}, "modules"),
        ({"merge_method": "slerp", "tokenizer_source": 3}, "tokenizer_source"),
        ({"merge_method": "slerpy"}, "no tensor-wise kernel"),
        (
            {"merge_method": "della", "models": [{"model": "x", "parameters": {"gamma": 0.1}}]},
            "'gamma' of models",
        ),
    ],
)
def test_mergekit_yaml_handle_refuses_what_it_cannot_do(cfg, match):
    with pytest.raises(WeightsmithError, match=match):
        mergekit_plan.MergekitYAML(cfg)


def test_handles_routes_new_methods_and_slices_only():
    assert mergekit_plan.handles({"merge_method": "slerp"})
    assert mergekit_plan.handles({"merge_method": "ties", "slices": [{}]})
    assert not mergekit_plan.handles({"merge_method": "ties", "models": []})
    assert not mergekit_plan.handles({"merge_method": "nonsense"})
