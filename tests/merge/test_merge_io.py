"""The streaming executor: output layout, dtype policy, recipes, and bad input -> clear errors, no partial
model that looks complete."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import cli_app, make_family, write_checkpoint

from weightsmith.errors import WeightsmithError
from weightsmith.merge import TIES, TaskArithmetic, TaskVector, merge, merge_tensors
from weightsmith.merge.recipe import load_recipe, run
from weightsmith.store import open_store


@pytest.fixture()
def fam(tmp_path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "in", n=2)


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    return dict(open_store(path).items())


def no_partial_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_merge_writes_a_model_directory(fam, tmp_path):
    base, fts = fam
    (base / "tokenizer.json").write_text("{}")
    out = merge(fts, TIES(density=0.5, trim="tensor"), tmp_path / "out", base=base, shard_size="4KB")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    got, b = read_dir(out), read_dir(base)
    thetas = [read_dir(f) for f in fts]
    for k in b:
        ref = merge_tensors(b[k], [t[k] for t in thetas], TIES(density=0.5, trim="tensor"))
        torch.testing.assert_close(got[k], ref, rtol=0, atol=0)


def test_task_vectors_are_lazy_views(fam):
    base, fts = fam
    b, m = open_store(base), open_store(fts[0])
    tv = TaskVector(m, b)
    assert set(tv) == set(b)
    k = "model.norm.weight"
    torch.testing.assert_close(tv[k], m[k] - b[k])


def test_model_scope_trim_keeps_the_global_top_k(fam, tmp_path):
    base, fts = fam
    out = merge(fts[:1], TIES(density=0.1, trim="model"), tmp_path / "out", base=base)
    got, b, t = read_dir(out), read_dir(base), read_dir(fts[0])
    total = sum(v.numel() for v in b.values())
    kept = sum(int((got[k] != b[k]).sum()) for k in b)
    assert kept == int(0.1 * total)
    per_tensor = [int((got[k] != b[k]).sum()) / got[k].numel() for k in b]
    assert max(per_tensor) - min(per_tensor) > 0.02  # the global cut keeps different fractions per tensor
    smallest_kept = min(float((t[k] - b[k])[got[k] != b[k]].abs().min()) for k in b if (got[k] != b[k]).any())
    largest_dropped = max(float((t[k] - b[k])[got[k] == b[k]].abs().max()) for k in b)
    assert smallest_kept >= largest_dropped


def test_dtype_policy(tmp_path):
    base, fts = make_family(tmp_path / "bf", n=2, dtype=torch.bfloat16)
    out = merge(fts, TaskArithmetic(), tmp_path / "o1", base=base)
    assert {v.dtype for v in read_dir(out).values()} == {torch.bfloat16}
    out = merge(fts, TaskArithmetic(), tmp_path / "o2", base=base, dtype="float16")
    assert {v.dtype for v in read_dir(out).values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_our_recipe_with_select(fam, tmp_path):
    base, fts = fam
    recipe = {
        "method": "task_arithmetic",
        "scaling": 0.5,
        "base": str(base),
        "models": [{"model": str(fts[0]), "weight": 2.0}, str(fts[1])],
        "exclude": ["lm_head*"],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = load_recipe(path)
    assert r.weights == [2.0, 1.0] and r.flavour == "weightsmith"
    out = run(r, tmp_path / "out")
    got, b = read_dir(out), read_dir(base)
    t0, t1 = read_dir(fts[0]), read_dir(fts[1])
    torch.testing.assert_close(got["lm_head.weight"], b["lm_head.weight"], rtol=0, atol=0)
    k = "model.norm.weight"
    torch.testing.assert_close(got[k], b[k] + 0.5 * (2 * (t0[k] - b[k]) + (t1[k] - b[k])))


def test_refuses_existing_output_without_force(fam, tmp_path):
    base, fts = fam
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeightsmithError, match="already exists"):
        merge(fts, TaskArithmetic(), out, base=base)
    assert (out / "keep.txt").read_text() == "mine"
    merge(fts, TaskArithmetic(), out, base=base, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_different_shapes_are_named(fam, tmp_path):
    base, fts = fam
    t = read_dir(fts[1])
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(33, 16)
    bad = write_checkpoint(tmp_path / "bad", t)
    with pytest.raises(
        WeightsmithError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(32, 16\) vs \(33, 16\)"
    ):
        merge([fts[0], bad], TaskArithmetic(), tmp_path / "out", base=base)
    no_partial_left(tmp_path, tmp_path / "out")


def test_missing_tensors_are_named(fam, tmp_path):
    base, fts = fam
    t = read_dir(fts[1])
    del t["model.layers.2.self_attn.k_proj.weight"]
    bad = write_checkpoint(tmp_path / "bad", t)
    with pytest.raises(
        WeightsmithError, match=r"lacks 1 tensor.*model\.layers\.2\.self_attn\.k_proj\.weight"
    ):
        merge([fts[0], bad], TaskArithmetic(), tmp_path / "out", base=base)


def test_mixed_dtypes_need_an_output_dtype(fam, tmp_path):
    base, fts = fam
    half = write_checkpoint(tmp_path / "half", {k: v.half() for k, v in read_dir(fts[1]).items()})
    with pytest.raises(WeightsmithError, match=r"float32 in .* but float16 in .*half.*--dtype"):
        merge([fts[0], half], TaskArithmetic(), tmp_path / "out", base=base)
    out = merge([fts[0], half], TaskArithmetic(), tmp_path / "out", base=base, dtype="float32")
    assert read_dir(out)["model.norm.weight"].dtype == torch.float32


def test_nan_is_named_with_its_file(fam, tmp_path):
    base, fts = fam
    t = read_dir(fts[1])
    t["model.layers.0.mlp.down_proj.weight"][3, 4] = float("nan")
    bad = write_checkpoint(tmp_path / "nan", t)
    with pytest.raises(
        WeightsmithError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' in .*nan contains NaN"
    ):
        merge([fts[0], bad], TaskArithmetic(), tmp_path / "out", base=base, shard_size="2KB")
    no_partial_left(tmp_path, tmp_path / "out")


def test_full_disk_leaves_nothing_behind(fam, tmp_path, monkeypatch):
    import weightsmith.store as store

    base, fts = fam
    calls = {"n": 0}
    real = store._write_chunk

    def fill_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_write_chunk", fill_up)
    with pytest.raises(WeightsmithError, match="No space left on device"):
        merge(fts, TaskArithmetic(), tmp_path / "out", base=base, shard_size="3KB")
    no_partial_left(tmp_path, tmp_path / "out")


def test_cli_help_and_errors(fam, tmp_path):
    from typer.testing import CliRunner

    res = CliRunner().invoke(cli_app(), ["merge", "--help"])
    assert res.exit_code == 0 and "merge_method" in res.output and "density" in res.output
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "tiez", "models": ["a"]}))
    with pytest.raises(WeightsmithError, match="unknown merge method 'tiez'"):
        run(path, tmp_path / "out")
    path.write_text(yaml.safe_dump({"merge_method": "frankenstein", "models": [{"model": "a"}]}))
    with pytest.raises(WeightsmithError, match="'frankenstein' is not supported"):
        run(path, tmp_path / "out")
