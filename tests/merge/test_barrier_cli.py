"""CLI: zoo-train, barrier (--align, --html, --json), align (mlp and bert), signature extract/apply/remove."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import weightsmith.cli.align  # noqa: F401  (registers the commands)
from weightsmith import zoo
from weightsmith.cli._app import app
from weightsmith.store import open_store

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def two_mlps(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    for s in (1, 2):
        _ok(["zoo-train", str(d / f"m{s}.safetensors"), "--seed", str(s), "--width", "32", "--epochs", "1"])
    return d / "m1.safetensors", d / "m2.safetensors"


def test_barrier_cli_writes_json_and_html(two_mlps, tmp_path):
    a, b = two_mlps
    out = _ok(
        [
            "barrier",
            str(a),
            str(b),
            "--align",
            "--points",
            "5",
            "--json",
            str(tmp_path / "c.json"),
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    assert "naive" in out and "aligned" in out
    curves = json.loads((tmp_path / "c.json").read_text())
    assert set(curves) == {"naive", "aligned"} and len(curves["aligned"]["alphas"]) == 5
    assert curves["aligned"]["loss_barrier"] <= curves["naive"]["loss_barrier"]
    assert "data:image/png;base64" in (tmp_path / "r.html").read_text()
    res = runner.invoke(app, ["barrier", str(a), str(b), "--json", str(tmp_path / "c.json")])
    assert res.exit_code != 0 and "already exists" in str(res.exception or res.output)


def test_align_cli_mlp_keeps_function(two_mlps, tmp_path):
    a, b = two_mlps
    _ok(["align", str(a), str(b), "--spec", "mlp", "--out", str(tmp_path / "b2.safetensors")])
    mb = zoo.load(b)
    state = dict(open_store(tmp_path / "b2.safetensors"))
    assert not torch.equal(state["net.0.weight"], mb.net[0].weight)
    mb2 = zoo.load(b)
    mb2.load_state_dict(state)
    x = torch.randn(9, 64)
    with torch.no_grad():
        torch.testing.assert_close(mb2(x), mb(x), rtol=1e-5, atol=1e-5)


def test_align_cli_bert_directory(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=12,
    )
    for s in (0, 1):
        torch.manual_seed(s)
        BertModel(cfg).save_pretrained(tmp_path / f"bert{s}")
    _ok(
        [
            "align",
            str(tmp_path / "bert0"),
            str(tmp_path / "bert1"),
            "--spec",
            "auto",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    m1, m2 = (
        BertModel.from_pretrained(tmp_path / "bert1").eval(),
        BertModel.from_pretrained(tmp_path / "o").eval(),
    )
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).last_hidden_state, m1(ids).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_signature_cli_round_trip_bit_exact(tmp_path):
    torch.manual_seed(0)
    clean = zoo.CNN(8, 2, (4, 6), 8)
    robust = zoo.CNN(8, 2, (4, 6), 8)
    zoo.save(clean, tmp_path / "clean.safetensors")
    zoo.save(robust, tmp_path / "robust.safetensors")
    _ok(
        [
            "signature",
            "extract",
            str(tmp_path / "robust.safetensors"),
            str(tmp_path / "clean.safetensors"),
            "--out",
            str(tmp_path / "sig"),
            "--layers",
            "2",
            "--rank",
            "2",
            "--bits",
            "4",
        ]
    )
    _ok(
        [
            "signature",
            "apply",
            str(tmp_path / "clean.safetensors"),
            str(tmp_path / "sig"),
            "--strength",
            "0.7",
            "--out",
            str(tmp_path / "patched.safetensors"),
        ]
    )
    assert (tmp_path / "patched.safetensors.rws-undo.safetensors").is_file()
    _ok(
        [
            "signature",
            "remove",
            str(tmp_path / "patched.safetensors"),
            str(tmp_path / "sig"),
            "--out",
            str(tmp_path / "back.safetensors"),
        ]
    )
    orig, patched = (
        dict(open_store(tmp_path / "clean.safetensors")),
        dict(open_store(tmp_path / "patched.safetensors")),
    )
    back = dict(open_store(tmp_path / "back.safetensors"))
    assert not torch.equal(patched["conv1.weight"], orig["conv1.weight"])
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_align_output_feeds_barrier_and_zoo_train_takes_out(two_mlps, tmp_path):
    """Issue 7: the aligned model keeps the zoo architecture record, so `barrier` reads it."""
    a, b = two_mlps
    aligned = tmp_path / "b-aligned.safetensors"
    _ok(["align", str(a), str(b), "--out", str(aligned)])
    out = _ok(["barrier", str(a), str(aligned), "--points", "3", "--out", str(tmp_path / "c.json")])
    naive = json.loads((tmp_path / "c.json").read_text())["naive"]
    assert len(naive["alphas"]) == 3 and "naive" in out
    shown = _ok(["barrier", str(a), str(b), "--points", "3", "--json", "-"])
    plain = json.loads(shown[shown.index("{") :])["naive"]
    assert naive["loss_barrier"] < plain["loss_barrier"]  # weight matching lowered the barrier
    _ok(["zoo-train", "--out", str(tmp_path / "z.safetensors"), "--width", "8", "--epochs", "1"])
    assert isinstance(zoo.load(tmp_path / "z.safetensors"), zoo.MLP)
