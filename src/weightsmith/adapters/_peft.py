"""Interop with Hugging Face PEFT's LoRA format and with plain Hugging Face model directories.

``to_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``, ``lora_B.weight``, ``lora_embedding_A/B``,
``lora_magnitude_vector``). LoRA and DoRA adapters are written exactly; any adapter with exact
low-rank factors (``Adapter.low_rank``) is written exactly at that rank; every other method is
written as the truncated SVD of its dense update, and the relative error per layer is returned.
PEFT itself is never imported here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import ShapeMismatchError, WeightsmithError
from ..linalg import truncated_svd
from ..store import ShardWriter, atomic_replace, prepare_output
from ._attach import AdaptedLayer, _layers_with, adapted_layers, attach, base_state_dict, remove_adapters
from ._core import Adapter
from .dora import DoRA, DoRAAdapter
from .lora import LoRA, LoRAAdapter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SVD_RANK = 16


def _module_path(layer: AdaptedLayer) -> str:
    return layer.weight_name[: -len(".weight")]


def _peft_tensors(
    layer: AdaptedLayer, name: str, rank: int | None
) -> tuple[dict[str, Tensor], int, float, float]:
    """PEFT tensors for one layer: (tensors, rank, alpha, relative error)."""
    a: Adapter = layer.adapters[name]  # type: ignore[assignment]
    path = PREFIX + _module_path(layer)
    W0 = layer.weight().detach().float()
    rel = 0.0
    magnitude = None
    if isinstance(a, (LoRAAdapter, DoRAAdapter)):
        cfg: Any = layer.configs[name]
        A, B = a.A.detach().float(), a.B.detach().float()
        alpha = float(cfg.alpha)
        if isinstance(a, DoRAAdapter):
            magnitude = a.m.detach().float()
    else:
        factors = a.low_rank()
        if factors is not None:
            B, A = (f.detach().float() for f in factors)
        else:
            delta = a.delta(W0).detach().float()
            k = min(rank or SVD_RANK, *delta.shape)
            U, S, Vh = truncated_svd(delta, k)
            B, A = U * S.sqrt(), S.sqrt().unsqueeze(1) * Vh
            rel = float((delta - B @ A).norm() / delta.norm().clamp_min(1e-30))
        alpha = float(A.shape[0])  # scaling folded into B: alpha / r = 1
    r = A.shape[0]
    if layer.kind == "embedding":
        out = {f"{path}.lora_embedding_A": B.T.contiguous(), f"{path}.lora_embedding_B": A.T.contiguous()}
    else:
        out = {f"{path}.lora_A.weight": A.contiguous(), f"{path}.lora_B.weight": B.contiguous()}
    if magnitude is not None:
        out[f"{path}.lora_magnitude_vector"] = magnitude
    return out, r, alpha, rel


def to_peft(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    name: str = "default",
    rank: int | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Write adapter ``name`` as a PEFT LoRA adapter directory; returns the relative error per weight.

    ``rank`` is the truncated-SVD rank for methods that are not exactly low-rank (default 16).
    """
    out = prepare_output(out_dir, force)
    layers = [layer for layer, _ in _layers_with(model, name)]
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    errors: dict[str, float] = {}
    for layer in layers:
        t, r, alpha, rel = _peft_tensors(layer, name, rank)
        tensors.update(t)
        ranks[_module_path(layer)], alphas[_module_path(layer)] = r, alpha
        errors[layer.weight_name] = rel
    root: Any = layers[0].roots[name]
    dora = isinstance(layers[0].adapters[name], DoRAAdapter)
    if dora and not all(isinstance(layer.adapters[name], DoRAAdapter) for layer in layers):
        raise WeightsmithError(f"adapter '{name}' mixes DoRA and other layers; PEFT cannot express that")
    exact_lora = isinstance(root, (LoRA, DoRA))
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = float(root.alpha) if exact_lora else float(r0)
    if exact_lora and r0 != root.rank:
        a0 = float(alphas[next(p for p in ranks if ranks[p] == r0)])
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _name_or_path(model),
        "r": r0,
        "lora_alpha": a0,
        "target_modules": sorted(ranks),
        "rank_pattern": {_exact(p): r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {_exact(p): a for p, a in alphas.items() if a != a0},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": bool(exact_lora and root.rslora),
        "use_dora": dora,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers),
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(
            {k: v.cpu() for k, v in tensors.items()}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"}
        )
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_replace(tmp, out)
    return errors


def _exact(path: str) -> str:
    # PEFT matches pattern keys as regexes against the module name's suffix
    return "^" + re.escape(path) + "$" if "." in path else path


