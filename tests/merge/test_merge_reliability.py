"""Bad merge input -> a message naming the key/model/tensor (exit 2), never a traceback, a hang or a silent
wrong model; background threads are joined on every error path (no exit 134)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import cli_app, make_family, write_checkpoint

from weightsmith.errors import WeightsmithError
from weightsmith.merge import OPCM, TIES, Average, TaskArithmetic, merge
from weightsmith.merge.recipe import load_recipe, run
from weightsmith.select import Selector
from weightsmith.store import open_store

torch.set_num_threads(1)
HERE = Path(__file__).parent


@pytest.fixture()
def fam(tmp_path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "in", n=2)


def recipe_file(tmp_path: Path, data: object, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def refused(path: Path, out: Path, match: str) -> str:
    with pytest.raises(WeightsmithError, match=match) as info:
        run(path, out)
    assert not out.exists()
    assert len(str(info.value)) < 1200, "an error message must not echo a whole user object"
    return str(info.value)


# ------------------------------------------------------------------------------------------ YAML size


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize("flavour", ["ours", "mergekit"])
def test_alias_bomb_fails_fast(tmp_path, flavour):
    head = "method: ties\n" if flavour == "ours" else "merge_method: ties\nbase_model: base\n"
    text = billion_laughs() + "\n" + head + "models: *a8\n"
    start = time.perf_counter()
    msg = refused(recipe_file(tmp_path, text), tmp_path / "out", "more than 100000 YAML nodes")
    assert time.perf_counter() - start < 5
    assert "lol" not in msg


def test_merge_key_bomb_fails_fast(tmp_path):
    lines = ["k0: &k0 {" + ", ".join(f"x{j}: 1" for j in range(10)) + "}"]
    for i in range(1, 8):
        lines.append(
            f"k{i}: &k{i} {{"
            + ", ".join(f"<<: *k{i - 1}" if j == 0 else f"y{i}_{j}: *k{i - 1}" for j in range(10))
            + "}"
        )
    text = "\n".join(lines) + "\nmethod: ties\nmodels: [a]\n"
    start = time.perf_counter()
    refused(recipe_file(tmp_path, text), tmp_path / "out", "YAML nodes")
    assert time.perf_counter() - start < 5


def test_huge_and_non_utf8_recipes(tmp_path):
    big = recipe_file(tmp_path, "method: ties\nmodels: [a]\n#" + "x" * (1 << 20) + "\n", "big.yaml")
    refused(big, tmp_path / "out", "too large for a merge recipe")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("method: ties\nmodels: [mod\xe8le]\n".encode("latin-1"))
    refused(latin, tmp_path / "out", r"latin1\.yaml: not UTF-8 text \(byte \d+ is 0xe8\)")


# ------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"method": "ties", "density": "high", "models": ["a"]},
            "option 'density' of method 'ties' must be a finite number",
        ),
        ({"method": "ties", "trim": 3, "models": ["a"]}, "option 'trim' of method 'ties' must be a string"),
        (
            {"method": "ties", "weighted_election": "yes", "models": ["a"]},
            "'weighted_election' .* true or false",
        ),
        ({"method": "opcm", "unprojected": [1, 2], "models": ["a"]}, "'unprojected' .* a list of strings"),
        (
            {"method": "ties", "models": [{"model": "a", "weight": [1]}]},
            "weight of model 'a' must be a finite number",
        ),
        ({"method": "ties", "models": [{"model": "a", "weight": ".5x"}]}, "weight of model 'a' must be"),
        ({"method": "ties", "models": [{"model": 3}]}, "a model must be a path or model name \\(got 3\\)"),
        ({"method": "ties", "models": [["a", "b"]]}, "each model is a path"),
        ({"method": "ties", "models": [{"model": "a", "wieght": 1}]}, "model 'a' has unknown key.*wieght"),
        ({"method": "ties", "densty": 0.2, "models": ["a"]}, "has no option 'densty'"),
        ({"method": ["ties"], "models": ["a"]}, "'method' must be a name"),
        ({"method": "ties", "models": ["a"], "select": [1]}, "'select' must be a pattern"),
        ({"method": "ties", "models": ["a"], "dtype": 16}, "'dtype' must be a name"),
        ({"method": "ties", "models": "a"}, "'models' must be a non-empty list"),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"density": "high"}}],
            },
            "parameter 'density' of model 'a' must be a finite number",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "parameters": {"lambda": [1, "x"]},
                "models": [{"model": "a"}],
            },
            "parameter 'lambda' \\(global\\) must be a finite number",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "parameters": {"normalize": 3},
                "models": [{"model": "a"}],
            },
            "'normalize' \\(global\\) must be true or false",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "parameters": {"weigth": 1},
                "models": [{"model": "a"}],
            },
            "unknown parameter 'weigth'",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "params": {}}]},
            "model 'a' has unknown key.*params",
        ),
        (
            {"merge_method": "ties", "base_model": "b", "models": ["a"], "slicez": 1},
            "unknown mergekit key.*slicez",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"density": [{"filter": 3, "value": 1}]}}],
            },
            "a filter is a name substring",
        ),
    ],
)
def test_wrong_types_and_unknown_keys_are_named(tmp_path, data, match):
    refused(recipe_file(tmp_path, data), tmp_path / "out", match)


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, [0.5, 0.0], [{"filter": "mlp", "value": 2}]])
def test_mergekit_density_outside_0_1_is_refused(tmp_path, density):
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1, "density": density}}],
    }
    refused(recipe_file(tmp_path, data), tmp_path / "out", r"'density' of model 'a' must be in \(0, 1\]")


# ------------------------------------------------------------------------------ meaningless merges


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "ties", "density": 0}, r"ties option density=0: the kept fraction must be in \(0, 1\]"),
        ({"method": "ties", "density": 1.5}, "must be in"),
        ({"method": "dare", "p": 1.0}, r"dare option p=1.0: the drop rate must be in \[0, 1\)"),
        ({"method": "dare_ties", "p": -0.5}, "dare_ties option p=-0.5"),
    ],
)
def test_our_densities_and_drop_rates_are_checked(tmp_path, options, match):
    refused(recipe_file(tmp_path, {**options, "models": ["a"]}), tmp_path / "out", match)


def test_weights_summing_to_zero_under_normalize(fam, tmp_path):
    base, fts = fam
    with pytest.raises(WeightsmithError, match=r"sum to 0, and this method divides by their sum"):
        merge(fts, Average(), tmp_path / "out", weights=[1.0, -1.0])
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 1.0}},
            {"model": str(fts[1]), "parameters": {"weight": -1.0}},
        ],
    }
    refused(
        recipe_file(tmp_path, data), tmp_path / "out", r"weights for tensor '.*' \[1\.0, -1\.0\] sum to 0"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_all_zero_weights(fam, tmp_path):
    base, fts = fam
    with pytest.raises(WeightsmithError, match="every merge weight is 0"):
        merge(fts, TaskArithmetic(), tmp_path / "out", base=base, weights=[0.0, 0.0])
    data = {"method": "ties", "base": str(base), "models": [{"model": str(f), "weight": 0} for f in fts]}
    refused(recipe_file(tmp_path, data), tmp_path / "out", "every merge weight is 0")


def test_selections_that_match_nothing(fam, tmp_path):
    base, fts = fam
    out = tmp_path / "out"
    with pytest.raises(WeightsmithError, match=r"selector '\*nomatch\*' matches none"):
        merge(fts, TaskArithmetic(), out, base=base, select="*nomatch*")
    with pytest.raises(WeightsmithError, match="selector 'q_projj' matches none"):
        merge(fts, TaskArithmetic(), out, base=base, select=["*mlp*", "q_projj"])
    data = {"method": "task_arithmetic", "base": str(base), "models": [str(f) for f in fts], "exclude": ["*"]}
    refused(recipe_file(tmp_path, data), out, "leaves no tensor .* to merge")
    mk = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {
                "model": str(f),
                "parameters": {"weight": 1.0, "density": [{"filter": "mlpp", "value": 0.5}, {"value": 1.0}]},
            }
            for f in fts
        ],
    }
    refused(recipe_file(tmp_path, mk), out, "filter 'mlpp' matches no tensor")
    with pytest.raises(WeightsmithError, match="leaves no tensor"):
        merge([fts[0]], OPCM(), out, base=base, select=Selector(exclude=("*",)))


# ------------------------------------------------------------------------------ valid odd inputs


@pytest.mark.parametrize(
    "method", [TIES(density=0.5), TIES(density=0.5, trim="tensor"), TaskArithmetic(), OPCM()]
)
def test_a_zero_size_tensor_merges(fam, tmp_path, method):
    base, fts = fam
    for p in (base, *fts):
        t = dict(open_store(p).items())
        t["empty.weight"] = torch.zeros(0, 4)
        write_checkpoint(p, t)
    out = merge(fts, method, tmp_path / "out", base=base)
    got = open_store(out)
    assert got.meta("empty.weight").shape == (0, 4)
    assert got["model.norm.weight"].shape == (16,)


def fake_run(path: Path, model: Path | None, method: str = "full") -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"adapter": {"method": method}, "task": "x"}))
    if model is not None:
        write_checkpoint(path / "model", dict(open_store(model).items()))
    else:
        (path / "adapter").mkdir()
    (path / "head.safetensors").write_bytes(b"")  # must never be picked up as weights
    return path


def test_an_adapt_run_is_its_model_directory(fam, tmp_path):
    base, fts = fam
    runs = [fake_run(tmp_path / f"run{i}", f) for i, f in enumerate(fts)]
    a = open_store(merge(runs, TIES(density=0.5), tmp_path / "a", base=base))
    b = open_store(merge(fts, TIES(density=0.5), tmp_path / "b", base=base))
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    lora_run = fake_run(tmp_path / "lora_run", None, method="lora")
    with pytest.raises(WeightsmithError, match=r"adapt run with a lora adapter, not a full model.*export"):
        merge([lora_run], TaskArithmetic(), tmp_path / "c", base=base)


def test_cli_takes_out_positionally_or_as_option(fam, tmp_path):
    from typer.testing import CliRunner

    base, fts = fam
    path = recipe_file(
        tmp_path, {"method": "task_arithmetic", "base": str(base), "models": [str(f) for f in fts]}
    )
    res = CliRunner().invoke(cli_app(), ["merge", str(path), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    assert set(open_store(tmp_path / "o1")) == set(open_store(base))
    res = CliRunner().invoke(
        cli_app(), ["merge", str(path), str(tmp_path / "o2"), "--out", str(tmp_path / "o3")]
    )
    assert isinstance(res.exception, WeightsmithError) and "two outputs" in str(res.exception)
    res = CliRunner().invoke(cli_app(), ["merge", str(path)])
    assert isinstance(res.exception, WeightsmithError) and "no output given" in str(res.exception)
    assert load_recipe(path).flavour == "weightsmith"


# --------------------------------------------------------------- errors join the executor's threads

FAILURES = {
    "nan": """
        t = dict(open_store(fts[1]).items())
        t["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
        write_checkpoint(fts[1], t)
    """,
    "shape": """
        t = dict(open_store(fts[1]).items())
        t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)
        write_checkpoint(fts[1], t)
    """,
    "full_disk": """
        import errno, weightsmith.store as store
        real, calls = store._write_chunk, [0]
        def fill_up(*a, **k):
            calls[0] += 1
            if calls[0] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        store._write_chunk = fill_up
    """,
    "ctrl_c": """
        import weightsmith.merge._core as core
        real, calls = core.merge_streamed, [0]
        def interrupted(*a, **k):
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
            return real(*a, **k)
        core.merge_streamed = interrupted
    """,
}
SCRIPT = """
import sys, threading, torch
sys.path.insert(0, {here!r})
from pathlib import Path
from merge_fixtures import make_family, write_checkpoint
from weightsmith.store import open_store
from weightsmith.merge import TIES, merge
torch.set_num_threads(1)
root = Path({root!r})
base, fts = make_family(root / "in", n=2)
import time, weightsmith.store as st  # slow reads and writes: the threads are busy when the error comes
get, put = st.SafetensorsStore.__getitem__, st._write_chunk
st.SafetensorsStore.__getitem__ = lambda self, name: (time.sleep(0.02), get(self, name))[1]
st._write_chunk = lambda *a, **k: (time.sleep(0.01), put(*a, **k))[1]
{setup}
try:
    merge(fts, TIES(density=0.5, trim="tensor"), root / "out", base=base, shard_size="2KB")
