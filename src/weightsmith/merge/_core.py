"""Merge core: task vectors as lazy views, input checks, and the writer of a Hugging Face model directory
(sharded safetensors + index, config and tokenizer files), streamed through ``weightsmith.execute``.

Dtype policy: every kernel computes in float32; each output tensor is written in the requested dtype,
else in the base checkpoint's dtype. Non-floating tensors (ids, masks) are copied from the base.
Inputs are read ahead (with the finiteness check) and outputs written behind on background threads by
the executor. This module takes stores, never model names: the recipe layer (``inputs.py``) resolves them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..execute import resolve_device, stream
from ..linalg import magnitude_threshold, stable_seed
from ..select import Selector
from ..staging import check_output
from ..store import ShardWriter, WeightStore
from ._chunked import Row, merge_streamed

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "*.model",
    "chat_template*",
    "preprocessor_config.json",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise WeightsmithError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


class TaskVector(Mapping[str, Tensor]):
    """The task vector tau = theta - theta_0 as a lazy view: nothing is read until a name is asked for,
    and each access reads one tensor from each side and returns their float32 difference on ``device``."""

    def __init__(
        self,
        model: Mapping[str, Tensor],
        base: Mapping[str, Tensor],
        device: torch.device | str | None = None,
    ) -> None:
        self.model, self.base, self.device = model, base, device

    def __getitem__(self, name: str) -> Tensor:
        return self.model[name].to(self.device).float() - self.base[name].to(self.device).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def check_inputs(stores: Sequence[WeightStore], out_dtype: torch.dtype | None = None) -> None:
    """Same tensor names, shapes and (unless an output dtype is given) float dtypes in every store."""
    first = stores[0]
    names = {n for n in first if first.meta(n).dtype.is_floating_point}  # buffers (ids) come from the base
    for other in stores[1:]:
        theirs = {n for n in other if other.meta(n).dtype.is_floating_point}
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        if missing or extra:
            parts = (
                [f"{other.source} lacks {len(missing)} tensor(s) of {first.source}: {_few(missing)}"]
                if missing
                else []
            )
            parts += (
                [f"{other.source} has {len(extra)} tensor(s) {first.source} lacks: {_few(extra)}"]
                if extra
                else []
            )
            raise WeightsmithError("; ".join(parts) + ". Merging needs checkpoints of one architecture.")
        bad = [
            f"'{n}' {tuple(first.meta(n).shape)} vs {tuple(other.meta(n).shape)}"
            for n in sorted(names)
            if first.meta(n).shape != other.meta(n).shape
        ]
        if bad:
            raise WeightsmithError(
                f"shape mismatch between {first.source} and {other.source} in {len(bad)} "
                f"tensor(s): {_few(bad)}. Merging needs checkpoints of one architecture."
            )
        for n in sorted(names):
            a, b = first.meta(n).dtype, other.meta(n).dtype
            if a != b and (out_dtype is None or not (a.is_floating_point and b.is_floating_point)):
                raise WeightsmithError(
                    f"tensor '{n}' is {str(a).removeprefix('torch.')} in {first.source} but "
                    f"{str(b).removeprefix('torch.')} in {other.source}; pass --dtype to choose the output"
                )


def _few(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def seed_for(seed: int, index: int, name: str) -> int:
    """A per-(task, tensor) seed: random masks do not depend on the order tensors are processed in."""
    return stable_seed(f"{seed}:{index}:{name}")


def write_model(
    stores: Sequence[WeightStore],
    merge_one: Callable[[str, list[Tensor]], Tensor],
    out: str | Path,
    *,
    merged: set[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    shard_bytes: int = 2 * 1024**3,
    copy_from: str | Path | None = None,
    extra_files: Mapping[str, str] | None = None,
    check_finite: bool = True,
    description: str = "merge",
) -> Path:
    """Stream every tensor of ``stores[0]`` to ``out``: floating names in ``merged`` go through
    ``merge_one(name, [tensor of each store])``, the rest are copied from ``stores[0]``.

    On any error (bad input, NaN, a full disk, Ctrl-C) the executor's threads are joined, the partial
    output is removed and nothing that looks like a complete model is left behind.
    """
    check_output(out, force, directory=True)
    first = stores[0]
    chosen = {n for n in merged if n in first and first.meta(n).dtype.is_floating_point}
    writer = ShardWriter(out, max_shard_bytes=shard_bytes, force=force)
    try:
        stream(
            stores,
            merge_one,
            chosen=chosen,
            writer=writer,
            device=device,
            dtype=dtype,
            keep_dtype=True,
            check_finite=check_finite,
            description=description,
            verb="merging",
        )
        _copy_model_files(writer, copy_from, dtype, extra_files)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_model_files(
    writer: ShardWriter, src: str | Path | None, dtype: torch.dtype | None, extra: Mapping[str, str] | None
) -> None:
    try:
        if src is not None and Path(src).is_dir():
            writer.copy_files(src, MODEL_FILES)
            cfg = writer.tmp / "config.json"
            if dtype is not None and cfg.is_file():
                data = json.loads(cfg.read_text())
                key = "dtype" if "dtype" in data else "torch_dtype"
                data[key] = str(dtype).removeprefix("torch.")
                cfg.write_text(json.dumps(data, indent=2))
        for fname, text in (extra or {}).items():
            writer.write_text(fname, text)
    except OSError as exc:
        raise WeightsmithError(
            f"writing {writer.out} failed ({exc.strerror}); nothing was left behind"
        ) from exc


def merged_names(store: WeightStore, select: Selector | None) -> set[str]:
    """Float tensors selected for merging (the rest are copied from the base)."""
    return {
        n for n in store if store.meta(n).dtype.is_floating_point and (select is None or select.matches(n))
    }


def selected_names(store: WeightStore, select: Selector | str | Sequence[str] | None) -> set[str]:
    """:func:`merged_names`, where each include pattern must match a floating tensor and the selection
    must leave something to merge (an empty selection would silently write a copy of the base)."""
    if select is None:
        return merged_names(store, None)
    sel = Selector.of(select)
    floats = [n for n in store if n in merged_names(store, None)]
    for pattern in sel.include:
        Selector(include=(pattern,)).require(floats, f"floating tensors of {store.source}")
    chosen = merged_names(store, sel)
    if not chosen:
        raise WeightsmithError(
            f"select/exclude {_selector_text(sel)} leaves no tensor of {store.source} to merge"
        )
    return chosen


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5G', 10**9 -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    try:
        n = int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(float(s))
    except ValueError:
        raise WeightsmithError(f"--shard-size '{text}': use a size like 2GB or 500MB") from None
    if n <= 0:
        raise WeightsmithError(f"--shard-size must be positive (got '{text}')")
    return n


def check_weights(weights: Sequence[float], spec: Row, where: str = "") -> None:
    """Refuse weights that make a merge meaningless: non-finite, all zero, or (when the result is divided by
    their sum) summing to zero."""
    at = f" for tensor '{where}'" if where else ""
    if any(not math.isfinite(w) for w in weights):
        raise WeightsmithError(f"merge weights{at} must be finite numbers (got {list(weights)[:8]})")
    if weights and all(w == 0 for w in weights):
        raise WeightsmithError(
            f"every merge weight{at} is 0: the result would ignore every model; "
            "give at least one non-zero weight"
        )
    total, scale = sum(weights), max((abs(w) for w in weights), default=0.0)
    if spec.normalize == "weights" and spec.elect == "none" and abs(total) <= 1e-12 * max(scale, 1.0):
        raise WeightsmithError(
            f"merge weights{at} {list(weights)[:8]} sum to 0, and this method divides by their sum "
            "(normalize); change the weights or turn normalize off"
        )


def model_thresholds(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], names: Sequence[str], spec: Row
) -> list[float | None]:
    """TIES ``trim="model"``: each task's k-th largest |tau| over all ``names`` (two streamed passes)."""
    if not (spec.sparsify == "magnitude" and spec.trim == "model" and spec.density < 1):
        return [None] * len(models)
    total = sum(
        base.meta(n).nbytes // base.meta(n).dtype.itemsize
        if isinstance(base, WeightStore)
        else base[n].numel()
        for n in names
    )
    if total == 0:
        return [None] * len(models)
    k = max(1, int(spec.density * total))
    out: list[float | None] = []
    for m in models:
        tv = TaskVector(m, base)

        def chunks(tv: TaskVector = tv) -> Iterator[Tensor]:
            return (tv[n] for n in names)

        out.append(magnitude_threshold(chunks, k))
    return out


