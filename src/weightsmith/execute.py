"""The one streaming executor: read-ahead, write-behind, device placement, progress, errors naming the tensor.

Every job that walks checkpoints tensor by tensor (merge, OPCM, analyze, and the coming compress job) runs
through here:

- :class:`Reader` reads the tensors of one item with a pool of positioned-read threads (``os.preadv``
  releases the GIL): on the CPU each byte is read once, from the page cache straight into the tensor; on a
  GPU once into a reused pinned staging slot and from there by one asynchronous copy on a side stream.
- :class:`ReadAhead` reads the next items on a background thread while the caller works on the current one,
  holding at most a byte budget (a :class:`ByteBudget`, which the write-behind shares) of read-but-unfinished
  inputs and unwritten results (an item larger than the budget is read only when nothing else is held). On a
  GPU the budget is :func:`device_budget`: the largest item's footprint (its inputs and its result, what
  mergekit holds at a time), and at most a fraction of the free device memory.
- :class:`WriteBehind` feeds a :class:`~weightsmith.store.ShardWriter` from a background thread, so the
  device-to-host copy, the dtype cast and serialisation overlap the next tensor's work.
- :func:`stream` combines the two over same-named tensors of several stores, with device placement, an
  optional finiteness check, progress, and errors that name the tensor (and the file, for bad inputs).

Both threads are joined on every way out (a finished run, a kernel error, NaN found, a full disk, Ctrl-C):
a thread still running while the interpreter shuts down is what aborts a process with "terminate called
without an active exception" (exit 134).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from .errors import ShapeMismatchError, WeightsmithError
from .progress import track
from .select import Selector
from .store import SafetensorsStore, ShardWriter, WeightStore

T = TypeVar("T")
R = TypeVar("R")
PREFETCH_BYTES = 1 << 28  # default read-ahead budget of a merge on the CPU
DEVICE_FRACTION = 0.5  # at most this fraction of the free GPU memory is held by read-ahead and write-behind
READ_CHUNK = 8 << 20  # bytes per positioned read, and per pinned staging slot


def read_threads() -> int:
    """Reader threads: ``$WEIGHTSMITH_READ_THREADS`` when set, else min(8, CPU count)."""
    raw = os.environ.get("WEIGHTSMITH_READ_THREADS", "").strip()
    if not raw:
        return min(8, os.cpu_count() or 1)
    if not raw.isdigit() or int(raw) < 1:
        raise WeightsmithError(f"WEIGHTSMITH_READ_THREADS={raw!r}: give a positive whole number of threads")
    return int(raw)


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


class Reader:
    """Read the same-named tensors of several stores onto ``device``, chunks of all of them at once.

    Each tensor of a :class:`~weightsmith.store.SafetensorsStore` is cut into ``chunk``-byte ranges that a
    pool of ``threads`` workers reads with positioned reads (``os.preadv`` releases the GIL, so the reads
    of the 5 inputs of a merge run in parallel). Every byte is copied once by the kernel, from the page
    cache straight into the destination tensor on the CPU; for a GPU (``staged``) into one of
    ``2 * threads`` reused pinned host slots and from there by one asynchronous host-to-device copy on a
    side stream (a slot is refilled once its copy is done), so the host holds no second copy of the
    checkpoint and no page of a fresh buffer is faulted in. ``staged=True`` on the CPU runs the same slot
    logic with plain host slots (for tests). Other stores are read with ``store[name].to(device)``.
    ``bytes_read`` / ``bytes_copied`` count the bytes read from files and copied out of staging slots.
    Use it in a ``with`` block (the pool's threads are joined on the way out). ``threads`` defaults to
    ``$WEIGHTSMITH_READ_THREADS``, else min(8, CPU count)."""

    def __init__(
        self,
        device: str | torch.device | None = "cpu",
        *,
        threads: int | None = None,
        chunk: int = READ_CHUNK,
        staged: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.staged = self.device.type != "cpu" if staged is None else staged
        self.threads, self.chunk = max(1, threads or read_threads()), max(1, chunk)
        self.bytes_read = self.bytes_copied = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._slots: queue.Queue[tuple[Tensor, Any]] | None = None
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._consumer = torch.cuda.current_stream(self.device) if self.cuda else None

    def _start(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="weightsmith-read")
        if self.staged and self._slots is None:
            self._slots = queue.Queue()
            for _ in range(2 * self.threads):
                self._slots.put((torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.cuda), None))
        return self._pool

    def _empty(self, nbytes: int) -> Tensor:
        if self._side is None:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(self._side):  # its pool: the copies into it run on this stream
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _read_chunk(self, store: SafetensorsStore, name: str, dst: Tensor, start: int) -> None:
        n = dst.numel()
        if not self.staged:
            store.read_into(name, dst, start)
        else:
            assert self._slots is not None
            slot, done = self._slots.get()
            try:
                if done is not None:
                    done.synchronize()  # the slot's previous copy has left it
                    done = None
                buf = slot[:n]
                store.read_into(name, buf, start)
                if self._side is not None:
                    with torch.cuda.stream(self._side):
                        dst.copy_(buf, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(self._side)
                else:
                    dst.copy_(buf)
            finally:
                self._slots.put((slot, done))
            with self._lock:
                self.bytes_copied += n
        with self._lock:
            self.bytes_read += n

    def read(self, pairs: Sequence[tuple[WeightStore, str]]) -> list[Tensor]:
        """``store[name]`` on the device for each ``(store, name)``, read in parallel."""
        out: list[Tensor] = []
        jobs: list[tuple[SafetensorsStore, str, Tensor, int]] = []
        for store, name in pairs:
            if not isinstance(store, SafetensorsStore):
                out.append(store[name].to(self.device))
                continue
            meta = store.meta(name)
            raw = self._empty(meta.nbytes)
            out.append(raw.view(meta.dtype).reshape(meta.shape))
            jobs += [(store, name, raw[a : a + self.chunk], a) for a in range(0, meta.nbytes, self.chunk)]
        if not jobs:
            return out
        pool = self._start()
        futures = [pool.submit(self._read_chunk, *job) for job in jobs]
        errors = [f.exception() for f in futures]  # wait for all: no worker may still write into `out`
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        if self._side is not None and self._consumer is not None:
            self._side.synchronize()  # the copies are done: the tensors are ready on any stream
            for t in out:
                if t.is_cuda:
                    t.record_stream(self._consumer)  # not reused by the side stream while still in use
        return out

    def side(self) -> Any:
        """A context in which work queued on the device runs on the reader's side stream (on the CPU:
        nothing changes), so checking a tensor just read waits only for the reads."""
        return torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Join the pool's threads and drop the staging slots."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._slots is not None:
            while not self._slots.empty():
                _, done = self._slots.get_nowait()
                if done is not None:
                    done.synchronize()
            self._slots = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def device_budget(device: torch.device, footprint: int, free: int | None = None) -> int:
    """Bytes that read-ahead and write-behind may hold on ``device`` (inputs read, results not yet written).

    On the CPU: :data:`PREFETCH_BYTES`. On a GPU: ``min(footprint, DEVICE_FRACTION * free)``, where
    ``footprint`` is the largest single item's inputs plus its result. That is what mergekit holds at a time
    (one tensor of every input and the merged tensor), so read-ahead never raises the peak above it: small
    tensors are read ahead while a large one is merged only if they fit beside it, and the largest item is
    read when nothing else is held. ``free`` defaults to the device's free memory now."""
    if device.type == "cpu":
        return PREFETCH_BYTES
    if free is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else footprint
    return max(1, min(footprint, int(DEVICE_FRACTION * free)))


