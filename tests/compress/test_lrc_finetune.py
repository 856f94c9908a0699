"""WeLore's LRC fine-tuning end to end: a ``--format weightsmith`` low-rank directory in, only the LRC
factors trained, a directory out that ``load_compressed`` and ``load_model`` read."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress._lowrank import LowRankLinear
from weightsmith.compress.welore import WeLore, finetune_lrc
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def welore_dir(tiny_dir, tmp_path_factory):
    model, tok = load_model(tiny_dir, task="causal-lm")
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():  # one heavy-tailed matrix (rank 3 plus noise), so WeLore makes LRCs and N-LRCs
        g = torch.Generator().manual_seed(0)
        q.copy_(
            torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g)
            + 0.01 * torch.randn(64, 64, generator=g)
        )
    model, report = compress(model, WeLore(keep=0.8, min_ratio=0.5))  # 9 LRCs, 5 N-LRCs
    out = tmp_path_factory.mktemp("welore") / "w"
    save_compressed(model, report, out, tokenizer=tok, format="weightsmith")
    return out, set(report.weights), {r.name for r in report.dense_layers}


def test_only_the_lrc_factors_change_and_the_output_reloads(welore_dir, tmp_path):
    src, lrcs, dense = welore_dir
    result = finetune_lrc(
        str(src), "hamlet", tmp_path / "ft", max_examples=8, max_len=32, eval_examples=2,
        lr=1e-2, batch_size=4, max_steps=2, device="cpu",
    )  # fmt: skip
    before, after = load_compressed(src), load_compressed(tmp_path / "ft")
    thin = [n for n, m in after.named_modules() if isinstance(m, LowRankLinear)]
    assert len(thin) == len(lrcs) and dense and result.method == "lrc"
    assert result.trainable_params == sum(
        p.numel() for n, p in after.named_parameters() if n.endswith((".down.weight", ".up.weight"))
    )
    b, a = before.state_dict(), after.state_dict()
    assert set(a) == set(b) and sum(p.numel() for p in after.parameters()) == sum(
        p.numel() for p in before.parameters()
    )
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith((".down.weight", ".up.weight")) for k in changed)
    assert all(torch.equal(a[n], b[n]) for n in dense)  # N-LRCs frozen
    info = json.loads((tmp_path / "ft" / "compression.json").read_text())
    assert (
        info["lrc_finetune"]["task"] == "hamlet"
        and info["ranks"] == json.loads((src / "compression.json").read_text())["ranks"]
    )
    # the output is a model again for every task (adapt, train, evaluate): load_model reads it thinned
    net, _ = load_model(tmp_path / "ft", task="causal-lm")
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, after(ids).logits)


def test_what_lrc_finetuning_refuses(welore_dir, tiny_dir, tmp_path):
    src, _, _ = welore_dir
    with pytest.raises(WeightsmithError, match="holds no low-rank components"):
        finetune_lrc(str(tiny_dir), "hamlet", tmp_path / "a", max_steps=1)
    with pytest.raises(WeightsmithError, match="--resume"):
        finetune_lrc(str(src), "hamlet", tmp_path / "b", resume=True)
    with pytest.raises(WeightsmithError, match="--checkpoint-every"):
        finetune_lrc(str(src), "hamlet", tmp_path / "c", checkpoint_every=1)
    with pytest.raises(WeightsmithError, match="no classification head"):
        load_model(src, task="classification")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_adapt_method_lrc_from_the_cli(welore_dir, tmp_path):
    from typer.testing import CliRunner

    from weightsmith.cli import _register
    from weightsmith.cli._app import app

    _register(["adapt"])

    src, lrcs, _ = welore_dir
    out = tmp_path / "cli"
    args = ["adapt", str(src), "--method", "lrc", "--task", "hamlet", "--out", str(out)]
    args += ["--max-steps", "1", "--max-examples", "8", "--max-len", "32", "--eval-examples", "2"]
    args += ["--batch-size", "4"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    thin = [m for m in load_compressed(out).modules() if isinstance(m, LowRankLinear)]
    assert len(thin) == len(lrcs)
    bad = CliRunner().invoke(app, [*args[:6], "--out", str(tmp_path / "bad"), "--targets", "q_proj"])
    assert isinstance(bad.exception, WeightsmithError)  # main() turns it into exit 2
    assert "--method lrc takes no --targets" in str(bad.exception)
    assert not (tmp_path / "bad").exists()


def test_full_finetuning_of_a_factored_directory_is_refused(welore_dir, tmp_path):
    from weightsmith.train import finetune

    src, _, _ = welore_dir
    with pytest.raises(WeightsmithError, match="use --method lrc"):
        finetune(str(src), "hamlet", "full", out=tmp_path / "full", max_steps=1)
    assert not (tmp_path / "full").exists()
