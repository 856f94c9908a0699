"""map_weights: the one executor that streams a kernel over stores, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import ShapeMismatchError, WeightsmithError
from .progress import track
from .select import Selector
from .store import ShardWriter, WeightStore


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; an unavailable device is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightsmithError(f"--device {device}: CUDA is not available on this machine")
    return dev


def common_names(stores: Sequence[WeightStore], select: Selector | None = None) -> list[str]:
    """Names present in every store, in the first store's order, checked for equal shapes."""
    first = stores[0]
    names = [n for n in first if (select is None or select.matches(n))]
    for other in stores[1:]:
        missing = [n for n in names if n not in other]
        if missing:
            raise WeightsmithError(
                f"{other.source} lacks {len(missing)} tensor(s) that {first.source} has, e.g. '{missing[0]}'"
            )
        for n in names:
            a, b = first.meta(n).shape, other.meta(n).shape
            if a != b:
                raise ShapeMismatchError(n, a, b, f"{first.source} vs {other.source}")
    return names


def map_weights(
    fn: Callable[..., Any],
    *stores: WeightStore,
    select: Selector | None = None,
    device: str | torch.device | None = "cpu",
    writer: ShardWriter | None = None,
    passthrough: bool = True,
    description: str = "weights",
) -> dict[str, Any]:
    """Apply ``fn(*tensors)`` to every selected name common to ``stores``.

    With a ``writer``, tensor results are streamed to disk (and unselected tensors of the first
    store copied through when ``passthrough``); nothing is kept in memory and ``{}`` is returned.
    Without one, ``{name: result}`` is returned.
    """
    if not stores:
        raise ValueError("map_weights needs at least one store")
    selected = common_names(stores, select)
    chosen = set(selected)
    out: dict[str, Any] = {}
    order = list(stores[0]) if writer is not None and passthrough else selected
    dev = resolve_device(device)
    for name in track(order, description):
        if name not in chosen:
            if writer is not None:
                writer.add(name, stores[0][name])
            continue
        tensors = [s[name].to(dev) for s in stores]
        try:
            result = fn(*tensors)
        except (RuntimeError, ValueError) as exc:
            raise WeightsmithError(f"tensor '{name}': {exc}") from exc
        if writer is not None:
            writer.add(name, result)
        else:
            out[name] = result
    return out
