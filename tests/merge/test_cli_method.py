"""``weightsmith merge MODEL... --method NAME --out DIR``: the one-line merge builds the recipe a YAML file
would hold and runs it through the same reader and executor, so its files equal the YAML's bit for bit; bad
options exit 2 naming the option and write nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_fixtures import make_family
from test_regmean import tiny_llama_family

from weightsmith.cli import main
from weightsmith.store import open_store

torch.set_num_threads(1)
RECORD = "weightsmith_recipe.yaml"  # the provenance file: the YAML (ours) or the recipe built from options


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``weightsmith ARGS`` as the console script does; its exit code and output (stdout + stderr)."""
    old = sys.argv
    sys.argv = ["weightsmith", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
        torch.set_num_threads(1)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> tuple[str, list[str]]:
    base, fts = make_family(tmp_path_factory.mktemp("fam"), n=2)
    return str(base), [str(p) for p in fts]


@pytest.fixture(scope="module")
def lms(tmp_path_factory, minilm_dir) -> tuple[str, list[str]]:
    """Tiny Llama causal LMs with a tokenizer (RegMean runs them)."""
    base, fts = tiny_llama_family(tmp_path_factory.mktemp("lms"), minilm_dir)
    return str(base), [str(p) for p in fts]


def case(name: str, base: str, fts: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command-line arguments of one merge and the recipe file, written by hand, that says the same."""

    def weighted(*weights: float) -> list[dict[str, Any]]:
        return [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, weights, strict=True)]

    if name == "linear":  # mergekit's name: read as a mergekit YAML
        args = [*fts, "--method", "linear", "--weights", "0.3,0.7"]
        return args, {"merge_method": "linear", "models": weighted(0.3, 0.7)}
    if name == "ties":
        args = [*fts, "--base", base, "--method", "ties", "--opt", "density=0.5", "--opt", "trim=tensor"]
        return args, {"method": "ties", "density": 0.5, "trim": "tensor", "base": base, "models": fts}
    if name == "ties-mergekit":
        args = [*fts, "--base", base, "--method", "ties", "--mergekit", "--opt", "density=0.5"]
        args += ["--weights", "1,0.5"]
        recipe = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5}}
        return args, {**recipe, "models": weighted(1.0, 0.5)}
    if name == "slerp":
        args = [fts[0], "--base", base, "--method", "slerp", "--opt", "t=0.3"]
        return args, {"method": "slerp", "t": 0.3, "base": base, "models": [fts[0]]}
    assert name == "regmean"
    args = [*fts, "--method", "regmean", "--calib", "hamlet", "--samples", "2", "--seq-len", "16"]
    args += ["--opt", "alpha=0.5"]
    recipe = {"method": "regmean", "data": ["hamlet"], "samples": 2, "seq_len": 16, "alpha": 0.5}
    return args, {**recipe, "models": fts}


@pytest.mark.parametrize("name", ["linear", "ties", "ties-mergekit", "slerp", "regmean"])
def test_one_line_merge_equals_the_yaml_bit_for_bit(name, fam, lms, tmp_path, capsys):
    base, fts = lms if name == "regmean" else fam
    args, recipe = case(name, base, fts)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["merge", str(path), str(tmp_path / "yaml")], capsys)[0] == 0
    code, err = cli(["merge", *args, "--out", str(tmp_path / "line")], capsys)
    assert code == 0, err
    from_yaml, from_line = files(tmp_path / "yaml"), files(tmp_path / "line")
    line_recipe = yaml.safe_load(from_line.pop(RECORD))
    from_yaml.pop(RECORD)
    assert sorted(from_line) == sorted(from_yaml) and "config.json" in from_line
    for f, content in from_line.items():
        assert content == from_yaml[f], f"{name}: {f} differs from the YAML's"
    # the merge did something: the output is not a copy of an input
    merged, first = open_store(tmp_path / "line"), open_store(fts[0])
    w = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(merged[w], first[w])
    # the recorded recipe is the hand-written one; run as a file, it gives the same files again
    assert line_recipe == recipe
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(line_recipe))
    assert cli(["merge", str(again), "--out", str(tmp_path / "again")], capsys)[0] == 0
    rerun = files(tmp_path / "again")
    rerun.pop(RECORD)
    assert rerun == from_line


BAD = [
    (["--method", "ties", "--opt", "densty=0.5"], "'densty'"),
    (["--method", "ties", "--opt", "density=high"], "'density'"),
    (["--method", "ties", "--opt", "density=1.5"], "density=1.5"),
    (["--method", "ties", "--opt", "base=x"], "'base'"),
    (["--method", "ties", "--opt", "novalue"], "--opt 'novalue'"),
    (["--method", "tiez"], "'tiez'"),
    (["--method", "slerp", "--opt", "t=1.5"], "t=1.5"),
    (["--method", "linear", "--weights", "1,x"], "--weights 1,x"),
    (["--method", "linear", "--weights", "1"], "--weights 1"),
    (["--method", "linear", "--mergekit", "--opt", "nope=1"], "'nope'"),
    (["--method", "ties", "--calib", "hamlet"], "--calib"),
    (["--method", "regmean"], "--calib: method 'regmean' needs data"),
    (["--method", "regmean", "--calib", "no-such-text"], "--calib no-such-text"),
    (["--method", "regmean", "--calib", "hamlet", "--samples", "0"], "samples=0"),
    (["--method", "regmean", "--calib", "hamlet", "--opt", "data=hamlet"], "--calib"),
    (["--method", "ties", "--exact-dtype"], "--exact-dtype"),
    (["--method", "ties", "--dtype", "float8"], "--dtype"),
]


@pytest.mark.parametrize(("extra", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_exit_2_name_the_option_and_write_nothing(extra, named, fam, tmp_path, capsys):
    _, fts = fam
    out = tmp_path / "out"
    code, err = cli(["merge", *fts, *extra, "--out", str(out)], capsys)
    assert code == 2, err
    assert named in " ".join(err.split()), err
    assert list(tmp_path.iterdir()) == []


def test_misplaced_arguments_exit_2(fam, tmp_path, capsys):
    base, fts = fam
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "models": fts}))
    for args, named in (
        ([*fts, "--method", "ties"], "--out"),  # no output
        ([str(recipe), str(tmp_path / "o"), "--base", base], "--base"),  # a recipe names its own base
        ([str(recipe), "--method", "ties", "--out", str(tmp_path / "o")], "r.yaml"),
        ([*fts, str(tmp_path / "o")], "3 arguments"),  # models without --method
    ):
        code, err = cli(["merge", *args], capsys)
        assert code == 2 and named in " ".join(err.split()), (args, err)
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_help_shows_the_one_line_shape(capsys):
    code, text = cli(["merge", "--help"], capsys)
    text = " ".join(text.split())
    assert code == 0
    for shape in ("MODEL_A MODEL_B ... [--base BASE] --method NAME", "--weights W1,W2", "--calib DATA"):
        assert shape in text
    for option in ("--opt", "--samples", "--seq-len", "--mergekit", "RECIPE"):
        assert option in text