class ByteBudget:
    """Bytes held against a limit, shared by a :class:`ReadAhead` (inputs read, not yet finished) and a
    :class:`WriteBehind` (results not yet written). ``peak`` is the most ever held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        with self.cond:
            self.held += n
            self.peak = max(self.peak, self.held)

    def give(self, n: int) -> None:
        with self.cond:
            self.held -= n
            self.cond.notify_all()


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
        budget: int | ByteBudget = PREFETCH_BYTES,
        depth: int | None = None,
        background: bool = True,
    ) -> None:
        self.items, self.read = list(items), read
        self.size = size or (lambda _item: 0)
        self.budget = budget if isinstance(budget, ByteBudget) else ByteBudget(budget)
        self.depth, self.background = depth, background
        self._q: queue.Queue[Any] = queue.Queue()
        self._cond = self.budget.cond
        self._held_items, self._stop = 0, False
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        try:
            for item in self.items:
                need = self.size(item)
                with self._cond:
                    while not self._stop and (self._held_items or self.budget.held) and self._full(need):
                        self._cond.wait()
                    if self._stop:
                        return
                    self.budget.take(need)
                    self._held_items += 1
                self._q.put((item, self.read(item), need))
        except BaseException as exc:  # handed to the caller, which re-raises it
            self._q.put(_Failed(exc))
            return
        self._q.put(_DONE)

    def _full(self, need: int) -> bool:
        over = self.budget.held + need > self.budget.limit
        return over or (self.depth is not None and self._held_items >= self.depth)

    def _release(self, need: int) -> None:
        with self._cond:
            self._held_items -= 1
            self.budget.give(need)

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

    def __init__(
        self, add: Callable[[str, Tensor], None], depth: int = 2, budget: ByteBudget | None = None
    ) -> None:
        self.add = add
        self.budget = budget  # each queued tensor's bytes are held against it until written
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._cancel = False
        self._thread = threading.Thread(target=self._work, daemon=True, name="weightsmith-write")
        self._thread.start()

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            name, tensor, dtype, held = item
            del item
            t: Tensor | None = None
            try:
                if self.error is None and not self._cancel:
                    t = tensor.to("cpu")
                    del tensor  # the device copy is freed before the (slow) write
                    self.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            except BaseException as exc:
                self.error = exc
            finally:
                tensor = t = None
                if self.budget is not None and held:
                    self.budget.give(held)

    def put(self, name: str, tensor: Tensor, dtype: torch.dtype | None = None) -> None:
        if self.error is not None:
            raise self.error
        if dtype is not None and tensor.device.type != "cpu" and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # cast on the device (queued, not waited for): fewer bytes to copy
        held = tensor.numel() * tensor.element_size() if self.budget is not None else 0
        if held:
            self.budget.take(held)  # type: ignore[union-attr]
        self._q.put((name, tensor, dtype, held))

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
    prefetch_bytes: int | None = None,
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

    Inputs are read by a :class:`Reader`; ``prefetch_bytes`` bounds what is held at once (inputs read
    ahead, the item being worked on and, with a writer, results not yet written, each result counted from
    the moment its item is read); ``None``: :func:`device_budget`, 0: no read-ahead thread.
    """
    if not stores:
        raise ValueError("stream needs at least one store")
    order = list(names) if names is not None else list(stores[0])
    picked = set(order) if chosen is None else set(chosen)
    dev = resolve_device(device)

    def sources(name: str) -> Sequence[WeightStore]:
        return stores if name in picked else stores[:1]

    def size(name: str) -> int:
        need = sum(s.meta(name).nbytes for s in sources(name))
        if writer is None or name not in picked:
            return need
        meta = stores[0].meta(name)  # its result, written behind: the first input's shape, in ``dtype``
        if dtype is None or not meta.dtype.is_floating_point:
            return need + meta.nbytes
        return need + meta.nbytes // meta.dtype.itemsize * dtype.itemsize

    limit = prefetch_bytes
    if limit is None:
        limit = device_budget(dev, max((size(n) for n in order), default=0))
    budget = ByteBudget(limit)
    results: dict[str, Any] = {}
    with Reader(dev) as rd:

        def read(name: str) -> list[list[Tensor]]:
            """The tensors, in a box the consumer empties: so no one else (a progress bar holding the
            last item) keeps them alive after the item's bytes are given back to the budget."""
            srcs = sources(name)
            out = rd.read([(s, name) for s in srcs])
            if check_finite:
                with rd.side():
                    for s, t in zip(srcs, out, strict=True):
                        if not is_finite(t):
                            raise WeightsmithError(
                                f"tensor '{name}' in {s.source} contains NaN or Inf; fix or re-download "
                                "that checkpoint"
                            )
            return [out]

        behind = WriteBehind(writer.add, budget=budget) if writer is not None else None
        reader = ReadAhead(order, read, size=size, budget=budget, background=limit > 0)
        try:
            with reader:
                for name, box in track(reader, description, len(order)):
                    tensors = box.pop()
                    first = tensors[0]
                    target = dtype or (first.dtype if keep_dtype else None)
                    if name not in picked:
                        if behind is not None:
                            behind.put(name, first, dtype if first.is_floating_point() else None)
                        del first, tensors
                        continue
                    del first
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
                    if target is not None and isinstance(result, Tensor) and result.is_cuda:
                        result = result.to(target)  # cast before the copy: fewer bytes cross the bus
                    behind.put(name, result, target)
                    del result
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