finally:
    print("ALIVE", [t.name for t in threading.enumerate() if t.name.startswith("weightsmith")], flush=True)
"""


@pytest.mark.parametrize("failure", list(FAILURES))
def test_every_error_path_joins_the_threads(tmp_path, failure):
    script = SCRIPT.format(here=str(HERE), root=str(tmp_path), setup=textwrap.dedent(FAILURES[failure]))
    env = {**os.environ, "WEIGHTSMITH_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode not in (0, 134, -6), res.stderr[-2000:]
    assert "terminate called" not in res.stderr
    assert "ALIVE []" in res.stdout, res.stdout + res.stderr[-2000:]
    expected = {
        "nan": "contains NaN",
        "shape": "shape mismatch",
        "full_disk": "No space left",
        "ctrl_c": "KeyboardInterrupt",
    }
    assert expected[failure] in res.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_signatures_are_staged(tmp_path):
    from weightsmith.merge.signatures import extract_signature, load_signature, save_signature

    g = torch.Generator().manual_seed(0)
    clean = {"w": torch.randn(8, 6, generator=g)}
    robust = {"w": clean["w"] + 0.1 * torch.randn(8, 6, generator=g)}
    sig = extract_signature(robust, clean, layers=["w"], rank=2, bits=8)
    out = save_signature(sig, tmp_path / "sig")
    with pytest.raises(WeightsmithError, match="already exists"):
        save_signature(sig, out)
    save_signature(sig, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sig"]  # no staging or old copy left behind
    torch.testing.assert_close(load_signature(out).dense()["w"], sig.dense()["w"])


def test_a_config_that_is_not_a_merge_method(fam, tmp_path):
    from weightsmith.config import registered

    base, fts = fam
    adapter = registered("adapter")["lora"]()  # an adapter config named like the 'lora' merge method
    with pytest.raises(WeightsmithError, match="is not a merge method; use one of .*ties"):
        merge(fts, adapter, tmp_path / "out", base=base)
