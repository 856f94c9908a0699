"""Where a run writes: --force never loses the finished run, a new --out appears only at the first
checkpoint, interrupts (Ctrl-C, SIGTERM) leave no hidden debris, diverging runs say where their
checkpoint is."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from weightsmith import staging
from weightsmith.errors import WeightsmithError
from weightsmith.tasks import Task
from weightsmith.train import TrainingDiverged, finetune

torch.set_num_threads(1)
TINY = {"max_examples": 16, "eval_examples": 8, "max_len": 16, "batch_size": 8}
ROOT = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) with a hash of each file."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[str(Path(dirpath, n).relative_to(root))] = "dir"
        for n in filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hidden(root: Path) -> list[str]:
    return sorted(k for k in tree(root) if any(part.startswith(".") for part in Path(k).parts))


def _fail_in_loss(monkeypatch, after: int, exc: BaseException | None = None, action=None) -> None:
    """Make the ``after + 1``-th loss computation raise ``exc`` (or run ``action``)."""
    original = Task.loss
    count = {"n": 0}

    def loss(self, model, batch):
        count["n"] += 1
        if count["n"] == after + 1:
            if action is not None:
                action()
            if exc is not None:
                raise exc
        return original(self, model, batch)

    monkeypatch.setattr(Task, "loss", loss)


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    finetune("minilm", "rotten_tomatoes", "head", out=out, max_steps=1, **TINY)
    assert (out / "run.json").is_file() and not (out / "checkpoint").exists()
    return out


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "diverged"])
def test_force_keeps_the_finished_run_until_the_new_one_completes(finished, monkeypatch, how):
    before = tree(finished.parent)
    kw = dict(out=finished, force=True, max_steps=6, checkpoint_every=1, seed=5, **TINY)
    with monkeypatch.context() as m:
        staged = {}

        def look():  # the new run works beside the old output, its checkpoints inside the staging
            staged["dirs"] = [p.name for p in finished.parent.iterdir() if staging.STAGING in p.name]
            staged["ckpt"] = any((finished.parent / d / "checkpoint").is_dir() for d in staged["dirs"])
            assert tree(finished.parent).items() >= before.items()

        if how == "ctrl-c":
            _fail_in_loss(m, 3, KeyboardInterrupt(), look)
            expected: type[BaseException] = KeyboardInterrupt
        elif how == "sigterm":  # what the CLI's SIGTERM handler does: remove every staging, then exit 143
            _fail_in_loss(m, 3, None, lambda: (look(), staging._on_terminate(signal.SIGTERM, None)))
            expected = SystemExit
        else:
            _fail_in_loss(m, 3, None, look)
            counting = Task.loss
            m.setattr(
                Task,
                "loss",
                lambda self, model, b: counting(self, model, b) * (float("nan") if staged else 1),
            )
            expected = TrainingDiverged
        with pytest.raises(expected) as info:
            finetune("minilm", "rotten_tomatoes", "head", **kw)
    if how == "diverged":
        assert "previous output" in str(info.value) and "unchanged" in str(info.value)
    else:
        assert staged["dirs"] and staged["ckpt"], "the new run did not work in a staging directory"
    assert tree(finished.parent) == before, "the finished run was touched or debris was left"


def test_force_swaps_in_the_new_run_when_complete(finished):
    old = json.loads((finished / "run.json").read_text())
    finetune("minilm", "rotten_tomatoes", "head", out=finished, force=True, max_steps=2, seed=7, **TINY)
    new = json.loads((finished / "run.json").read_text())
    assert old["args"]["seed"] == 0 and new["args"]["seed"] == 7 and new["result"]["steps"] == 2
    assert hidden(finished.parent) == [] and not (finished / "checkpoint").exists()


def test_new_out_appears_only_at_the_first_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "run"
    kw = dict(out=out, max_steps=4, checkpoint_every=2, **TINY)
    with monkeypatch.context() as m:  # killed before the first checkpoint: nothing on disk, rerun not blocked
        _fail_in_loss(m, 1, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            finetune("minilm", "rotten_tomatoes", "head", **kw)
    assert not out.exists() and hidden(tmp_path) == []
    with monkeypatch.context() as m:  # killed after it: OUT holds the checkpoint only
        _fail_in_loss(m, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            finetune("minilm", "rotten_tomatoes", "head", **kw)
    assert sorted(tree(out)) == [
        "checkpoint",
        "checkpoint/meta.json",
        "checkpoint/optim.pt",
        "checkpoint/state.safetensors",
    ]
    with pytest.raises(WeightsmithError, match=r"unfinished run \(step 2\); pass --resume"):
        finetune("minilm", "rotten_tomatoes", "head", **kw)
    r = finetune("minilm", "rotten_tomatoes", "head", resume=True, **kw)
    assert r.steps == 4 and sorted(p.name for p in out.iterdir()) == ["head.safetensors", "run.json"]
    assert hidden(tmp_path) == []
    with pytest.raises(WeightsmithError, match="no checkpoint to resume from .it is a finished run"):
        finetune("minilm", "rotten_tomatoes", "head", resume=True, **kw)


def test_diverged_run_says_where_its_checkpoint_is(tmp_path, monkeypatch):
    original = Task.loss
    count = {"n": 0}

    def loss(self, model, batch):
        count["n"] += 1
        return original(self, model, batch) * (float("inf") if count["n"] == 3 else 1.0)

    monkeypatch.setattr(Task, "loss", loss)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        finetune("minilm", "rotten_tomatoes", "head", out=out, max_steps=4, checkpoint_every=1, **TINY)
    assert f"({out / 'checkpoint'}, step 2) is kept" in str(info.value) and "loss is inf" in str(info.value)
    count["n"] = 2  # the next loss is the poisoned one: no checkpoint yet
    with pytest.raises(TrainingDiverged, match="no checkpoint had been written yet, so nothing was written"):
        finetune("minilm", "rotten_tomatoes", "head", out=tmp_path / "other", max_steps=4, **TINY)
    assert not (tmp_path / "other").exists() and hidden(tmp_path) == []


def test_an_out_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def someone_else():
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")

    _fail_in_loss(monkeypatch, 0, None, someone_else)  # during step 1, before our first checkpoint
    with pytest.raises(WeightsmithError, match="created or changed by someone else"):
        finetune("minilm", "rotten_tomatoes", "head", out=out, max_steps=2, checkpoint_every=1, **TINY)
    assert tree(out) == {"theirs.txt": hashlib.sha256(b"keep me").hexdigest()} and hidden(tmp_path) == []


def test_real_sigterm_leaves_only_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WEIGHTSMITH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    args = ["adapt", "minilm", "--method", "head", "--task", "rotten_tomatoes", "--out", str(out),
            "--device", "cpu", "--max-steps", "100000", "--checkpoint-every", "1", "--max-examples", "16",
            "--eval-examples", "8", "--max-len", "16", "--batch-size", "8"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint" / "meta.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert hidden(tmp_path) == [] and sorted(tree(out)) == [
        "checkpoint",
        "checkpoint/meta.json",
        "checkpoint/optim.pt",
        "checkpoint/state.safetensors",
    ]
