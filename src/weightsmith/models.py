"""Resolve and load models: packaged asset names, local Hugging Face directories, safetensors files,
and hub ids (downloaded by plain transformers when the network allows)."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import assets
from .errors import WeightsmithError
from .progress import log
from .staging import staged_dir, user_error
from .store import WeightStore, normal_permissions, open_store

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt")


def _smollm2_cache() -> Path:
    """Dequantise the packaged GGUF once into a safetensors model directory (reloads in < 1 s)."""
    out = assets.cache_dir() / "smollm2-135m-instruct"
    if _cache_complete(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise user_error(exc, out.parent, "creating the model cache") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent first run converts; this one then reuses it
        if _cache_complete(out):
            return out
        gguf = assets.smollm2_gguf()
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"converting {gguf.name} to a safetensors cache in {out} (once, ~15 s)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        with staged_dir(out, force=True) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            normal_permissions(tmp / "model.safetensors")
            model.config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
    return out


def _cache_complete(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(MODEL_FILES)))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower()
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"download failed ({type(exc).__name__})"
        )
        raise WeightsmithError(
            f"'{repo_id}' is not a local path and looks like a hub id, but {why}. "
            f"Pass a local model directory, a .safetensors file, or a packaged asset "
            f"({', '.join(assets.asset_names('model'))})."
        ) from exc


def resolve(spec: str | os.PathLike[str]) -> Path:
    """Map a model spec to a local path (directory or file)."""
    s = str(spec)
    if s in assets.ASSETS:
        if s == "minilm":
            return assets.minilm_dir()
        if s == "smollm2":
            return _smollm2_cache()
        raise WeightsmithError(
            f"asset '{s}' is a data set, not a model; models: {', '.join(assets.asset_names('model'))}"
        )
    p = Path(s).expanduser()
    if p.exists():
        return p
    if HUB_ID.match(s) and not s.startswith((".", "/")):
        return _hub_download(s)
    raise WeightsmithError(
        f"model '{s}' not found: not a packaged asset ({', '.join(assets.asset_names('model'))}), "
        "not an existing path, and not a hub id (owner/name)"
    )


def open_weights(spec: str | os.PathLike[str]) -> WeightStore:
    """A lazy WeightStore over a model spec (no architecture needed)."""
    return open_store(resolve(spec))


def load_model(
    spec: str | os.PathLike[str],
    task: str = "auto",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)``. ``task``: "auto", "causal-lm", "encoder" or "classification"."""
    path = resolve(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise WeightsmithError(
            f"{path}: loading a model needs a directory with config.json (got weights only)"
        )
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(path)
    if task == "auto":
        archs = config.architectures or []
        task = "causal-lm" if any("CausalLM" in a for a in archs) else "encoder"
    kwargs: dict[str, Any] = {"dtype": dtype}
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif task == "encoder":
        model = AutoModel.from_pretrained(path, **kwargs)
    elif task == "classification":
        if num_labels is None:
            raise WeightsmithError("task 'classification' needs num_labels")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    else:
        raise WeightsmithError(f"unknown task '{task}'; use auto, causal-lm, encoder or classification")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
