"""Resumable training checkpoints: trainable state (safetensors), optimizer/scheduler/RNG state (weights-only
``torch.save``), and a small JSON of where the run stands, swapped in whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import WeightsmithError
from ..store import atomic_replace

STATE_FILE, OPTIM_FILE, META_FILE = "state.safetensors", "optim.pt", "meta.json"


def save_checkpoint(out: Path, model: nn.Module, keys: list[str], opt: Any, sched: Any, meta: dict) -> None:
    tmp = out / f".checkpoint.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = model.state_dict()
    save_file({k: state[k].detach().cpu().contiguous() for k in keys}, str(tmp / STATE_FILE))
    extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(extra, tmp / OPTIM_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    atomic_replace(tmp, out / "checkpoint")


def load_checkpoint(ckpt: Path, model: nn.Module, keys: list[str], opt: Any, sched: Any) -> dict:
    state = load_file(str(ckpt / STATE_FILE))
    missing = sorted(set(keys) - set(state))
    if missing:
        raise WeightsmithError(
            f"{ckpt}: checkpoint lacks '{missing[0]}' ({len(missing)} tensors); "
            "it was written for another method or model; start again with --force"
        )
    model.load_state_dict(state, strict=False)
    extra = torch.load(ckpt / OPTIM_FILE, weights_only=True, map_location="cpu")
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return dict(json.loads((ckpt / META_FILE).read_text()))
