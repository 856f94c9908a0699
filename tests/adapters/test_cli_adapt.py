"""``weightsmith adapt`` / ``weightsmith export`` end to end on tiny settings, checked against PEFT and
transformers loading the outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import weightsmith.cli.adapt  # noqa: F401  (registers adapt on the app)
import weightsmith.cli.export  # noqa: F401  (registers export on the app)
from weightsmith.cli._app import app
from weightsmith.errors import WeightsmithError
from weightsmith.train import load_finetuned

runner = CliRunner()
TINY = ["--task", "rotten_tomatoes", "--max-steps", "2", "--max-examples", "16", "--eval-examples", "16",
        "--max-len", "24", "--batch-size", "8", "--device", "cpu"]  # fmt: skip


def adapt(*args: str):
    return runner.invoke(app, ["adapt", *args])


def _inputs(tok):
    return tok(["a gripping, beautiful film", "dull and far too long"], padding=True, return_tensors="pt")


def _error(result) -> str:
    assert isinstance(result.exception, WeightsmithError), result.output
    return str(result.exception)


@pytest.fixture(scope="module")
def lora_peft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "lora"
    r = adapt(
        "minilm",
        "--method",
        "lora",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--format",
        "peft",
        "--out",
        str(out),
        *TINY,
    )
    assert r.exit_code == 0, r.output
    return out


def test_adapt_writes_peft_that_peft_loads_with_same_outputs(lora_peft_run, minilm_dir):
    from peft import PeftModel
    from transformers import AutoModel

    net, tok, task = load_finetuned(lora_peft_run)
    enc = task.backbone(net)
    x = _inputs(tok)
    with torch.no_grad():
        ours = enc(**x).last_hidden_state
        peft_model = PeftModel.from_pretrained(
            AutoModel.from_pretrained(minilm_dir), lora_peft_run / "adapter"
        ).eval()
        theirs = peft_model(**x).last_hidden_state
        base = AutoModel.from_pretrained(minilm_dir).eval()(**x).last_hidden_state
    assert (ours - base).abs().max() > 1e-5, "the trained adapter changes nothing"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_merged_loads_with_transformers_and_matches(lora_peft_run, tmp_path):
    from transformers import AutoModel

    r = runner.invoke(app, ["export", str(lora_peft_run), "--merged", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    net, tok, task = load_finetuned(lora_peft_run)
    x = _inputs(tok)
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    head = torch.nn.Linear(384, 2)
    head.load_state_dict(load_file(str(tmp_path / "merged" / "head.safetensors")))
    with torch.no_grad():
        h = merged(**x).last_hidden_state
        torch.testing.assert_close(h, task.backbone(net)(**x).last_hidden_state, atol=1e-5, rtol=1e-5)
        m = x["attention_mask"].unsqueeze(-1).float()
        logits = head((h * m).sum(1) / m.sum(1))
        torch.testing.assert_close(logits, net(x["input_ids"], x["attention_mask"]), atol=1e-5, rtol=1e-5)
    again = runner.invoke(app, ["export", str(lora_peft_run), "--merged", str(tmp_path / "merged")])
    assert "already exists" in _error(again)


def test_export_peft_of_non_lowrank_method_reports_svd_error(tmp_path, minilm_dir):
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "sltrain"  # sparse + low-rank: not exactly low-rank, so the export is an SVD
    r = adapt("minilm", "--method", "sltrain", "--lr", "0.01", "--out", str(out), *TINY)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(out), "--peft", str(tmp_path / "peft"), "--rank", "4"])
    assert r.exit_code == 0, r.output
    assert "approximation error: mean" in r.output
    net, tok, task = load_finetuned(out)
    x = _inputs(tok)
    with torch.no_grad():
        ours = task.backbone(net)(**x).last_hidden_state
        base = AutoModel.from_pretrained(minilm_dir).eval()
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**x).last_hidden_state
        plain = AutoModel.from_pretrained(minilm_dir).eval()(**x).last_hidden_state
    # a rank-4 SVD of SLTrain's update: closer to the adapted model than the base model is
    assert (theirs - ours).norm() < (plain - ours).norm()


def test_refuses_existing_out_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    r = adapt("minilm", "--method", "head", "--out", str(out), *TINY)
    assert r.exit_code == 0, r.output
    assert "already exists" in _error(adapt("minilm", "--method", "head", "--out", str(out), *TINY))
    assert adapt("minilm", "--method", "head", "--out", str(out), "--force", *TINY).exit_code == 0
    assert "no checkpoint" in _error(
        adapt("minilm", "--method", "head", "--out", str(out), "--resume", *TINY)
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--method", "lora", "--opt", "ranks=4"], "has no option 'ranks'"),
        (["--method", "lora", "--opt", "rank"], "expected key=value"),
        (["--method", "lora", "--rank", "5000"], "rank 5000"),
        (["--method", "lora", "--targets", "nothing_like_this"], "matches none"),
        (["--method", "full", "--rank", "4"], "takes no --rank"),
        (["--method", "lora", "--task", "imdb"], "unknown task 'imdb'"),
    ],
)
def test_clear_errors(tmp_path, args, expected):
    r = adapt("minilm", *TINY, *args, "--out", str(tmp_path / "x"))
    assert expected in _error(r)


def test_list_methods():
    r = adapt("--list")
    assert r.exit_code == 0, r.output
    for name in ("lora", "full", "head", "vera"):
        assert name in r.output
