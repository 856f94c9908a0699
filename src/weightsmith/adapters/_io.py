"""Saving and loading adapters: ``adapters.safetensors`` + ``adapters.json``.

Only what cannot be rebuilt is written: trainable parameters and persistent buffers, under
``<adapter>/<weight name>/<tensor>``. Loading runs each config's ``create`` again (which regenerates
shared random bases from the seed and anything derived from ``W0``) and then copies the tensors in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import config_from_dict, to_dict
from ..errors import ShapeMismatchError, WeightsmithError
from ..staging import check_output, staged_dir
from ._attach import AdaptedLayer, _layers_with, attach, remove_adapters

CONFIG_NAME = "adapters.json"
TENSORS_NAME = "adapters.safetensors"
FORMAT = "weightsmith-adapters"


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """What ``save_adapters`` writes: ``{"<adapter>/<weight>/<tensor>": tensor}``."""
    out: dict[str, Tensor] = {}
    for layer, names in _layers_with(model, name):
        for n in names:
            for key, t in layer.adapters[n].state_dict().items():
                out[f"{n}/{layer.weight_name}/{key}"] = t.detach()
    return out


def save_adapters(
    model: nn.Module, out_dir: str | os.PathLike[str], force: bool = False, name: str | None = None
) -> Path:
    """Write the model's adapters (or only ``name``) to ``out_dir``; never overwrites unless ``force``."""
    check_output(out_dir, force, directory=True)
    layers = _layers_with(model, name)
    meta: dict[str, Any] = {"format": FORMAT, "version": 1, "adapters": {}}
    for layer, names in layers:
        for n in names:
            if getattr(layer.adapters[n], "peft_bases", False):
                raise WeightsmithError(
                    f"adapter '{n}' on '{layer.weight_name}' holds random bases imported from a PEFT file, "
                    "which its seed cannot regenerate; write it with to_peft (or export --peft) instead"
                )
            entry = meta["adapters"].setdefault(n, {"config": to_dict(layer.roots[n]), "layers": {}})
            entry["layers"][layer.weight_name] = to_dict(layer.configs[n])
    tensors = {k: v.contiguous().cpu() for k, v in adapter_tensors(model, name).items()}
    with staged_dir(out_dir, force) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(out_dir)


def load_adapters(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Attach the adapters saved in ``directory`` to ``model`` and load their tensors. Returns their names."""
    d = Path(directory)
    cfg_path, t_path = d / CONFIG_NAME, d / TENSORS_NAME
    for p in (cfg_path, t_path):
        if not p.is_file():
            hint = " (a PEFT adapter? use from_peft)" if (d / "adapter_config.json").is_file() else ""
            raise WeightsmithError(f"{d}: missing {p.name}; not a weightsmith adapter directory{hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsmithError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise WeightsmithError(
            f"{cfg_path}: not a weightsmith adapter config (format {meta.get('format')!r})"
        )
    with safe_open(str(t_path), framework="pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    loaded = []
    for name, entry in meta["adapters"].items():
        root = config_from_dict(entry["config"], "adapter")
        layer_cfgs = {w: config_from_dict(c, "adapter") for w, c in entry["layers"].items()}
        attach(model, layer_cfgs, name, root, restoring=True)
        try:
            for layer, _ in _layers_with(model, name):
                _load_layer(layer, name, saved, t_path)
        except BaseException:
            remove_adapters(model, name)  # leave the model as it was
            raise
        loaded.append(name)
    return loaded


def _load_layer(layer: AdaptedLayer, name: str, saved: dict[str, Tensor], path: Path) -> None:
    adapter = layer.adapters[name]
    state = adapter.state_dict()
    prefix = f"{name}/{layer.weight_name}/"
    incoming = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    missing = [k for k in state if k not in incoming]
    if missing:
        raise WeightsmithError(f"{path}: tensor '{prefix}{missing[0]}' is missing")
    extra = [k for k in incoming if k not in state]
    if extra:
        raise WeightsmithError(f"{path}: unexpected tensor '{prefix}{extra[0]}' for this adapter")
    for k, t in state.items():
        if tuple(incoming[k].shape) != tuple(t.shape):
            raise ShapeMismatchError(prefix + k, tuple(t.shape), tuple(incoming[k].shape), str(path))
    adapter.load_state_dict({k: v.to(state[k].dtype) for k, v in incoming.items()}, strict=True)
