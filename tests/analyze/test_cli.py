"""The analyze, compare and nuclear-norm commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import weightsmith.cli.analyze  # noqa: F401  (registers the commands)
from weightsmith.cli._app import app
from weightsmith.errors import WeightsmithError

runner = CliRunner()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.proj.weight": torch.randn(40, 24, generator=g) for i in range(2)}
    base["norm.weight"] = torch.ones(24)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layers.0.proj.weight"] = tuned["layers.0.proj.weight"][:, :20].contiguous()
    tuned["layers.1.proj.weight"][0, 0] = float("nan")
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_analyze_writes_json_and_html_and_refuses_to_overwrite(tmp_path: Path) -> None:
    base, tuned = _files(tmp_path)
    out, html = tmp_path / "out" / "a.json", tmp_path / "out" / "a.html"
    res = runner.invoke(
        app, ["analyze", str(tuned), "--json", str(out), "--html", str(html), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["model"] == str(tuned)
    assert [m["name"] for m in data["matrices"]] == ["layers.0.proj.weight"]
    reasons = {s["name"]: s["reason"] for s in data["skipped"]}
    assert "NaN/Inf" in reasons["layers.1.proj.weight"] and "1-D" in reasons["norm.weight"]
    assert "<img" in html.read_text()
    again = runner.invoke(app, ["analyze", str(tuned), "--json", str(out)])
    assert isinstance(again.exception, WeightsmithError) and "--force" in str(again.exception)
    forced = runner.invoke(app, ["analyze", str(base), "--json", str(out), "--force", "--no-farms"])
    assert forced.exit_code == 0 and json.loads(out.read_text())["matrices"][0]["farms_alpha"] is None


def test_compare_names_shape_mismatches(tmp_path: Path) -> None:
    base, tuned = _files(tmp_path)
    res = runner.invoke(app, ["compare", str(base), str(base), "--json", "-", "--k", "3", "--epsilon", "0.4"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["summary"]["k"] == 3 and data["summary"]["total_intruders"] == 0
    res = runner.invoke(app, ["compare", str(base), str(tuned), "--json", "-"])
    assert isinstance(res.exception, WeightsmithError)
    assert "layers.0.proj.weight: shape mismatch: base [40, 24] vs other [40, 20]" in str(res.exception)


def test_bad_options_are_user_errors(tmp_path: Path) -> None:
    base, _ = _files(tmp_path)
    res = runner.invoke(app, ["analyze", str(base), "--device", "tpu"])
    assert isinstance(res.exception, WeightsmithError)
    res = runner.invoke(app, ["nuclear-norm", "smollm2", "--text", str(tmp_path / "missing.txt")])
    assert isinstance(res.exception, WeightsmithError) and "missing.txt" in str(res.exception)


@pytest.mark.usefixtures("smollm2_dir")
def test_nuclear_norm_on_hamlet() -> None:
    res = runner.invoke(
        app, ["nuclear-norm", "smollm2", "--max-tokens", "48", "--windows", "2", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["windows"] == 2 and data["tokens"] == 96
    # L unit rows: the squared column norms sum to L, so the top-L column norms sum to between L/sqrt(d)
    # and L (Cauchy-Schwarz), i.e. MNN / L lies in [1/sqrt(d), 1] with d = 576 for SmolLM2
    assert 576**-0.5 <= data["mnn"] <= 1.0


def test_special_file_and_symlink_outputs_stay_what_they_are(tmp_path: Path) -> None:
    """Issue 7: `analyze --json /dev/null --force` replaced /dev/null; FIFOs and symlinks must survive too."""
    import os
    import stat
    import threading

    base, _ = _files(tmp_path)
    args = ["analyze", str(base), "--device", "cpu", "--no-farms", "--no-mp"]
    res = runner.invoke(app, [*args, "--json", os.devnull, "--force"])
    assert res.exit_code == 0, res.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    res = runner.invoke(app, [*args, "--out", str(fifo)])  # a special file needs no --force
    reader.join(timeout=60)
    assert res.exit_code == 0, res.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and json.loads(got[0])["matrices"]

    target = tmp_path / "real" / "a.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    res = runner.invoke(app, [*args, "--out", str(link), "--html", str(tmp_path / "r.html"), "--force"])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["matrices"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base.safetensors", "tuned.safetensors", "pipe.json", "real", "link.json", "r.html"]
    ), "no staging debris beside the outputs"


def test_version_and_out_alias(tmp_path: Path) -> None:
    from weightsmith import __version__
    from weightsmith.cli import _register

    _register()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"weightsmith {__version__}"
    base, _ = _files(tmp_path)
    for flag in ("--out", "--json"):
        out = tmp_path / f"c{flag}.json"
        res = runner.invoke(
            app, ["compare", str(base), str(base), flag, str(out), "--k", "2", "--device", "cpu"]
        )
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["summary"]["k"] == 2


def test_command_table_matches_what_the_modules_register() -> None:
    """``cli.COMMAND_OF`` (the module each command is imported from alone) is complete and right."""
    import importlib

    from weightsmith import cli

    for name in cli.COMMAND_MODULES:
        importlib.import_module(f"weightsmith.cli.{name}")
    found = {c.name: c.callback.__module__.rsplit(".", 1)[-1] for c in app.registered_commands if c.callback}
    found |= {
        g.name: next(c.callback.__module__ for c in g.typer_instance.registered_commands).rsplit(".", 1)[-1]
        for g in app.registered_groups
        if g.typer_instance is not None
    }
    # (a module outside COMMAND_MODULES that another test imported registers on ``app`` too; main() never
    # imports it)
    assert {c: m for c, m in found.items() if m in cli.COMMAND_MODULES} == cli.COMMAND_OF


def test_analyze_imports_no_merge_training_or_transformers(tmp_path: Path) -> None:
    """A ``weightsmith analyze`` process imports only what analysing needs (not merge, SciPy's optimize,
    transformers, training): those cost ~1 s of a fresh process on the GPU machine."""
    import subprocess
    import sys

    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    save_file({"a.weight": W}, tmp_path / "m.safetensors")
    code = (
        "import sys; from weightsmith.cli import main; "
        f"sys.argv = ['weightsmith', 'analyze', r'{tmp_path / 'm.safetensors'}', '--device', 'cpu', "
        f"'--out', r'{tmp_path / 'o.json'}']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "bad = ('weightsmith.merge', 'weightsmith.train', 'weightsmith.compress', 'scipy.optimize', "
        "'transformers')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))"
    )
    env = {"WEIGHTSMITH_PROGRESS": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert json.loads((tmp_path / "o.json").read_text())["matrices"][0]["name"] == "a.weight"


@pytest.mark.parametrize(
    ("argv", "lone"),
    [
        (["analyze", "m", "--device", "cpu"], "analyze"),
        (["--threads", "2", "compare", "a", "b"], "analyze"),
        (["nuclear-norm", "--help"], "analyze"),
        (["--help"], None),
        (["--version", "analyze"], None),
        (["no-such-command"], None),
        ([], None),
    ],
)
def test_one_command_imports_only_its_module(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], lone: str | None
) -> None:
    from weightsmith import cli

    seen: list[str] = []
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: seen.append(name.rsplit(".", 1)[-1]))
    cli._register(argv)
    assert seen == ([lone] if lone else list(cli.COMMAND_MODULES))
