"""``weightsmith compress``: end to end on a tiny saved Llama, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import weightsmith.cli.compress  # noqa: F401  (registers the command)
from weightsmith.cli import main
from weightsmith.cli._app import app

runner = CliRunner()


def _run(args: list[str]):
    import sys

    old = sys.argv
    sys.argv = ["weightsmith", *args]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


def test_cli_gptq_writes_a_loadable_model(tiny_dir, tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(
        app,
        [
            "compress",
            str(tiny_dir),
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "14 layers quantised" in res.output
    info = json.loads((out / "compression.json").read_text())
    assert info["config"]["method"] == "gptq" and info["format"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    from weightsmith.compress import load_compressed

    assert load_compressed(out) is not None


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "9"], "2 to 8 bits"),
        (["--group-size", "48"], "group sizes that divide every layer: 32, 64, 0"),
        (["--method", "nope"], "unknown; known: awq, gptq, hqq, rtn"),
        (["--format", "gguf"], "--format gguf: unknown"),
        (["--opt", "damp"], "expected key=value"),
        (["--opt", "dmp=0.1"], "has no option 'dmp'"),
        (["--samples", "100000"], "too little text"),
        (["--calib", "/nonexistent.txt"], "not a text file"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    # a repeated option takes its last value, so ``args`` override the defaults given first
    argv = [
        "compress",
        str(tiny_dir),
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--seq-len",
        "32",
        "--out",
        str(out),
        *args,
    ]
    assert _run(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output_without_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    assert _run(["compress", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
