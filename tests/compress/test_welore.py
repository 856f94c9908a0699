"""WeLore: the heavy-tail rank rule worked by hand, the LRC / N-LRC split, LRC fine-tuning in finetune()."""

from __future__ import annotations

import pytest
import torch
from compress_fixtures import calib

from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress._lowrank import LowRankLinear
from weightsmith.compress.welore import (
    WeLore,
    heavy_tail_ranks,
    lrc_parameters,
    lrc_task,
    normalised_spectrum,
    split_lrc,
    welore_threshold,
)
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model
from weightsmith.train.loop import finetune

torch.set_num_threads(1)

# a: σ̃ = [1, .5, .1, 0]; b: σ̃ = [1, 2/3, 1/3, 0]; two 4x12 matrices (dense 48; rank r costs 16 r, so it
# pays off for r < 3)
SPECTRA = {"a": torch.tensor([10.0, 5.0, 1.0, 0.0]), "b": torch.tensor([4.0, 3.0, 2.0, 1.0])}
SHAPES = {"a": (4, 12), "b": (4, 12)}


def test_rank_rule_by_hand():
    want = torch.tensor([1, 0.5, 0.1, 0], dtype=torch.float64)
    torch.testing.assert_close(normalised_spectrum(SPECTRA["a"]), want)
    assert heavy_tail_ranks(SPECTRA, 0.4) == {"a": 2, "b": 2}
    assert heavy_tail_ranks(SPECTRA, 0.05) == {"a": 3, "b": 3}
    assert heavy_tail_ranks(SPECTRA, 2.0) == {"a": 1, "b": 1}  # never below rank 1
    assert split_lrc({"a": 3, "b": 2}, SHAPES, 0.0) == ({"b": 2}, 48 + 32)  # rank 3 stores 48: N-LRC
    # keep 0.5 of 96: τ = 1/3 stores 32 + 48 = 80, τ = 1/2 stores 64, τ = 2/3 stores 16 + 32 = 48: fits
    assert welore_threshold(SPECTRA, SHAPES, 0.5) == pytest.approx(2 / 3)
    # min_ratio 0.5: only rank 1 (a 75 % cut) makes an LRC; τ = 2/3 stores 16 + 48 (b dense) = 64 > 48
    assert welore_threshold(SPECTRA, SHAPES, 0.5, min_ratio=0.5) == pytest.approx(1.0)
    with pytest.raises(WeightsmithError, match="keep=0.3"):
        welore_threshold(SPECTRA, SHAPES, 0.3)  # rank 1 everywhere stores 32 > 28.8


def _heavy_tailed(tiny_dir):
    """The tiny Llama with one matrix made heavy-tailed (rank 3 plus a little noise)."""
    model, tok = load_model(tiny_dir, task="causal-lm")
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        q.copy_(
            torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g)
            + 0.01 * torch.randn(64, 64, generator=g)
        )
    return model, tok


def test_welore_nonuniform_ranks_budget_and_thin_reload(tiny_dir, tmp_path):
    model, tok = _heavy_tailed(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, report = compress(model, WeLore(keep=0.6))
    ranks = {n: w.rank for n, w in report.weights.items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ranks[q] == min(ranks.values()) and ranks[q] <= 4 < max(ranks.values())  # non-uniform
    total = sum(r.shape[0] * r.shape[1] for r in [*report.layers, *report.dense_layers])
    stored = sum(w.params for w in report.weights.values()) + sum(
        r.shape[0] * r.shape[1] for r in report.dense_layers
    )
    assert stored <= 0.6 * total
    for r in report.dense_layers:  # N-LRCs are untouched
        assert torch.equal(dict(model.named_parameters())[r.name], before[r.name])
    assert "low-rank components" in report.config.describe(report)
    ids = torch.cat([b["input_ids"] for b in calib(vocab=len(tok), n=4, length=16)])
    with torch.no_grad():
        want = model(ids).logits
    save_compressed(model, report, tmp_path / "w", tokenizer=tok, format="weightsmith")
    thin = load_compressed(tmp_path / "w")
    assert sum(isinstance(m, LowRankLinear) for m in thin.modules()) == len(report.weights)
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(thin(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_lrc_finetuning_trains_only_the_lrcs(tiny_dir, tmp_path):
    model, tok = _heavy_tailed(tiny_dir)
    model, report = compress(model, WeLore(keep=0.6))
    save_compressed(model, report, tmp_path / "w", tokenizer=tok, format="weightsmith")
    task = lrc_task(str(tmp_path / "w"), "hamlet", max_examples=8, max_len=32, eval_examples=2)
    net, _ = task.build()
    result = finetune(
        task=task, adapter="head", lr=1e-2, batch_size=4, max_steps=3, device="cpu", out=tmp_path / "r"
    )
    assert result.trainable_params == lrc_parameters(net) < result.total_params
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "r" / "head.safetensors"))
    assert len(trained) == 2 * len(report.weights)  # down and up of every LRC, nothing else
    key = "model/layers/0/self_attn/q_proj.down.weight"
    assert not torch.equal(trained[key], net.state_dict()["model.layers.0.self_attn.q_proj.down.weight"])


def test_bad_welore_options(tiny_dir):
    for bad in (
        dict(min_ratio=1.0),
        dict(min_ratio=-0.1),
        dict(rank=3),
        dict(allocation="uniform"),
        dict(keep=0),
    ):
        with pytest.raises(WeightsmithError):
            WeLore(**bad)
    with pytest.raises(WeightsmithError, match="no low-rank components"):
        lrc_task(str(tiny_dir), "hamlet").head(load_model(tiny_dir, task="causal-lm")[0])
