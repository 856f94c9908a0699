"""The training loop: what trains, checkpoints and resume, NaN early stop, schedules, tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from weightsmith import adapters
from weightsmith.adapters.lora import LoRA
from weightsmith.errors import WeightsmithError
from weightsmith.tasks import Task, get_task
from weightsmith.train import TrainArgs, TrainingDiverged, _schedule, finetune, load_finetuned

TINY = {"max_examples": 16, "eval_examples": 16, "max_len": 24, "batch_size": 8}


def test_lora_trains_only_adapter_and_head(tmp_path, minilm):
    base_encoder, _ = minilm
    r = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "run", max_steps=2, **TINY)
    # LoRA rank 2 on the 36 linear layers of the 6 encoder blocks, plus the 384x2 head
    per_block = 4 * 2 * (384 + 384) + 2 * 2 * (384 + 1536)
    assert r.trainable_params == 6 * per_block + 384 * 2 + 2
    assert r.steps == 2 and len(r.loss_history) == 2 and 0.0 <= r.metric <= 1.0
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "head.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint").exists()
    net, _, task = load_finetuned(tmp_path / "run")
    enc = task.backbone(net)
    base = adapters.base_state_dict(enc)
    ref = base_encoder.state_dict()
    assert set(base) == set(ref) and all(torch.equal(base[k], ref[k]) for k in ref), "base weights changed"
    assert any(float(p.detach().abs().sum()) > 0 for n, p in enc.named_parameters() if n.endswith(".B")), (
        "LoRA B not trained"
    )
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["adapter"]["method"] == "lora" and run["result"]["steps"] == 2


def test_head_only_and_full(tmp_path, minilm):
    base_encoder, _ = minilm
    head = finetune("minilm", "debates", "head", max_steps=2, **TINY)
    assert head.trainable_params == 384 * 3 + 3 and head.method == "head"
    full = finetune("minilm", "debates", "full", out=tmp_path / "full", max_steps=1, **TINY)
    assert full.trainable_params == sum(p.numel() for p in base_encoder.parameters()) + 384 * 3 + 3
    from transformers import AutoModel

    tuned = AutoModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    ref = base_encoder.state_dict()
    assert any(not torch.equal(tuned[k], ref[k]) for k in ref), "full fine-tuning changed no weight"


def _interrupt_after(monkeypatch, calls: int, exc: BaseException) -> None:
    original = Task.loss
    count = {"n": 0}

    def loss(self, model, batch):
        count["n"] += 1
        if count["n"] > calls:
            raise exc
        return original(self, model, batch)

    monkeypatch.setattr(Task, "loss", loss)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(max_steps=4, checkpoint_every=2, seed=3, **TINY)
    whole = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "a", **kw)
    with monkeypatch.context() as m:  # killed during step 3, after the step-2 checkpoint
        _interrupt_after(m, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "b", **kw)
    meta = json.loads((tmp_path / "b" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2
    with pytest.raises(WeightsmithError, match=r"other settings \(args\.seed: 3 -> 4\)"):
        finetune(
            "minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "b", resume=True, **{**kw, "seed": 4}
        )
    resumed = finetune("minilm", "rotten_tomatoes", LoRA(rank=2), out=tmp_path / "b", resume=True, **kw)
    assert resumed.loss_history == whole.loss_history and resumed.metric == whole.metric
    a = load_file(str(tmp_path / "a" / "adapter" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = Task.loss
    count = {"n": 0}

    def loss(self, model, batch):
        count["n"] += 1
        value = original(self, model, batch)
        return value * float("nan") if count["n"] == 3 else value

    monkeypatch.setattr(Task, "loss", loss)
    with pytest.raises(TrainingDiverged, match=r"step 3 .*loss is nan.*step 2\) is kept"):
        finetune(
            "minilm",
            "rotten_tomatoes",
            LoRA(rank=2),
            out=tmp_path / "run",
            max_steps=4,
            checkpoint_every=1,
            **TINY,
        )
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2 and all(math.isfinite(x) for x in meta["loss"])


def test_refuses_existing_output_and_bad_resume(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(WeightsmithError, match="already exists"):
        finetune("minilm", "rotten_tomatoes", "head", out=tmp_path / "run", max_steps=1, **TINY)
    with pytest.raises(WeightsmithError, match="no checkpoint"):
        finetune("minilm", "rotten_tomatoes", "head", out=tmp_path / "run", resume=True, max_steps=1, **TINY)
    with pytest.raises(WeightsmithError, match="unknown task"):
        finetune("minilm", "imdb", "head")
    with pytest.raises(WeightsmithError, match="unknown adapter method 'nosuch'"):
        finetune("minilm", "rotten_tomatoes", "nosuch")


def test_schedule_warmup_then_linear_and_cosine():
    f = _schedule(TrainArgs(warmup=0.2, schedule="linear"), 10)  # 2 warm-up steps
    assert [round(f(s), 6) for s in range(4)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.875]
    assert f(10) == 0.0
    g = _schedule(TrainArgs(warmup=0.0, schedule="cosine"), 4)
    assert [round(g(s), 6) for s in range(5)] == [
        1.0,
        round(0.5 * (1 + math.cos(math.pi / 4)), 6),
        0.5,
        round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6),
        0.0,
    ]


def test_grad_accumulation_counts_optimizer_steps():
    r = finetune("minilm", "rotten_tomatoes", "head", epochs=1, grad_accum=2, **{**TINY, "batch_size": 4})
    assert r.steps == 2  # 16 examples / batch 4 = 4 micro-batches = 2 optimizer steps


def test_tasks_batches_are_seeded_and_lm_split_is_fixed():
    from transformers import AutoTokenizer

    from weightsmith import models

    t = get_task("rotten_tomatoes", max_examples=20, max_len=16)
    t.prepare(AutoTokenizer.from_pretrained(models.resolve("minilm")))
    a = [b["labels"].tolist() for b in t.batches(0, 1, 8)]
    assert a == [b["labels"].tolist() for b in t.batches(0, 1, 8)]
    assert a != [b["labels"].tolist() for b in t.batches(1, 1, 8)]
    assert sorted(sum(a, [])) == sorted(t._labels.tolist())
    lm = get_task("hamlet")
    train, val = lm.lm_texts()
    assert lm.model_spec == "smollm2" and lm.max_len == 128
    assert train.endswith("\n") and 0.89 < len(train) / (len(train) + len(val)) <= 0.9
