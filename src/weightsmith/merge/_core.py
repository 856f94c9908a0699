"""Merge core: task vectors as lazy views, input checks, and the streaming executor that writes a
Hugging Face model directory (sharded safetensors + index, config and tokenizer files) atomically.

Dtype policy: every kernel computes in float32; each output tensor is written in the requested dtype,
else in the base checkpoint's dtype. Non-floating tensors (ids, masks) are copied from the base.
Reading (one tensor set ahead, with the finiteness check) and writing run on background threads.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..execute import resolve_device
from ..progress import track
from ..select import Selector
from ..store import ShardWriter, WeightStore, prepare_output

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
    digest = hashlib.blake2b(f"{seed}:{index}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _finite(t: Tensor) -> bool:
    if not t.is_floating_point():
        return True
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # one pass, no temporary; NaN propagates to both, Inf shows at an end
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


PREFETCH_BYTES = 1 << 30


def _reader(
    stores: Sequence[WeightStore],
    names: Sequence[str],
    device: torch.device,
    check: bool,
    stop: threading.Event,
    merged: set[str],
) -> Iterator[tuple[str, list[Tensor]]]:
    """Yield ``(name, tensors)`` while a background thread reads ahead, holding at most
    ``PREFETCH_BYTES`` of not-yet-finished inputs (a huge tensor is read only when nothing else is held)."""
    q: queue.Queue[Any] = queue.Queue()
    cond = threading.Condition()
    held = [0]

    def sources(name: str) -> Sequence[WeightStore]:
        return stores if name in merged else stores[:1]

    def size(name: str) -> int:
        return sum(s.meta(name).nbytes for s in sources(name))

    def work() -> None:
        try:
            for name in names:
                need = size(name)
                with cond:
                    while held[0] and held[0] + need > PREFETCH_BYTES and not stop.is_set():
                        cond.wait(0.1)
                    held[0] += need
                if stop.is_set():
                    return
                tensors = []
                for s in sources(name):
                    t = s[name].to(device, non_blocking=device.type == "cuda")
                    if check and not _finite(t):
                        raise WeightsmithError(
                            f"tensor '{name}' in {s.source} contains NaN or Inf; "
                            "fix or re-download that checkpoint"
                        )
                    tensors.append(t)
                q.put((name, tensors))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)
            return
        q.put(None)

    thread = threading.Thread(target=work, daemon=True, name="weightsmith-read")
    thread.start()
    while True:
        item = q.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
        with cond:  # the consumer is done with this item
            held[0] -= size(item[0])
            cond.notify()


class _BackgroundWriter:
    """Feeds a ShardWriter from a thread so that casting and serialising overlap the next merge."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name="weightsmith-write")
        self.thread.start()

    def _work(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            name, tensor, dtype = item
            try:
                t = tensor.to("cpu")
                self.writer.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            except BaseException as exc:
                self.error = exc

    def add(self, name: str, tensor: Tensor, dtype: torch.dtype | None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, tensor, dtype))

    def finish(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


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
    """Stream every tensor of ``stores[0]`` to ``out``: names in ``merged`` go through
    ``merge_one(name, [tensor of each store])``, the rest are copied from ``stores[0]``.

    On any error (bad input, NaN, a full disk, Ctrl-C) the partial output is removed and nothing that
    looks like a complete model is left behind.
    """
    prepare_output(out, force)
    dev = resolve_device(device)
    names = list(stores[0])
    stop = threading.Event()
    writer = ShardWriter(out, max_shard_bytes=shard_bytes, force=force)
    bg: _BackgroundWriter | None = None
    try:
        bg = _BackgroundWriter(writer)
        for name, tensors in track(
            _reader(stores, names, dev, check_finite, stop, merged), description, len(names)
        ):
            first = tensors[0]
            if name in merged and first.is_floating_point():
                try:
                    result = merge_one(name, tensors)
                except WeightsmithError:
                    raise
                except (RuntimeError, ValueError) as exc:
                    raise WeightsmithError(f"merging tensor '{name}' failed: {exc}") from exc
                target = dtype or first.dtype
                bg.add(name, result.to(target) if result.is_cuda else result, target)
            else:
                bg.add(name, first, dtype if first.is_floating_point() else None)
        bg.finish()
        _copy_model_files(writer, copy_from, dtype, extra_files)
        return writer.close()
    except BaseException:
        stop.set()
        if bg is not None and bg.thread.is_alive():
            bg.q.put(None)
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


def open_input(spec: str | Path | WeightStore) -> WeightStore:
    if isinstance(spec, WeightStore):
        return spec
    from ..models import open_weights

    return open_weights(spec)


def source_dir(spec: str | Path | WeightStore) -> Path | None:
    """The directory holding a checkpoint's config/tokenizer files, when there is one."""
    if isinstance(spec, WeightStore):
        p = Path(spec.source)
    else:
        from ..models import resolve

        p = resolve(spec)
    return p if p.is_dir() else (p.parent if p.is_file() else None)


def model_thresholds(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], names: Sequence[str], spec: Any
) -> list[float | None]:
    """TIES ``trim="model"``: each task's k-th largest |tau| over all ``names`` (two streamed passes)."""
    from .task_arithmetic import magnitude_threshold

    if not (spec.sparsify == "magnitude" and spec.trim == "model" and spec.density < 1):
        return [None] * len(models)
    k = max(
        1,
        int(
            spec.density
            * sum(
                base[n].numel()
                if not isinstance(base, WeightStore)
                else base.meta(n).nbytes // base.meta(n).dtype.itemsize
                for n in names
            )
        ),
    )
    out: list[float | None] = []
    for m in models:
        tv = TaskVector(m, base)

        def chunks(tv: TaskVector = tv) -> Iterator[Tensor]:
            return (tv[n] for n in names)

        out.append(magnitude_threshold(chunks, k))
    return out


