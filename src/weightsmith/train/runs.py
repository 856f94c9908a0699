"""Run folders: what a finished fine-tune writes, how it is loaded back, and its exports (merged HF, PEFT).

A run folder ``OUT`` holds ``run.json``, the adapter in ``OUT/adapter/`` (weightsmith's own files, or a
PEFT adapter folder with ``--format peft``), ``OUT/model/`` for full fine-tuning and ``head.safetensors``
for classification. ``export`` also takes any PEFT adapter folder with the base model it was made for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import staging
from ..errors import WeightsmithError
from ..tasks import Task, get_task

FULL, HEAD = "full", "head"


def write_outputs(out: Path, t: Task, model: nn.Module, tok: Any, method: str, fmt: str, run: dict) -> None:
    model.eval()
    backbone, head = t.backbone(model), t.head(model)
    if method == FULL:
        with staging.staged_dir(out / "model", force=True) as tmp:
            backbone.save_pretrained(tmp)  # type: ignore[operator]
            tok.save_pretrained(tmp)
    elif method != HEAD:
        from .. import adapters

        if fmt == "peft":
            adapters.to_peft(backbone, out / "adapter", force=True)
        else:
            adapters.save_adapters(backbone, out / "adapter", force=True)
    if head is not None:
        with staging.staged_file(out / "head.safetensors", force=True) as tmp_head:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp_head))
    staging.write_text(out / "run.json", json.dumps(run, indent=2))
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
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    classifier: bool = False,
) -> Path:
    """Write a finished run with its adapter merged as a Hugging Face model directory.

    Language-model runs load with ``AutoModelForCausalLM``. A classification run is written as its
    encoder alone (``AutoModel``; the same tensors as the base checkpoint, so it merges with it in weight
    space) or, with ``classifier=True`` (what ``weightsmith export --merged`` does), as
    ``AutoModelForSequenceClassification`` with the trained head (``classifier.*``, ``num_labels``,
    ``id2label``); note that such a class pools the encoder its own way (BERT: the [CLS] token through
    the pooler), while the run trained its head on mean-pooled states: the exact model is the one
    :func:`load_finetuned` builds; ``head.safetensors`` is copied for it (``run.json`` is not: the
    directory is a model, not a run)."""
    staging.check_output(out, force, directory=True)
    net, tok, t = load_finetuned(run_dir)
    backbone, head = t.backbone(net), t.head(net)
    from .. import adapters
    from ..adapters._peft import merged_state_dict

    state = merged_state_dict(backbone) if _has_adapters(backbone) else dict(backbone.state_dict())
    config_json = None
    if head is not None and classifier:
        state, config_json = _sequence_classification(backbone, head, state, list(t.dataset.classes))
    src = Path(run_dir)

    def extra(tmp: Path) -> None:
        tok.save_pretrained(tmp)
        if (src / "head.safetensors").is_file():  # the head as the run used it (on mean-pooled states)
            (tmp / "head.safetensors").write_bytes((src / "head.safetensors").read_bytes())

    return adapters.export_merged(
        backbone, out, force=force, extra=extra, state=state, config_json=config_json
    )


def _sequence_classification(
    backbone: nn.Module, head: nn.Module, state: dict[str, torch.Tensor], labels: list[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict and config.json of ``AutoModelForSequenceClassification`` for this encoder with
    ``head`` (a Linear) as its classifier; refuses when that class's head is not one Linear layer."""
    from transformers import AutoModelForSequenceClassification

    config = copy_config(backbone)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    with torch.device("meta"):
        hf = AutoModelForSequenceClassification.from_config(config)
    config.architectures = [type(hf).__name__]
    # The encoder keeps the base checkpoint's own names (transformers adds the base-model prefix when
    # loading), so weight-space tools can still compare and merge it with the base.
    prefix = hf.base_model_prefix
    wanted = {k.removeprefix(prefix + "."): t for k, t in hf.state_dict().items()}
    out = {k: v for k, v in state.items() if k in wanted}
    params = {n for n, _ in backbone.named_parameters()}
    dropped = [k for k in state if k not in wanted and k in params]
    if dropped:
        raise WeightsmithError(f"{type(hf).__name__} has no place for the encoder's weight '{dropped[0]}'")
    head_keys = sorted(k for k in hf.state_dict() if not k.startswith(prefix + "."))
    head_state = head.state_dict()
    names = {k.rpartition(".")[0] for k in head_keys}
    if len(names) != 1 or {k.rpartition(".")[2] for k in head_keys} != set(head_state):
        raise WeightsmithError(
            f"{type(hf).__name__}'s head ({', '.join(head_keys)}) is not one linear layer; the run's head "
            "cannot be written under its names (use --peft, or weightsmith.train.load_finetuned)"
        )
    module = names.pop()
    for k, v in head_state.items():
        if tuple(wanted[f"{module}.{k}"].shape) != tuple(v.shape):
            want = tuple(wanted[f"{module}.{k}"].shape)
            raise WeightsmithError(
                f"the run's head '{k}' has shape {tuple(v.shape)}; {type(hf).__name__} wants {want}"
            )
        out[f"{module}.{k}"] = v.detach()
    missing = [k for k in wanted if k not in out]
    if missing:
        raise WeightsmithError(
            f"the encoder has no '{missing[0]}', which {type(hf).__name__} needs ({len(missing)} missing); "
            "the merged model would load with untrained weights"
        )
    return out, config.to_json_string()