def _name_or_path(model: nn.Module) -> str | None:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model.config._name_or_path or None
    return None


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():
        pat = key[1:] if key.startswith("^") else rf"(.*\.)?(?:{key})"
        if re.fullmatch(pat.rstrip("$"), path):
            return value
    return default


def from_peft(model: nn.Module, peft_dir: str | os.PathLike[str], name: str = "default") -> list[str]:
    """Load a PEFT LoRA (or DoRA) adapter directory into ``model`` as weightsmith adapter ``name``."""
    d = Path(peft_dir)
    if not (d / PEFT_CONFIG).is_file() or not (d / PEFT_WEIGHTS).is_file():
        raise WeightsmithError(f"{d}: expected {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter directory)")
    cfg = json.loads((d / PEFT_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise WeightsmithError(
            f"{d / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LORA can be imported"
        )
    for key in ("lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication"):
        if cfg.get(key):
            raise WeightsmithError(
                f"{d / PEFT_CONFIG}: '{key}' is set; weightsmith imports plain LoRA/DoRA only"
            )
    with safe_open(str(d / PEFT_WEIGHTS), framework="pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    suffixes = (".lora_A.weight", ".lora_embedding_A")
    paths = [
        k[len(PREFIX) : -len(s)] for k in saved for s in suffixes if k.startswith(PREFIX) and k.endswith(s)
    ]
    if not paths:
        raise WeightsmithError(
            f"{d / PEFT_WEIGHTS}: no LoRA tensors (keys like '{PREFIX}<module>.lora_A.weight')"
        )
    dora = bool(cfg.get("use_dora"))
    rslora = bool(cfg.get("use_rslora"))
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    root = (DoRA if dora else LoRA)(rank=r0, alpha=alpha0, rslora=rslora)
    layer_cfgs = {}
    for p in paths:
        A = saved.get(f"{PREFIX}{p}.lora_A.weight", saved.get(f"{PREFIX}{p}.lora_embedding_A"))
        assert A is not None
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, p, alpha0))
        layer_cfgs[f"{p}.weight"] = (DoRA if dora else LoRA)(rank=A.shape[0], alpha=alpha, rslora=rslora)
    attach(model, layer_cfgs, name, root, restoring=True)
    try:
        for layer, _ in _layers_with(model, name):
            _load_peft_layer(layer, name, saved, d)
    except BaseException:
        remove_adapters(model, name)
        raise
    return list(layer_cfgs)


def _load_peft_layer(layer: AdaptedLayer, name: str, saved: dict[str, Tensor], d: Path) -> None:
    a = layer.adapters[name]
    path = PREFIX + _module_path(layer)
    if layer.kind == "embedding":
        values = {"B": saved[f"{path}.lora_embedding_A"].T, "A": saved[f"{path}.lora_embedding_B"].T}
    else:
        values = {"A": saved[f"{path}.lora_A.weight"], "B": saved[f"{path}.lora_B.weight"]}
    if isinstance(a, DoRAAdapter):
        values["m"] = saved[f"{path}.lora_magnitude_vector"]
    with torch.no_grad():
        for k, v in values.items():
            p = getattr(a, k)
            if tuple(p.shape) != tuple(v.shape):
                raise ShapeMismatchError(f"{path}.{k}", tuple(p.shape), tuple(v.shape), str(d))
            p.copy_(v)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base state dict with every enabled, unmerged adapter folded in (the model is not changed)."""
    state = base_state_dict(model)
    for path, layer in adapted_layers(model):
        active = layer.active()
        if not active:
            continue
        W = layer.weight().detach().float()
        with torch.no_grad():
            W = W + sum(a.merge(W) - W for a in active)
        key = f"{path}.weight"
        state[key] = (W.T if layer.kind == "conv1d" else W).to(state[key].dtype).contiguous()
    return state


def export_merged(model: nn.Module, out_dir: str | os.PathLike[str], force: bool = False) -> Path:
    """Write the model with its adapters merged as a Hugging Face directory (config + safetensors)."""
    from transformers import PreTrainedModel

    state = merged_state_dict(model)
    with ShardWriter(out_dir, force=force) as writer:
        for key, t in state.items():
            writer.add(key, t)
        if isinstance(model, PreTrainedModel):
            writer.write_text("config.json", model.config.to_json_string())
            if model.can_generate() and model.generation_config is not None:
                writer.write_text("generation_config.json", model.generation_config.to_json_string())
    return Path(out_dir)
