"""The one streaming executor: read-ahead, write-behind, device placement, progress, errors naming the tensor.

Every job that walks checkpoints tensor by tensor (merge, OPCM, analyze, and the coming compress job) runs
through here:

- :class:`ReadAhead` reads the next items on a background thread while the caller works on the current one,
  holding at most a byte budget of read-but-unfinished inputs (an item larger than the budget is read only
  when nothing else is held).
- :class:`WriteBehind` feeds a :class:`~weightsmith.store.ShardWriter` from a background thread, so the
  device-to-host copy, the dtype cast and serialisation overlap the next tensor's work.
- :func:`stream` combines the two over same-named tensors of several stores, with device placement, an
  optional finiteness check, progress, and errors that name the tensor (and the file, for bad inputs).

Both threads are joined on every way out (a finished run, a kernel error, NaN found, a full disk, Ctrl-C):
a thread still running while the interpreter shuts down is what aborts a process with "terminate called
without an active exception" (exit 134).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from .errors import ShapeMismatchError, WeightsmithError
from .progress import track
from .select import Selector
from .store import ShardWriter, WeightStore

T = TypeVar("T")
R = TypeVar("R")
PREFETCH_BYTES = 1 << 28  # default read-ahead budget of a merge


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; an unavailable device is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise WeightsmithError(f"--device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightsmithError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise WeightsmithError(f"--device '{device}': use cpu, cuda, cuda:N or auto")
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


def is_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t`` (one pass, no temporary); non-floating and empty tensors are finite."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates to both, Inf shows at an end
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class ReadAhead(Generic[T, R]):
    """``(item, read(item))`` in order, with a background thread reading ahead.

    At most ``budget`` bytes (as ``size(item)`` counts them) and ``depth`` items (when given) of
    read-but-unfinished items are held; the item the caller is working on counts until it asks for the next
    one. An item larger than the budget is read only when nothing else is held. ``background=False`` reads
    in the caller's thread (no overlap). Use it in a ``with`` block: leaving the block stops the thread and
    joins it, whatever the way out.
    """

    def __init__(
        self,
        items: Iterable[T],
        read: Callable[[T], R],
        *,
        size: Callable[[T], int] | None = None,
        budget: int = PREFETCH_BYTES,
        depth: int | None = None,
        background: bool = True,
    ) -> None:
        self.items, self.read = list(items), read
        self.size = size or (lambda _item: 0)
        self.budget, self.depth, self.background = budget, depth, background
        self._q: queue.Queue[Any] = queue.Queue()
        self._cond = threading.Condition()
        self._held, self._held_items, self._stop = 0, 0, False
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        try:
            for item in self.items:
                need = self.size(item)
                with self._cond:
                    while not self._stop and self._held_items and self._full(need):
                        self._cond.wait()
                    if self._stop:
                        return
                    self._held += need
                    self._held_items += 1
                self._q.put((item, self.read(item), need))
        except BaseException as exc:  # handed to the caller, which re-raises it
            self._q.put(_Failed(exc))
            return
        self._q.put(_DONE)

    def _full(self, need: int) -> bool:
        return self._held + need > self.budget or (self.depth is not None and self._held_items >= self.depth)

    def _release(self, need: int) -> None:
        with self._cond:
            self._held -= need
            self._held_items -= 1
            self._cond.notify()

    def __iter__(self) -> Iterator[tuple[T, R]]:
        if not self.background:
            for item in self.items:
                yield item, self.read(item)
            return
        self._thread = threading.Thread(target=self._work, daemon=True, name="weightsmith-read")
        self._thread.start()
        try:
            while True:
                got = self._q.get()
                if got is _DONE:
                    return
                if isinstance(got, _Failed):
                    raise got.exc
                item, value, need = got
                del got
                try:
                    yield item, value
                finally:
                    del value
                    self._release(need)
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading ahead and join the thread (it finishes at most the item it is reading)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while not self._q.empty():  # drop what was read ahead
            self._q.get_nowait()

    def __enter__(self) -> ReadAhead[T, R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class WriteBehind:
    """``put(name, tensor, dtype)`` returns at once; a background thread copies the tensor to the host,
    casts floating tensors to ``dtype`` (when given; a tensor on an accelerator is cast there, before the
    copy) and calls ``add(name, tensor)``. ``finish()`` waits for
    the queue and re-raises the first error; ``close()`` (every error path) drops what is queued and joins.
    """

    def __init__(self, add: Callable[[str, Tensor], None], depth: int = 2) -> None:
        self.add = add
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._cancel = False
        self._thread = threading.Thread(target=self._work, daemon=True, name="weightsmith-write")
        self._thread.start()

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            if self.error is not None or self._cancel:
                continue
            name, tensor, dtype = item
            del item
            try:
                t = tensor.to("cpu")
                del tensor
                self.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            except BaseException as exc:
                self.error = exc

    def put(self, name: str, tensor: Tensor, dtype: torch.dtype | None = None) -> None:
        if self.error is not None:
            raise self.error
        if dtype is not None and tensor.device.type != "cpu" and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # cast on the device (queued, not waited for): fewer bytes to copy
        self._q.put((name, tensor, dtype))

    def finish(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Discard what is queued and join the thread (it finishes at most the tensor it is writing)."""
        self._cancel = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def stream(
    stores: Sequence[WeightStore],
    fn: Callable[[str, list[Tensor]], Any],
    *,
    names: Sequence[str] | None = None,
    chosen: Collection[str] | None = None,
    writer: ShardWriter | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    keep_dtype: bool = False,
    check_finite: bool = False,
    prefetch_bytes: int = PREFETCH_BYTES,
    description: str = "weights",
    verb: str = "processing",
) -> dict[str, Any]:
    """Visit ``names`` (default: every tensor of ``stores[0]``, in order) and apply ``fn(name, tensors)``
    to those in ``chosen`` (default: all), ``tensors`` being that name's tensor from every store, on
    ``device``. Names not chosen are read from ``stores[0]`` only.

    With a ``writer``, results (and, unchanged, the names not chosen) are written behind on a background
    thread, floating ones cast to ``dtype`` (else, with ``keep_dtype``, to the first input's dtype), and
    ``{}`` is returned; without one, ``{name: result}`` of the chosen names. ``check_finite`` refuses NaN/Inf
    inputs, naming the tensor and its store. Kernel errors (``RuntimeError``/``ValueError``) become a
    :class:`WeightsmithError` naming the tensor.
    """
    if not stores:
        raise ValueError("stream needs at least one store")
    order = list(names) if names is not None else list(stores[0])
    picked = set(order) if chosen is None else set(chosen)
    dev = resolve_device(device)

    def sources(name: str) -> Sequence[WeightStore]:
        return stores if name in picked else stores[:1]

    def read(name: str) -> list[Tensor]:
        out = []
        for s in sources(name):
            t = s[name].to(dev, non_blocking=dev.type == "cuda")
            if check_finite and not is_finite(t):
                raise WeightsmithError(
                    f"tensor '{name}' in {s.source} contains NaN or Inf; fix or re-download that checkpoint"
                )
            out.append(t)
        return out

    def size(name: str) -> int:
        return sum(s.meta(name).nbytes for s in sources(name))

    results: dict[str, Any] = {}
    behind = WriteBehind(writer.add) if writer is not None else None
    reader = ReadAhead(order, read, size=size, budget=prefetch_bytes, background=prefetch_bytes > 0)
    try:
        with reader:
            for name, tensors in track(reader, description, len(order)):
                first = tensors[0]
                if name not in picked:
                    if behind is not None:
                        behind.put(name, first, dtype if first.is_floating_point() else None)
                    continue
                try:
                    result = fn(name, tensors)
                except WeightsmithError:
                    raise
                except (RuntimeError, ValueError) as exc:
                    raise WeightsmithError(f"{verb} tensor '{name}' failed: {exc}") from exc
                del tensors
                if behind is None:
                    results[name] = result
                    continue
                target = dtype or (first.dtype if keep_dtype else None)
                if target is not None and isinstance(result, Tensor) and result.is_cuda:
                    result = result.to(target)  # cast before the copy: fewer bytes cross the bus
                behind.put(name, result, target)
        if behind is not None:
            behind.finish()
    finally:
        if behind is not None:
            behind.close()
    return results


def map_weights(
    fn: Callable[..., Any],
    *stores: WeightStore,
    select: Selector | None = None,
    device: str | torch.device | None = "cpu",
    writer: ShardWriter | None = None,
    passthrough: bool = True,
    description: str = "weights",
    prefetch_bytes: int = 0,
) -> dict[str, Any]:
    """Apply ``fn(*tensors)`` to every selected name common to ``stores`` (shapes checked up front).

    With a ``writer``, tensor results are streamed to disk (and unselected tensors of the first store
    copied through when ``passthrough``); nothing is kept in memory and ``{}`` is returned. Without one,
    ``{name: result}`` is returned. ``prefetch_bytes > 0`` reads that far ahead on a background thread.
    """
    if not stores:
        raise ValueError("map_weights needs at least one store")
    selected = common_names(stores, select)
    order = list(stores[0]) if writer is not None and passthrough else selected
    return stream(
        stores,
        lambda _name, tensors: fn(*tensors),
        names=order,
        chosen=selected,
        writer=writer,
        device=device,
        prefetch_bytes=prefetch_bytes,
        description=description,
    )