def copy_config(model: nn.Module) -> Any:
    import copy

    return copy.deepcopy(model.config)  # type: ignore[union-attr]


def export_peft_merged(
    peft_path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
) -> Path:
    """Load ``base`` with the head the PEFT folder's ``task_type`` implies, import the folder whole
    (``from_peft``) and write the merged Hugging Face model with the base's tokenizer."""
    from .. import adapters
    from ..adapters._peft import read_peft

    staging.check_output(out, force, directory=True)
    model, tok = _base_for(read_peft(peft_path), base)
    adapters.from_peft(model, peft_path)
    return adapters.export_merged(model, out, force=force, extra=lambda tmp: tok.save_pretrained(tmp))


def export_peft_as_peft(
    peft_path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Rewrite a PEFT folder through weightsmith (e.g. VeRA or RandLoRA as plain PEFT LoRA). Refuses
    folders carrying full model tensors (modules_to_save, trained biases), which an adapter cannot hold."""
    from .. import adapters
    from ..adapters._attach import _candidates
    from ..adapters._peft import read_peft, split_tensors

    staging.check_output(out, force, directory=True)
    folder = read_peft(peft_path)
    model, _ = _base_for(folder, base)
    layers = {w[: -len(".weight")] for w, _, _ in _candidates(model)}
    parts = split_tensors(folder, lambda module, suffix: module in layers)
    biases = [f"{m}.lora_B.bias" for m, state in parts.modules.items() if "lora_B.bias" in state]
    if parts.base or biases:
        key = next(iter(parts.source[k] for k in parts.base)) if parts.base else parts.source[biases[0]]
        raise WeightsmithError(
            f"{folder.weights}: '{key}' is a full model tensor or a bias (modules_to_save, bias=all, "
            "lora_bias); --peft rewrites the adapter only and would drop it: use --merged"
        )
    adapters.from_peft(model, peft_path)
    return dict(adapters.to_peft(model, out, rank=rank, force=force))


def _base_for(folder: Any, base: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    from .. import models

    task = folder.config.get("task_type")
    if task == "SEQ_CLS":
        heads = [t for k, t in folder.tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        heads += [t for k, t in folder.tensors.items() if k.endswith(("out_proj.weight",))]
        if not heads:
            raise WeightsmithError(
                f"{folder.path}: a SEQ_CLS adapter without its classifier (modules_to_save); "
                "the head would be untrained"
            )
        return models.load_model(base, task="classification", num_labels=int(heads[0].shape[0]))
    if task in ("CAUSAL_LM",):
        return models.load_model(base, task="causal-lm")
    if task in (None, "FEATURE_EXTRACTION"):
        return models.load_model(base, task="auto")
    raise WeightsmithError(
        f"{folder.path / 'adapter_config.json'}: task_type {task!r} is not supported by export"
    )


def export_run_peft(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], rank: int | None = None, force: bool = False
) -> dict[str, float]:
    """Write a finished run's adapter as a PEFT LoRA directory. LoRA/DoRA (and exactly low-rank
    adapters) convert exactly; other methods via the truncated SVD of their update (``rank``, default
    16). Returns the relative Frobenius error of each weight's update."""
    net, _, t = load_finetuned(run_dir)
    backbone = t.backbone(net)
    if not _has_adapters(backbone):
        method = json.loads((Path(run_dir) / "run.json").read_text())["adapter"]["method"]
        raise WeightsmithError(f"{run_dir}: a '{method}' run has no adapter to write as PEFT; use --merged")
    from .. import adapters

    return dict(adapters.to_peft(backbone, out, rank=rank, force=force))


def _has_adapters(model: nn.Module) -> bool:
    from .. import adapters

    return any(True for _ in adapters.adapted_layers(model))
