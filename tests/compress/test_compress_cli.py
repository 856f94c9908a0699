"""``weightsmith compress``: end to end on a tiny saved Llama, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import weightsmith.cli.compress  # noqa: F401  (registers the command)
from weightsmith.cli import main
from weightsmith.cli._app import app
from weightsmith.config import registered

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
        (
            ["--method", "nope"],
            "unknown; known: " + ", ".join(sorted(registered("compress"))),
        ),
        (["--method", "wanda", "--format", "compressed-tensors"], "0.20 no longer decompresses"),
        (["--method", "svd", "--format", "compressed-tensors"], "no layout for low-rank factors"),
        (["--method", "magnitude", "--opt", "n=1", "--opt", "m=3"], "M=3 does not divide the input size 64"),
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


def test_help_lists_every_method():
    res = runner.invoke(app, ["compress", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for name in (
        "rtn",
        "hqq",
        "gptq",
        "awq",
        "magnitude",
        "wanda",
        "sparsegpt",
        "dsnot",
        "svd",
        "fwsvd",
        "asvd",
    ):
        assert name in text, name


def test_cli_wanda_24_dense_loads_in_transformers_half_zero(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w"
    argv = ["compress", str(tiny_dir), "--method", "wanda", "--opt", "n=2", "--opt", "m=4"]
    argv += ["--samples", "4", "--seq-len", "64", "--out", str(out)]
    res = runner.invoke(app, argv, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "14 layers pruned" in text and "50.0 % of the pruned layers' weights are zero" in text
    info = json.loads((out / "compression.json").read_text())
    assert info["format"] == "dense" and info["bits_per_weight"] is None
    assert info["config"]["group_size"] == 0  # the quantisers' default group 128 is not forced on a pruner
    model = AutoModelForCausalLM.from_pretrained(out)
    pruned = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    assert len(pruned) == 14
    for lin in pruned:
        W = lin.weight.detach()
        assert float((W == 0).float().mean()) == 0.5
        assert bool(((W.view(W.shape[0], -1, 4) == 0).sum(-1) == 2).all())
    assert bool((model.lm_head.weight != 0).all())


def test_cli_svd_weightsmith_reloads_smaller_with_same_logits(tiny_dir, tmp_path):
    from weightsmith.compress import compress, load_compressed
    from weightsmith.compress.svd import SVD
    from weightsmith.models import load_model

    out = tmp_path / "s"
    argv = ["compress", str(tiny_dir), "--method", "svd", "--opt", "keep=0.4", "--format", "weightsmith"]
    res = runner.invoke(app, [*argv, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "14 layers factored" in " ".join(res.output.split())
    back = load_compressed(out)
    net, _ = load_model(str(tiny_dir))
    dense = sum(p.numel() for p in net.parameters())
    net, report = compress(net, SVD(keep=0.4))
    assert sum(p.numel() for p in back.parameters()) < dense
    ranks = json.loads((out / "compression.json").read_text())["ranks"]
    assert ranks == {n: w.rank for n, w in report.weights.items()}
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids).logits, net(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
