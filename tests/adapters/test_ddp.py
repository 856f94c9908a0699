"""Data-parallel training under torchrun: two CPU processes (gloo) train one LoRA run together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_two_process_data_parallel_run(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTSMITH_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "weightsmith", "adapt", "minilm", "--method", "lora", "--rank", "2", "--task", "debates",
           "--max-examples", "32", "--eval-examples", "16", "--batch-size", "4", "--max-steps", "3",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["result"]["steps"] == 3
    adapter = load_file(str(out / "adapter" / "adapters.safetensors"))
    lora_b = [v for k, v in adapter.items() if k.endswith("B") or "lora_B" in k or ".B" in k]
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert any(float(v.abs().max()) > 0 for v in lora_b), "the zero-initialised factor must have trained"
