"""What a merge input names: a model directory, a safetensors file, a packaged asset, a hub id, or a
finished weightsmith ``adapt`` run (its ``model/`` directory). The recipe layer resolves names here and
hands stores and source directories to the executor (``_core``), which never sees a model name.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightsmithError
from ..models import resolve
from ..store import WeightStore, open_store

RUN_FILE, RUN_MODEL = "run.json", "model"


def model_path(spec: str | Path) -> Path:
    """The local path of a merge input; an adapt run directory stands for its full model (``RUN/model``)."""
    p = resolve(spec)
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
    return open_store(model_path(spec))


def source_dir(spec: str | Path | WeightStore) -> Path | None:
    """The directory holding a checkpoint's config/tokenizer files, when there is one."""
    p = Path(spec.source) if isinstance(spec, WeightStore) else model_path(spec)
    return p if p.is_dir() else (p.parent if p.is_file() else None)
