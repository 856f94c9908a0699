"""What a merge input names: a model directory, a safetensors file, a packaged asset, a hub id, a
finished weightsmith ``adapt`` run (its ``model/`` directory), or ``MODEL+LORA`` (mergekit's reference to a
model with a PEFT LoRA applied). The recipe layer resolves names here and hands stores and source
directories to the executor (``_core``), which never sees a model name.

``MODEL+LORA`` is applied on the fly: :class:`LoRAAppliedStore` reads each tensor of MODEL and adds the
LoRA update ``s B A`` (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2022, eq. 3;
``s = lora_alpha / r``, ``lora_alpha / sqrt(r)`` with rsLoRA) as it is read, so no merged copy is written.
The folder is read with the one PEFT reader (through ``lora_merge.load_adapter``); ``modules_to_save``
tensors replace MODEL's, ``lora_B.bias`` is added to the layer's bias. A path that exists with a ``+`` in
its name is a path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import WeightsmithError
from ..models import resolve
from ..store import TensorMeta, WeightStore, open_store

if TYPE_CHECKING:
    from .lora_merge import LoRAFolder

RUN_FILE, RUN_MODEL = "run.json", "model"


def split_lora(spec: str | Path) -> tuple[str | Path, str | None]:
    """``(MODEL, LORA)`` of a ``MODEL+LORA`` reference, ``(spec, None)`` for anything else."""
    if not isinstance(spec, str) or "+" not in spec or Path(spec).expanduser().exists():
        return spec, None
    chunks = spec.split("+")
    if len(chunks) != 2 or not all(c.strip() for c in chunks):
        raise WeightsmithError(f"'{spec}': a model+LoRA reference is MODEL+LORA_FOLDER (exactly one '+')")
    return chunks[0], chunks[1]


def locate(spec: str, base_dir: Path | None) -> str:
    """``spec`` with each part (MODEL and LORA of ``MODEL+LORA``) that exists relative to ``base_dir``
    (a recipe's folder) made into that path; other parts are left as given."""

    def one(part: str) -> str:
        p = Path(part).expanduser()
        if not p.exists() and base_dir is not None and (base_dir / p).exists():
            return str(base_dir / p)
        return part

    model, lora = split_lora(spec)
    return one(str(model)) if lora is None else f"{one(str(model))}+{one(lora)}"


def model_path(spec: str | Path) -> Path:
    """The local path of a merge input; an adapt run directory stands for its full model (``RUN/model``),
    ``MODEL+LORA`` for MODEL's (where config and tokenizer files come from)."""
    p = resolve(split_lora(spec)[0])
    if not (p.is_dir() and (p / RUN_FILE).is_file()):
        return p
    if (p / RUN_MODEL).is_dir():
        return p / RUN_MODEL
    try:
        method = json.loads((p / RUN_FILE).read_text(encoding="utf-8"))["adapter"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        method = "an adapter"
    raise WeightsmithError(
        f"{p} is a weightsmith adapt run with a {method} adapter, not a full model: merge it into its "
        f"base first (weightsmith export {p} --merged OUT) and give OUT here, or merge its adapter "
        f"directory {p / 'adapter'} with 'method: lora'"
    )


def open_input(spec: str | Path | WeightStore) -> WeightStore:
    """A lazy store over a merge input (a store is passed through)."""
    if isinstance(spec, WeightStore):
        return spec
    lora = split_lora(spec)[1]
    store = open_store(model_path(spec))
    if lora is None:
        return store
    from .lora_merge import load_adapter

    if not Path(lora).expanduser().is_dir():
        raise WeightsmithError(f"'{spec}': the LoRA '{lora}' is not a folder; a PEFT LoRA folder is expected")
    return LoRAAppliedStore(store, load_adapter(Path(lora).expanduser()))


def source_dir(spec: str | Path | WeightStore) -> Path | None:
    """The directory holding a checkpoint's config/tokenizer files, when there is one."""
    p = Path(spec.source) if isinstance(spec, WeightStore) else model_path(spec)
    return p if p.is_dir() else (p.parent if p.is_file() else None)


class LoRAAppliedStore(WeightStore):
    """``base`` with a PEFT LoRA folder applied tensor by tensor as it is read (``W + s B A``, in float32,
    cast back to W's dtype). Every tensor of the folder must land on a tensor of ``base`` of its shape."""

    def __init__(self, base: WeightStore, lora: LoRAFolder) -> None:
        self.base, self.lora = base, lora
        self.source = f"{base.source}+{lora.path}"
        self.metadata = dict(base.metadata)
        updates = [*lora.modules, *lora.lora_bias, *lora.base]
        for key in updates:
            if key not in base:
                where = lora.source.get(key, key)
                raise WeightsmithError(
                    f"{lora.path}: tensor '{where}' is for '{key}', which {base.source} does not have; "
                    "is it the LoRA of this model?"
                )
        for key, f in lora.modules.items():
            shape = base.meta(key).shape
            if len(shape) != 2 or (f.B.shape[0], f.A.shape[1]) != tuple(shape):
                raise WeightsmithError(
                    f"{lora.path}: the LoRA of '{key}' has shape {(f.B.shape[0], f.A.shape[1])}, but "
                    f"{base.source} holds it as {tuple(shape)}"
                )
        for key, t in [*lora.lora_bias.items(), *lora.base.items()]:
            if tuple(t.shape) != tuple(base.meta(key).shape):
                raise WeightsmithError(
                    f"{lora.path}: tensor '{lora.source.get(key, key)}' has shape {tuple(t.shape)}, but "
                    f"{base.source}'s '{key}' is {tuple(base.meta(key).shape)}"
                )

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        W = self.base[name]
        if name in self.lora.base:
            return self.lora.base[name].to(W.dtype)
        f = self.lora.modules.get(name)
        if f is not None:
            return (W.float() + f.delta()).to(W.dtype)
        b = self.lora.lora_bias.get(name)
        if b is not None:
            return (W.float() + b.float()).to(W.dtype)
        return W

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)
