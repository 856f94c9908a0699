# ruff: noqa: E501  (the probe table keeps one case per line)
"""Bad-input probes for ``weightsmith adapt``: every option is refused before the model is loaded (exit 2,
a message naming the option, no traceback, nothing written); bad weights and bad outputs are refused naming
the tensor, file or path, and a refused ``--force`` run leaves the old output as it was."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from probes.harness import probe

torch.set_num_threads(1)
TINY = ["--task", "rotten_tomatoes", "--max-steps", "1", "--max-examples", "16", "--eval-examples", "8",
        "--max-len", "16", "--batch-size", "8", "--device", "cpu"]  # fmt: skip
LORA_OPTIONS = ["rank=8", "alpha=16.0", "dropout=0.0", "rslora=False", "init='default'", "seed=0"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Options must be refused before any model is loaded."""
    from weightsmith import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", refuse)


CASES = [
    (["--method", "lora", "--epochs", "0"], ["--epochs", "0"]),
    (["--method", "lora", "--lr", "-1"], ["--lr", "-1"]),
    (["--method", "lora", "--lr", "nan"], ["--lr"]),
    (["--method", "lora", "--head-lr", "0"], ["--head-lr"]),
    (["--method", "lora", "--batch-size", "0"], ["--batch-size"]),
    (["--method", "lora", "--grad-accum", "0"], ["--grad-accum"]),
    (["--method", "lora", "--max-steps", "-1"], ["--max-steps", "-1"]),
    (["--method", "lora", "--checkpoint-every", "0"], ["--checkpoint-every"]),
    (["--method", "lora", "--warmup", "1.5"], ["--warmup"]),
    (["--method", "lora", "--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--method", "lora", "--seed", "-1"], ["--seed"]),
    (["--method", "lora", "--schedule", "steep"], ["--schedule", "steep"]),
    (["--method", "lora", "--device", "tpu"], ["--device", "tpu"]),
    (["--method", "lora", "--device", "cuda:7"], ["--device", "cuda:7"]),
    (["--method", "lora", "--format", "onnx"], ["--format", "onnx"]),
    (["--method", "lora", "--eval-examples", "0"], ["--eval-examples"]),
    (["--method", "lora", "--max-examples", "0"], ["--max-examples"]),
    (["--method", "lora", "--max-len", "2"], ["--max-len"]),
    (["--method", "lora", "--rank", "0"], ["--rank 0", "at least 1"]),
    (["--method", "lora", "--opt", "rank=0"], ["--opt rank=0"]),
    (["--method", "lora", "--opt", "dropout=abc"], ["--opt dropout=abc", "a number", *LORA_OPTIONS]),
    (["--method", "lora", "--opt", "dropout=1.5"], ["--opt dropout=1.5", "[0, 1)"]),
    (["--method", "lora", "--opt", "rslora=maybe"], ["--opt rslora=maybe", "true or false"]),
    (["--method", "lora", "--opt", "init=other"], ["--method lora", "init", *LORA_OPTIONS]),
    (["--method", "lora", "--opt", "nosuch=1"], ["nosuch", *LORA_OPTIONS]),
    (["--method", "lora", "--opt", "rank"], ["--opt 'rank'", "key=value"]),
    (["--method", "vera", "--alpha", "2"], ["--alpha 2.0", "no option 'alpha'"]),
    (["--method", "nosuch"], ["unknown method 'nosuch'", "lora"]),
    (["--method", "full", "--rank", "4"], ["--method full", "--rank"]),
    (["--method", "lora", "--task", "imdb"], ["unknown task 'imdb'"]),
    (["--method", "lora", "--resume", "--force"], ["--resume", "--force"]),
    (["--method", "lora", "--resume"], ["--resume", "does not exist"]),
]


@pytest.mark.parametrize(("args", "names"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_option_is_refused_before_loading(tmp_path, no_model_loading, args, names):
    out = tmp_path / "out"
    probe(["adapt", "minilm", *TINY, *args, "--out", str(out)], names=names, out=out)


def test_missing_model_is_named(tmp_path, no_model_loading):
    out = tmp_path / "out"
    probe(
        ["adapt", str(tmp_path / "nowhere"), "--method", "lora", *TINY, "--out", str(out)],
        names=["nowhere"],
        out=out,
    )


def test_existing_outputs_are_refused_and_left_alone(tmp_path, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("do not touch")
    probe(
        ["adapt", "minilm", "--method", "lora", *TINY, "--out", str(out)],
        names=[str(out), "--force"],
        out=out,
    )
    file_out = tmp_path / "a-file"
    file_out.write_text("a file")
    probe(
        ["adapt", "minilm", "--method", "lora", *TINY, "--out", str(file_out), "--force"],
        names=[str(file_out), "is a file"],
        out=file_out,
    )
    probe(
        ["adapt", "minilm", "--method", "lora", *TINY, "--out", str(out), "--resume"],
        names=[str(out), "no checkpoint"],
        out=out,
    )


def test_resume_of_a_finished_run_says_so(tmp_path, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    probe(
        ["adapt", "minilm", "--method", "head", *TINY, "--out", str(out), "--resume"],
        names=["finished run"],
        out=out,
    )


def test_nan_weights_name_the_tensor_and_file(tmp_path, minilm_dir):
    model = tmp_path / "poisoned"
    model.mkdir()
    for f in minilm_dir.iterdir():
        if f.name != "model.safetensors":
            os.symlink(f, model / f.name)
    shutil.copyfile(minilm_dir / "model.safetensors", model / "model.safetensors")
    with open(model / "model.safetensors", "r+b") as fh:  # write NaN and Inf into one tensor's bytes
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        name = next(k for k in header if k.endswith("layer.2.attention.self.value.weight"))
        assert header[name]["dtype"] == "F32"
        start, cols = 8 + n + header[name]["data_offsets"][0], header[name]["shape"][1]
        for index, value in ((3 * cols + 5, float("nan")), (0, float("inf"))):
            fh.seek(start + 4 * index)
            fh.write(struct.pack("<f", value))
    out = tmp_path / "out"
    probe(
        ["adapt", str(model), "--method", "lora", *TINY, "--out", str(out)],
        names=[name.removeprefix("bert."), str(model / "model.safetensors"), "2 NaN/Inf"],
        out=out,
        watch=[model],
    )


def test_refused_force_run_leaves_the_old_output(tmp_path):
    """A run that fails after loading (no target matches) with --force over a finished output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"old": True}))
    probe(
        [
            "adapt",
            "minilm",
            "--method",
            "lora",
            *TINY,
            "--targets",
            "nothing_like_this",
            "--out",
            str(out),
            "--force",
        ],
        names=["nothing_like_this"],
        out=out,
    )


def test_list_is_plain_text():
    from probes.harness import run_cli

    res = run_cli(["adapt", "--list"])
    assert res.exit_code == 0, res.output
    for bad in ("[bold", "[/", "┃", "│", "``", "\x1b["):
        assert bad not in res.output, f"raw markup or box drawing {bad!r} in --list output"
    lines = res.output.splitlines()
    assert any(line.startswith("lora: ") for line in lines) and any(
        line.startswith("full: ") for line in lines
    )
    assert any("rank=8, alpha=16.0" in line for line in lines)
    assert not any(line.startswith("eva: EVA(") for line in lines), (
        "a generated dataclass signature as description"
    )


def test_probe_inputs_exist(minilm_dir):
    assert Path(minilm_dir, "model.safetensors").is_file()