def merge_state_dicts(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    method: Any,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """In-memory merge of state dicts (float32 results for ``names``, default: the float tensors of
    the base or first model), with the model-wide TIES trim done over all ``names``."""
    from ._chunked import merge_streamed

    spec = method.gta()
    ref = base if base is not None and spec.uses_base else models[0]
    if spec.uses_base and base is None:
        raise WeightsmithError(f"merge method '{type(method).method}' needs a base model")
    todo = list(names) if names is not None else [n for n, t in ref.items() if t.is_floating_point()]
    w = list(weights) if weights is not None else [1.0] * len(models)
    thresholds = model_thresholds(ref, models, todo, spec) if spec.uses_base else [None] * len(models)
    dens = [spec.density] * len(models)
    return {
        n: merge_streamed(
            ref[n],
            [m[n] for m in models],
            spec,
            w,
            dens,
            thresholds,
            [seed_for(spec.seed, i, n) for i in range(len(models))],
        )
        for n in todo
    }


# (spec, per-model weights, per-model densities) for one tensor name
TensorParams = Callable[[str], "tuple[Any, list[float], list[float]]"]


def merge(
    models: Sequence[str | Path | WeightStore],
    method: Any,
    out: str | Path,
    *,
    base: str | Path | WeightStore | None = None,
    weights: Sequence[float] | None = None,
    select: Selector | str | Sequence[str] | None = None,
    params: TensorParams | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Merge fine-tuned checkpoints with a task-arithmetic-family ``method`` (``TIES(density=0.2)``,
    ``TaskArithmetic(scaling=0.5)``, ...) and write a Hugging Face model directory to ``out``.

    Tensors that ``select`` leaves out are copied from the base (or the first model). ``params`` may
    give per-tensor (spec, weights, densities), as mergekit's filters and gradients do.
    """
    from ._chunked import merge_streamed

    spec0 = method.gta()
    if spec0.uses_base and base is None:
        raise WeightsmithError(f"merge method '{type(method).method}' needs a base model (base: ...)")
    if not models:
        raise WeightsmithError("nothing to merge: give at least one model")
    out_dtype = parse_dtype(dtype)
    prepare_output(out, force)
    ins = [open_input(m) for m in models]
    stores = ([open_input(base)] if spec0.uses_base and base is not None else []) + ins
    check_inputs(stores, out_dtype)
    w = [float(x) for x in (weights if weights is not None else [1.0] * len(ins))]
    if len(w) != len(ins):
        raise WeightsmithError(f"{len(w)} weights for {len(ins)} models; give one weight per model")
    chosen = merged_names(stores[0], Selector.of(select) if select is not None else None)
    dev = resolve_device(device)

    def default_params(name: str) -> tuple[Any, list[float], list[float]]:
        return spec0, w, [spec0.density] * len(ins)

    resolve = params or default_params
    order = [n for n in stores[0] if n in chosen]
    thresholds = model_thresholds(stores[0], ins, order, spec0)

    def merge_one(name: str, tensors: list[Tensor]) -> Tensor:
        spec, wts, dens = resolve(name)
        thetas = tensors[1:] if spec.uses_base else tensors
        seeds = [seed_for(spec.seed, i, name) for i in range(len(thetas))]
        target = out_dtype or tensors[0].dtype
        return merge_streamed(tensors[0], thetas, spec, wts, dens, thresholds, seeds, target)

    return write_model(
        stores,
        merge_one,
        out,
        merged=chosen,
        dtype=out_dtype,
        device=dev,
        force=force,
        shard_bytes=parse_size(shard_size),
        copy_from=source_dir(base if base is not None else models[0]),
        extra_files=extra_files,
    )
