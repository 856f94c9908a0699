"""Resolve and load models: packaged asset names, local Hugging Face directories, safetensors files,
and hub ids (downloaded by plain transformers when the network allows).

A directory written by ``weightsmith compress --format weightsmith`` (its ``compression.json`` names that
format) loads through :func:`weightsmith.compress.load_compressed`, so low-rank layers come back as two
thin Linears and every task (``adapt``, ``train``, evaluation) sees the compressed model as written.
"""

from __future__ import annotations

import fcntl
import json
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
    from transformers import AutoTokenizer

    if compressed_format(path) == "weightsmith":
        model = _load_compressed(path, task, dtype)
    else:
        model = _load_hf(path, task, num_labels, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def compressed_format(path: Path) -> str | None:
    """The ``--format`` a ``weightsmith compress`` output directory was written in, or None for any other
    directory."""
    info = path / "compression.json"
    if not info.is_file():
        return None
    try:
        return str(json.loads(info.read_text())["format"])
    except (ValueError, KeyError) as exc:
        raise WeightsmithError(f"{info}: not a weightsmith compression record ({exc})") from exc


def _load_compressed(path: Path, task: str, dtype: torch.dtype) -> torch.nn.Module:
    """A ``--format weightsmith`` directory as the module :func:`load_compressed` builds, checked against
    ``task`` (a causal LM for "causal-lm", an encoder for "encoder"; no classifier head is stored)."""
    from .compress import load_compressed

    if task == "classification":
        raise WeightsmithError(
            f"{path}: a compressed directory holds no classification head; load it as an encoder "
            "(task='encoder') and put a head on it"
        )
    if task not in ("auto", "causal-lm", "encoder"):
        raise WeightsmithError(f"unknown task '{task}'; use auto, causal-lm, encoder or classification")
    model = load_compressed(path, dtype=dtype)
    causal = type(model).__name__.endswith("CausalLM")
    if (task == "causal-lm" and not causal) or (task == "encoder" and causal):
        raise WeightsmithError(f"{path}: holds a {type(model).__name__}, not a model for task '{task}'")
    return model


def _load_hf(path: Path, task: str, num_labels: int | None, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
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
    return model  # type: ignore[no-any-return]