# (spec, per-model weights, per-model densities) for one tensor name
TensorParams = Callable[[str], "tuple[Row, list[float], list[float]]"]


class MergeJob(Protocol):
    """What a merge config's ``run`` gets from the recipe layer (``recipe.Recipe``): the inputs still as
    names, resolved to stores only through these methods, and the options that are not the method's."""

    weights: list[float] | None
    select: Selector | None
    params: TensorParams | None
    filters: list[str]

    def open_models(self) -> list[WeightStore]: ...
    def open_base(self) -> WeightStore | None: ...
    def copy_from(self) -> Path | None: ...


def merge_gta(
    models: Sequence[WeightStore],
    spec: Row,
    out: str | Path,
    *,
    base: WeightStore | None = None,
    weights: Sequence[float] | None = None,
    select: Selector | str | Sequence[str] | None = None,
    params: TensorParams | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    extra_files: Mapping[str, str] | None = None,
    copy_from: str | Path | None = None,
    method: str = "gta",
    filters: Sequence[str] = (),
) -> Path:
    """Merge fine-tuned checkpoints (stores) with one :class:`GTA` row and write a Hugging Face model
    directory to ``out``; config and tokenizer files come from ``copy_from``.

    Tensors that ``select`` leaves out are copied from the base (or the first model). ``params`` may give
    per-tensor (spec, weights, densities), as mergekit's filters and gradients do; ``filters`` are the
    mergekit filter strings, each of which must match some merged tensor.
    """
    if spec.uses_base and base is None:
        raise WeightsmithError(f"merge method '{method}' needs a base model (base: ...)")
    if not models:
        raise WeightsmithError("nothing to merge: give at least one model")
    out_dtype = parse_dtype(dtype)
    check_output(out, force, directory=True)
    stores = ([base] if spec.uses_base and base is not None else []) + list(models)
    check_inputs(stores, out_dtype)
    w = [float(x) for x in (weights if weights is not None else [1.0] * len(models))]
    if len(w) != len(models):
        raise WeightsmithError(f"{len(w)} weights for {len(models)} models; give one weight per model")
    if params is None:
        check_weights(w, spec)
    chosen = selected_names(stores[0], select)
    for flt in filters:
        if flt not in ("", "*") and not any(flt in n for n in chosen):
            raise WeightsmithError(
                f"filter '{flt[:200]}' matches no tensor of {stores[0].source}; "
                f"its tensors are named like {_few(sorted(chosen), 3)}"
            )

    def default_params(name: str) -> tuple[Row, list[float], list[float]]:
        return spec, w, [spec.density] * len(models)

    resolve = params or default_params
    order = [n for n in stores[0] if n in chosen]
    thresholds = model_thresholds(stores[0], models, order, spec)

    def merge_one(name: str, tensors: list[Tensor]) -> Tensor:
        tspec, wts, dens = resolve(name)
        if params is not None:
            check_weights(wts, tspec, name)
        thetas = tensors[1:] if tspec.uses_base else tensors
        seeds = [seed_for(tspec.seed, i, name) for i in range(len(thetas))]
        target = out_dtype or tensors[0].dtype
        return merge_streamed(tensors[0], thetas, tspec, wts, dens, thresholds, seeds, target)

    return write_model(
        stores,
        merge_one,
        out,
        merged=chosen,
        dtype=out_dtype,
        device=resolve_device(device),
        force=force,
        shard_bytes=parse_size(shard_size),
        copy_from=copy_from,
        extra_files=extra_files,
    )


def _selector_text(sel: Selector) -> str:
    parts = [f"include {list(sel.include)}"] if sel.include else []
    parts += [f"exclude {list(sel.exclude)}"] if sel.exclude else []
    return " ".join(parts)[:200] or "(predicate)"
