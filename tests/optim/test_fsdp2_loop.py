"""FSDP2 in the training loop: two gloo processes on CPU train MiniLM with ``parallel="fsdp2"`` (full weights
with GaLore, and a LoRA adapter); a run interrupted after its step-2 checkpoint and resumed equals the
uninterrupted one bit for bit; the checkpoint holds full (gathered) tensors; FSDP2 without a process group is
refused before anything is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_layerwise_ddp import _spawn  # two gloo processes, one retry when a worker dies by a signal
from typer.testing import CliRunner

from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)

KW = dict(max_examples=16, eval_examples=8, max_len=16, batch_size=4, device="cpu", max_steps=3,
          checkpoint_every=1, seed=3, lr=1e-3, parallel="fsdp2")  # fmt: skip


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), WEIGHTSMITH_PROGRESS="0", HF_HUB_OFFLINE="1")  # fmt: skip
    torch.set_num_threads(1)
    from weightsmith.optim.configs import GaLore
    from weightsmith.tasks import Task
    from weightsmith.train import finetune

    root = Path(out)
    galore = GaLore(rank=4, update_proj_gap=2, projector="rsvd").create
    try:
        whole = finetune("minilm", "rotten_tomatoes", "full", out=root / "a", optimizer=galore, **KW)
        original, count = Task.loss, {"n": 0}

        def loss(self, model, batch):  # both processes stop at the same call: no collective is left open
            count["n"] += 1
            if count["n"] > 2:
                raise KeyboardInterrupt
            return original(self, model, batch)

        Task.loss = loss  # type: ignore[method-assign]
        try:
            finetune("minilm", "rotten_tomatoes", "full", out=root / "b", optimizer=galore, **KW)
        except KeyboardInterrupt:
            pass
        finally:
            Task.loss = original  # type: ignore[method-assign]
        step = json.loads((root / "b" / "checkpoint" / "meta.json").read_text())["step"]
        ckpt_types = {
            type(v).__name__ for v in load_file(str(root / "b" / "checkpoint" / "state.safetensors")).values()
        }
        resumed = finetune("minilm", "rotten_tomatoes", "full", out=root / "b", optimizer=galore, resume=True,
                           **KW)  # fmt: skip
        lora = finetune("minilm", "rotten_tomatoes", "lora", out=root / "lora", **{**KW, "lr": 5e-3})
        if rank == 0:
            torch.save({"whole": whole.loss_history, "resumed": resumed.loss_history, "step": step,
                        "metrics": [whole.metric, resumed.metric], "lora": lora.loss_history,
                        "ckpt_types": sorted(ckpt_types)}, root / "result.pt")  # fmt: skip
    finally:
        dist.barrier()  # no rank tears down gloo while its peer still uses the connection
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fsdp2_train_resume_and_adapter(tmp_path, minilm):
    _spawn(_worker, str(tmp_path))
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["step"] == 2
    assert got["ckpt_types"] == ["Tensor"]  # gathered: full tensors, not shards
    assert (
        len(got["whole"]) == 3 and got["resumed"] == got["whole"] and got["metrics"][0] == got["metrics"][1]
    )
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = minilm[0].state_dict()
    q = "encoder.layer.0.attention.self.query.weight"
    assert a[q].shape == base[q].shape and not torch.equal(a[q], base[q])  # whole, trained weights
    assert all(torch.isfinite(v).all() for v in a.values())
    adapter = load_file(str(tmp_path / "lora" / "adapter" / "adapters.safetensors"))
    assert adapter and len(got["lora"]) == 3
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "B" in k.split(".")[-1])


def test_fsdp2_without_process_group_is_refused(tmp_path):
    import weightsmith.cli.train  # noqa: F401  (registers train on the app)
    from weightsmith.cli._app import app

    r = CliRunner().invoke(app, ["train", "minilm", "--task", "rotten_tomatoes", "--parallel", "fsdp2",
                                 "--device", "cpu", "--out", str(tmp_path / "o")])  # fmt: skip
    assert isinstance(r.exception, WeightsmithError), r.output
    assert "--parallel fsdp2" in str(r.exception) and "torchrun" in str(r.exception)
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["train", "minilm", "--task", "rotten_tomatoes", "--parallel", "zero3",
                                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert isinstance(r.exception, WeightsmithError) and "--parallel must be ddp or fsdp2" in str(r.exception)
