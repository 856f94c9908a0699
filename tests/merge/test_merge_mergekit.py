"""Reference: our reading of a mergekit YAML reproduces mergekit 0.1.5's own output tensors.

mergekit draws DARE masks from the global torch RNG in its task-graph order; we draw one generator per
(task, tensor), so the random streams cannot match. DARE is compared exactly where it is deterministic
(density 1) and distributionally otherwise (kept fraction, mergekit's L1 rescale).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import make_family
from safetensors.torch import load_file

from weightsmith.merge import recipe

mergekit = pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("mk")
    base, fts = make_family(root, n=3)
    return base, fts, root


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    return load_file(str(out / "model.safetensors"))


def run_ours(cfg: dict, root: Path, name: str) -> dict[str, torch.Tensor]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = recipe.run(path, root / f"ws-{name}")
    return load_file(str(out / "model.safetensors"))


def config(method: str, base: Path, fts: list[Path], density, glob: dict | None = None) -> dict:
    models = []
    for i, f in enumerate(fts):
        # a layer gradient for the weight and a filtered density exercise mergekit's parameter rules
        params = {"weight": [0.2 + 0.1 * i, 0.6], "density": density}
        models.append({"model": str(f), "parameters": params})
    cfg = {"merge_method": method, "models": models, "parameters": glob or {}, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(base)
    return cfg


CASES = {
    "linear": (1.0, {}),
    "task_arithmetic": (1.0, {"lambda": 0.7}),
    "ties": ([{"filter": "mlp", "value": 0.5}, {"value": 0.3}], {}),
    "ties_normalize_off": (0.4, {"normalize": False, "lambda": 1.3}),
    "dare_ties": (1.0, {}),
    "dare_linear": (1.0, {"lambda": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(family, case):
    base, fts, root = family
    method = case.removesuffix("_normalize_off")
    density, glob = CASES[case]
    cfg = config(method, base, fts, density, glob)
    ref = run_mergekit(cfg, root / f"mk-{case}")
    ours = run_ours(cfg, root, case)
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)


def test_dare_is_distributionally_the_same(family):
    """One model, weight 1, density 0.3: both keep ~30% of each delta and L1-rescale the survivors."""
    base, fts, root = family
    cfg = {
        "merge_method": "dare_linear",
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0, "density": 0.3}}],
    }
    ref = run_mergekit(cfg, root / "mk-dare-dist")
    ours = run_ours(cfg, root, "dare-dist")
    b, theta = load_file(str(base / "model.safetensors")), load_file(str(fts[0] / "model.safetensors"))
    n_total = sum(v.numel() for v in b.values())
    for out in (ref, ours):
        kept = sum(int(((out[k] - b[k]).abs() > 1e-7).sum()) for k in b)
        assert abs(kept / n_total - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n_total)
        for k in b:
            delta, merged = theta[k] - b[k], out[k] - b[k]
            torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(ref[k], ours[k]) for k in b)  # different random streams, as documented


def test_cli_detects_mergekit_yaml(family, tmp_path):
    from merge_fixtures import cli_app
    from typer.testing import CliRunner

    base, fts, root = family
    cfg = config("ties", base, fts, 0.5)
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli_app(), ["merge", str(path), str(tmp_path / "out"), "--shard-size", "10KB"])
    assert res.exit_code == 0, res.output
    ref = run_mergekit(cfg, tmp_path / "mk")
    index = yaml.safe_load((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    ours = {}
    for f in set(index["weight_map"].values()):
        ours.update(load_file(str(tmp_path / "out" / f)))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "weightsmith_recipe.yaml").read_text() == path.read_text()
