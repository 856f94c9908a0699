"""Run folders: what a finished fine-tune writes, how it is loaded back, and its exports (merged HF, PEFT)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import WeightsmithError
from ..store import atomic_replace, atomic_write_text, prepare_output
from ..tasks import Task, get_task

FULL, HEAD = "full", "head"


def write_outputs(out: Path, t: Task, model: nn.Module, tok: Any, method: str, fmt: str, run: dict) -> None:
    model.eval()
    backbone, head = t.backbone(model), t.head(model)
    if method == FULL:
        tmp = out / f".model.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        backbone.save_pretrained(tmp)  # type: ignore[operator]
        tok.save_pretrained(tmp)
        atomic_replace(tmp, out / "model")
    elif method != HEAD:
        from .. import adapters

        if fmt == "peft":
            adapters.to_peft(backbone, out / "adapter")
        else:
            adapters.save_adapters(backbone, out / "adapter", force=True)
    if head is not None:
        tmp_head = out / f".head.partial-{os.getpid()}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp_head))
        os.replace(tmp_head, out / "head.safetensors")
    atomic_write_text(out / "run.json", json.dumps(run, indent=2))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)


def load_finetuned(out: str | os.PathLike[str], device: str = "cpu") -> tuple[nn.Module, Any, Task]:
    """Rebuild ``(model, tokenizer, task)`` from a finished ``finetune`` output directory (adapters
    attached, not merged)."""
    out = Path(out)
    run_file = out / "run.json"
    if not run_file.is_file():
        raise WeightsmithError(f"{out}: not a finished weightsmith adapt output (run.json missing)")
    run = json.loads(run_file.read_text())
    t = get_task(run["task"], run["model"], run["max_examples"], run["max_len"], run["eval_examples"])
    method = run["adapter"]["method"]
    if method == FULL:
        t = dataclasses.replace(t, model_spec=str(out / "model"))
    net, tok = t.build()
    backbone = t.backbone(net)
    if method not in (FULL, HEAD):
        from .. import adapters

        if run["format"] == "peft":
            adapters.from_peft(backbone, out / "adapter")
        else:
            adapters.load_adapters(backbone, out / "adapter")
    head = t.head(net)
    if head is not None:
        head.load_state_dict(load_file(str(out / "head.safetensors")))
    return net.to(device).eval(), tok, t


def export_run_merged(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False
) -> Path:
    """Write a finished run's backbone with its adapter merged as a Hugging Face model directory
    (``AutoModel``/``AutoModelForCausalLM.from_pretrained`` loads it), plus the tokenizer and, for
    classification, ``head.safetensors`` and ``run.json``."""
    final = prepare_output(out, force)
    net, tok, t = load_finetuned(run_dir)
    backbone = t.backbone(net)
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if any(True for _ in _adapted(backbone)):
            from .. import adapters

            adapters.export_merged(backbone, staging)
        else:
            backbone.save_pretrained(staging)  # type: ignore[operator]
        tok.save_pretrained(staging)
        src = Path(run_dir)
        for name in ("head.safetensors", "run.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_replace(staging, final)
    return final


def export_run_peft(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], rank: int | None = None, force: bool = False
) -> dict[str, float]:
    """Write a finished run's adapter as a PEFT LoRA directory. LoRA/DoRA (and exactly low-rank
    adapters) convert exactly; other methods via the truncated SVD of their update (``rank``, default
    16). Returns the relative Frobenius error of each weight's update."""
    net, _, t = load_finetuned(run_dir)
    backbone = t.backbone(net)
    if not any(True for _ in _adapted(backbone)):
        method = json.loads((Path(run_dir) / "run.json").read_text())["adapter"]["method"]
        raise WeightsmithError(f"{run_dir}: a '{method}' run has no adapter to write as PEFT; use --merged")
    from .. import adapters

    return dict(adapters.to_peft(backbone, out, rank=rank, force=force))


def _adapted(model: nn.Module) -> Iterator[Any]:
    from .. import adapters

    return adapters.adapted_layers(model)
