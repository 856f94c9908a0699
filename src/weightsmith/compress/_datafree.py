"""Data-free compression (RTN, HQQ, ...) one weight at a time, wherever the model lives.

A data-free method reads each weight once and writes it back once. Two cases:

- **The weights are already where the arithmetic runs** (a model on the GPU compressed with
  ``device="cuda"``, or a CPU model on the CPU): :func:`_resident` quantises each float32 weight in place of
  its parameter, with no copy of the parameter (a float32 weight is read through an alias; a bfloat16 one is
  cast once; a Conv1D one, stored transposed, is made contiguous once), writes ``Ŵ`` back with one device
  copy, and reads the per-layer errors back in groups of :data:`LOG_EVERY` (one device sync a group, not
  one a layer). Nothing goes through the host. A method that can quantise a stack of same-shaped weights at
  once (``batched_quantize``, see :data:`BatchQuantize`; RTN) gets them in batches instead (:func:`_batched`;
  on a CPU one weight a run, a float32 one read in place, see :data:`BATCH_DEVICES`): on a GPU
  the weights of one shape and dtype are stacked ``[L, out, in]`` in float32 within :data:`BATCH_BYTES` of
  temporaries and go through one set of kernels, so the host launches a few dozen kernels a batch instead of
  a layer. The results are bit-identical to the layer-by-layer loop: min and max are exact, every other step
  is elementwise, and the errors are summed row by row (:func:`relative_error`). Where the method also has
  an in-place one-kernel quantiser (``fused_quantize``, see :func:`fused_quantizer`; RTN's Triton kernel,
  compress/_rtn_triton.py) and the device is in :data:`FUSED_DEVICES` with Triton installed, that runs
  instead (:func:`_fused`), one launch a run of same-shaped weights (the runs of :func:`batches`, with no
  float32 stack: the kernel reads each parameter where it is): each weight is read once and ``Ŵ`` written
  over it once, with its codes, scales and zeros bit-identical to the batches; only the errors' summation
  order differs (about 1e-7 relative). A run the kernel cannot take in place (Conv1D's transposed weights,
  another dtype or device) goes through the loop.
- **The model is in host memory and the arithmetic on a GPU**: :func:`_overlapped` moves exactly one copy of
  each weight to the device and one copy of ``Ŵ`` (in the weight's dtype) back, through a fixed ring of
  pinned slots (:class:`_Ring`, each as large as the largest weight, allocated once a call): weight ``i + 1``
  goes host → slot → device on a copy stream while weight ``i`` is quantised, and ``Ŵ_i`` comes back device
  → slot on another stream while the next one is; only the final copy into the parameter waits.
  (Page-locking each weight in place with ``cudaHostRegister`` instead of the two host copies was tried and
  measured slower on an H200 host, 0.51 vs 0.30 s for a 1.1B model, and removed.)

The arithmetic is the same in every case (same float32 operands, same kernels, or the fused kernel's same
operations), so the weights, codes and errors are bit-identical whichever path runs on a device (the fused
kernel's errors: up to summation order). Returning the codes instead of ``Ŵ`` and dequantising on the
host moves fewer bytes over PCIe but costs the host more than the copy it saves: measured on the CPU,
``(q − z)·s`` from uint8 codes runs at 1.5 GB/s of weight a thread against 8.7 GB/s for the float32 copy
(docs/compress.md, "Where the model lives").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layers import Layer
from ._grid import written

if TYPE_CHECKING:
    from ._core import Compressed

Quantize = Callable[[Tensor], "Compressed"]
# A stack [L, out, in] of float32 weights on the device → one result a weight and the stacked Ŵ [L, out, in]
# (new memory: the caller then turns the stack into W − Ŵ in place)
BatchQuantize = Callable[[Tensor], tuple[list["Compressed"], Tensor]]
# The layers' own weights, one shape and dtype ([out, in] each, on the device) → one result each and their
# ‖W − Ŵ‖_F / ‖W‖_F as a float32 tensor [L]; every W is overwritten with its Ŵ in place
FusedQuantize = Callable[[list[Tensor]], tuple[Sequence["Compressed"], Tensor]]
# Float32 temporaries of one batch: the stack of weights (made W − Ŵ in place) and Ŵ, 8 bytes a weight; a
# model that barely fits the GPU still has room for them. Weights larger than half of it go one at a time.
BATCH_BYTES = 512 << 20
# Where batches are stacked: a GPU spends most of a layer launching kernels; a CPU is bound by the arithmetic,
# which runs faster on one weight at a time (it stays in cache: SmolLM2's 210 layers, one thread, 2.7x slower
# in stacks of 512 MB, equal at 2 MB; docs/compress.md, "Where the model lives"). Elsewhere the batched
# quantiser still runs, a weight a run read in place (Ŵ from the float codes, no uint8 codes made and read
# back: SmolLM2 RTN 0.217 → 0.188 s median on two threads, the same bits).
BATCH_DEVICES = ("cuda",)
# Where a method's ``fused_quantize`` (one kernel a weight, in place) replaces its batches when Triton
# imports; without Triton the batches run (compress/_rtn_triton.py; tests run it on the CPU under
# TRITON_INTERPRET)
FUSED_DEVICES: tuple[str, ...] = ("cuda",)
MAX_RUN = 65535  # weights a fused launch takes at most (CUDA's grid has at most 65535 blocks along y)
LOG_EVERY = 16  # layers between two read-backs of the errors (each read-back is one device sync)
SLOTS = 2  # pinned slots each way: weight i + 1 is staged while weight i is on the device


@dataclass
class DataFreeResult:
    layer: Layer
    compressed: Compressed
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F


def frobenius(X: Tensor) -> Tensor:
    """‖X‖_F over the last two dims of ``X`` [..., out, in] as float64 [...]: each row's norm in float32,
    then the norm of those in float64. Each row is reduced alone, so a weight's norm does not depend on the
    other weights stacked with it (a whole-tensor reduction splits its sum by the tensor's size)."""
    return torch.linalg.vector_norm(torch.linalg.vector_norm(X, dim=-1), dim=-1, dtype=torch.float64)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return (num / den.clamp_min(1e-30)).float()


def relative_error(W: Tensor, W_hat: Tensor) -> Tensor:
    """‖W − Ŵ‖_F / ‖W‖_F (float32) over the last two dims, on W's device (no host sync)."""
    return _ratio(frobenius(W - W_hat), frobenius(W))


class _Errors:
    """Per-layer results whose errors are still 0-d device tensors; :meth:`flush` reads them all at once."""

    def __init__(self) -> None:
        self.items: list[tuple[Layer, Compressed, Tensor]] = []

    def add(self, ly: Layer, qw: Compressed, err: Tensor) -> None:
        self.items.append((ly, qw, err))

    def flush(self) -> Iterator[DataFreeResult]:
        values = torch.stack([e for *_, e in self.items]).tolist()
        for (ly, qw, _), v in zip(self.items, values, strict=True):
            yield DataFreeResult(ly, qw, float(v))
        self.items.clear()


def _one(ly: Layer, quantize: Quantize, dev: torch.device) -> tuple[Compressed, Tensor]:
    """One layer through ``quantize``: the parameter itself when already float32 on ``dev`` (an alias: the
    error is taken before ``Ŵ`` overwrites it), else a copy on ``dev``; Conv1D's transposed weight is made
    contiguous (one copy on ``dev``) so that every path sums the error in the same order. A quantised result
    then drops its codes where they are recoverable from the written ``Ŵ`` (compress/_grid.py ``written``;
    its scales' check is one device sync)."""
    W = ly.weight().detach().to(dev, torch.float32).contiguous()
    qw = quantize(W)
    W_hat = qw.dequantize()
    err = relative_error(W, W_hat)
    ly.write(W_hat)
    return _written_at([ly], [qw])[0], err


def _written_at(
    layers: Sequence[Layer], results: Sequence[Compressed], check: bool = True
) -> list[Compressed]:
    """``results`` once each one's ``Ŵ`` is written into its layer of ``layers`` (compress/_grid.py
    ``written``: codes dropped where they are recoverable from the layer's weight)."""
    return written(results, [(ly.weight, ly.name) for ly in layers], check)


def _resident(
    layers: Sequence[Layer], quantize: Quantize, dev: torch.device, batched: BatchQuantize | None = None
) -> Iterator[DataFreeResult]:
    """Layer by layer on ``dev`` (:func:`_one`). With ``batched``, on a device of :data:`BATCH_DEVICES`: the
    method's fused kernel where it has one, it runs here and it is chosen (by cost, given what its start-up
    still costs in this process: :func:`fused_quantizer`, :func:`_fused`), else same-shaped weights in
    stacks (:func:`_batched`)."""
    runs = _looped(layers, quantize, dev)
    if batched is not None and dev.type in BATCH_DEVICES:
        from ._rtn_choice import launched, primed_after

        weights = [ly.weight() for ly in layers]
        fused = fused_quantizer(batched, dev, weights)
        config = getattr(batched, "__self__", None)
        if fused is None:  # then the kernel, if it was only cold, is primed for a later call
            runs = primed_after(_batched(layers, batched, dev), weights, config, dev)
        else:  # the kernel's variants are warm once it has run (a later call pays no start-up)
            runs = launched(_fused(layers, fused, quantize, dev), weights, config, dev)
    elif batched is not None:  # a weight a run (it stays in cache), Ŵ straight from the float codes
        runs = _batched(layers, batched, dev, budget=0)
    return _in_order(layers, runs)


def batches(layers: Sequence[Layer], budget: int) -> list[list[int]]:
    """Indices of ``layers`` in runs of one weight shape, dtype and device whose float32 stack and Ŵ fit in
    ``budget`` bytes (at least one weight a run), ordered by their first layer."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, ly in enumerate(layers):
        W = ly.weight()
        groups.setdefault((tuple(W.shape), W.dtype, W.device), []).append(i)
    runs = []
    for idx in groups.values():
        n = max(1, budget // (8 * layers[idx[0]].weight().numel()))
        runs += [idx[k : k + n] for k in range(0, len(idx), n)]
    return sorted(runs)


def _stack(layers: Sequence[Layer], dev: torch.device) -> Tensor:
    """The weights of ``layers`` (one shape) as one float32 [L, out, in] on ``dev``, one copy kernel (a cast
    and, for Conv1D, a transpose on the way)."""
    Ws = [ly.weight().detach() for ly in layers]
    if Ws[0].device != dev:
        Ws = [W.to(dev) for W in Ws]
    return torch.stack(Ws, out=torch.empty((len(Ws), *Ws[0].shape), dtype=torch.float32, device=dev))


# A run of :func:`batches` done: its layers' indices, one result each and their errors (float32 [L] or a list
# of 0-d tensors, on the device)
Run = tuple[list[int], Sequence["Compressed"], Tensor | Sequence[Tensor]]


def _looped(layers: Sequence[Layer], quantize: Quantize, dev: torch.device) -> Iterator[Run]:
    """Every layer a run of its own, through :func:`_one`."""
    for i, ly in enumerate(layers):
        qw, err = _one(ly, quantize, dev)
        yield [i], [qw], [err]


def _batched(
    layers: Sequence[Layer], quantize: BatchQuantize, dev: torch.device, budget: int = BATCH_BYTES
) -> Iterator[Run]:
    """The weights in runs of :func:`batches` within ``budget`` (0: one weight a run, read in place where it
    is float32 on ``dev``): each run stacked, quantised in one go, its errors taken with one reduction each
    way and every ``Ŵ`` written back; then each result reads its codes from its layer (RTN's batches make
    none; where the layer's dtype cannot give them back exactly they are recovered now from the float32
    ``Ŵ`` and kept: compress/_grid.py ``written``, one device sync a run)."""
    for run in batches(layers, budget):
        W0 = layers[run[0]].weight().detach()
        in_place = budget == 0 and W0.dtype == torch.float32 and W0.device == dev and W0.is_contiguous()
        Ws = W0.unsqueeze(0) if in_place else _stack([layers[i] for i in run], dev)
        results, W_hat = quantize(Ws)
        den = frobenius(Ws)
        diff = Ws - W_hat if in_place else Ws.sub_(W_hat)  # a copied stack is ours: W − Ŵ in place
        errs = _ratio(frobenius(diff), den)
        for j, i in enumerate(run):
            layers[i].write(W_hat[j])
        yield run, _written_at([layers[i] for i in run], results), errs


def _fused(
    layers: Sequence[Layer], fused: FusedQuantize, quantize: Quantize, dev: torch.device
) -> Iterator[Run]:
    """The weights in runs of :func:`batches`, each run quantised in place by one call of the method's fused
    kernel; a run the kernel cannot take in place (Conv1D's transposed weights, another dtype or device)
    goes through :func:`_one`, a layer at a time. A run is every weight of a shape (up to :data:`MAX_RUN`):
    the kernel makes no temporaries to bound. The kernel keeps no codes where they are recoverable; each
    result then reads them from its layer (their scales are checked at that read: no sync here)."""
    runs = batches(layers, 1 << 62)
    for run in (r[k : k + MAX_RUN] for r in runs for k in range(0, len(r), MAX_RUN)):
        Ws = [layers[i].weight().detach() for i in run]
        if all(_fusable(W, dev) for W in Ws):
            results, errs = fused(Ws)
            yield run, _written_at([layers[i] for i in run], results, check=False), errs
        else:
            done = [_one(layers[i], quantize, dev) for i in run]
            yield run, [qw for qw, _ in done], [e for _, e in done]


def _in_order(layers: Sequence[Layer], runs: Iterator[Run]) -> Iterator[DataFreeResult]:
    """The results of ``runs`` in layer order, their errors read back in groups of :data:`LOG_EVERY` (one
    device sync a group)."""
    done: dict[int, tuple[Compressed, Tensor]] = {}
    errors, nxt = _Errors(), 0
    for run, results, errs in runs:
        if isinstance(errs, Tensor):
            errs = errs.unbind()  # one call for the run's views
        for j, i in enumerate(run):
            done[i] = (results[j], errs[j])
        while nxt in done:
            errors.add(layers[nxt], *done.pop(nxt))
            nxt += 1
        if len(errors.items) >= LOG_EVERY:
            yield from errors.flush()
    if errors.items:
        yield from errors.flush()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _pinned(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _Ring:
    """``SLOTS`` pinned host buffers of ``nbytes`` each (allocated on first use), reused round-robin: slot
    ``i % SLOTS`` holds weight ``i``. ``free[k]`` is the event after which slot ``k`` may be overwritten."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.buf: list[Tensor | None] = [None] * SLOTS
        self.free: list[torch.cuda.Event | None] = [None] * SLOTS

    def view(self, i: int, like: Tensor) -> Tensor:
        """Slot ``i % SLOTS`` as a contiguous tensor shaped like ``like`` (waits until the slot is free)."""
        k = i % SLOTS
        if (ev := self.free[k]) is not None:
            ev.synchronize()
            self.free[k] = None
        if (buf := self.buf[k]) is None:
            buf = self.buf[k] = _pinned(self.nbytes)
        return buf[: _nbytes(like)].view(like.dtype).view(like.shape)


class _HostPipeline:
    """The CUDA pipeline for weights in host memory (see the module docstring): weight ``i`` is quantised
    while weight ``i + 1`` comes in on one copy stream and ``Ŵ_{i−1}`` goes out on another."""

    def __init__(self, layers: Sequence[Layer], quantize: Quantize, dev: torch.device) -> None:
        self.layers, self.quantize, self.dev = layers, quantize, dev
        self.h2d, self.d2h = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        self.compute = torch.cuda.current_stream(dev)
        size = max(_nbytes(ly.weight()) for ly in layers)
        self.ring_in, self.ring_out = _Ring(size), _Ring(size)
        self.landing: list[tuple[int, torch.cuda.Event]] = []  # (layer, its D2H's event), oldest first

    def upload(self, i: int) -> tuple[Tensor, torch.cuda.Event]:
        W = self.layers[i].weight().detach()
        if not W.is_pinned():  # else: the caller's own pinned W goes as it is
            W = self.ring_in.view(i, W).copy_(W)  # pageable → pinned (a parallel CPU copy)
        with torch.cuda.stream(self.h2d):
            W_dev = W.to(self.dev, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.h2d)
        self.ring_in.free[i % SLOTS] = ready
        return W_dev, ready

    def download(self, i: int, out_dev: Tensor) -> None:
        """``Ŵ_i`` → its pinned slot."""
        self.d2h.wait_stream(self.compute)
        with torch.cuda.stream(self.d2h):
            self.ring_out.view(i, out_dev).copy_(out_dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        out_dev.record_stream(self.d2h)
        self.landing.append((i, done))

    def land(self) -> None:
        """The oldest result that went out: into its parameter (pinned → pageable)."""
        i, done = self.landing.pop(0)
        done.synchronize()
        ly = self.layers[i]
        ly.write(self.ring_out.view(i, ly.weight()))

    def run(self) -> Iterator[DataFreeResult]:
        errors = _Errors()
        nxt = self.upload(0)
        for i, ly in enumerate(self.layers):
            W_dev, ready = nxt
            self.compute.wait_event(ready)
            W_dev.record_stream(self.compute)  # allocated on the copy stream, read on this one
            W = W_dev.float().contiguous()  # as in _resident (a Conv1D weight may arrive transposed)
            qw = self.quantize(W)
            W_hat = qw.dequantize()
            # the codes are read back from the landed Ŵ when saved (none pile up on the device); the
            # scales are checked at that first read, as no host sync may stall this pipeline
            (qw,) = _written_at([ly], [qw], check=False)
            errors.add(ly, qw, relative_error(W, W_hat))
            out_dev = W_hat.to(W_dev.dtype)
            if i + 1 < len(self.layers):
                nxt = self.upload(i + 1)  # the next weight comes in while the device works on this one
            while len(self.landing) >= SLOTS:
                self.land()  # the result SLOTS layers back lands: its slot is free for this one
            self.download(i, out_dev)
            if len(errors.items) >= LOG_EVERY:
                yield from errors.flush()
        while self.landing:
            self.land()
        if errors.items:
            yield from errors.flush()


def _overlapped(layers: Sequence[Layer], quantize: Quantize, dev: torch.device) -> Iterator[DataFreeResult]:
    """The CUDA pipeline; every weight lives on the host (see the module docstring)."""
    return _HostPipeline(layers, quantize, dev).run() if layers else iter(())


def batch_quantizer(config: object) -> BatchQuantize | None:
    """``config.batched_quantize`` where the method has one (it opts in to :func:`_batched`), else None."""
    fn = getattr(config, "batched_quantize", None)
    return fn if callable(fn) else None


def fused_quantizer(
    batched: BatchQuantize, dev: torch.device, weights: Sequence[Tensor] | None = None
) -> FusedQuantize | None:
    """The in-place one-kernel quantiser of the method whose ``batched_quantize`` is ``batched`` (the
    method's ``fused_quantize``: RTN's), where it runs and is chosen: on a device of :data:`FUSED_DEVICES`,
    with Triton installed, unless ``$WEIGHTSMITH_RTN_KERNEL`` forces the batches, and, given the
    ``weights`` it would quantise, only where it beats the batches with the start-up it still has to pay
    in this process (:func:`._rtn_choice.choose`; Triton is not imported when it does not). None otherwise
    (the batches run)."""
    config = getattr(batched, "__self__", None)
    fn = getattr(config, "fused_quantize", None)
    if not callable(fn) or dev.type not in FUSED_DEVICES:
        return None
    from ._rtn_choice import choose, serialised

    return serialised(fn) if choose(config, dev, weights) else None


def _fusable(W: Tensor, dev: torch.device) -> bool:
    from ._rtn_triton import fusable

    return fusable(W, dev)


def compress_data_free(
    layers: Sequence[Layer],
    quantize: Quantize,
    dev: torch.device,
    overlap: bool | None = None,
    batched: BatchQuantize | None = None,
) -> Iterator[DataFreeResult]:
    """Compress every layer with ``quantize`` (float32 ``[out, in]`` on ``dev`` → a compressed weight), write
    the dequantised result back in place and yield one result per layer, in order.

    ``overlap``: the pipelined host → CUDA → host path (default: on CUDA when every weight is in host
    memory). Otherwise :func:`_resident`: no copy at all for weights already on ``dev``, or, with
    ``batched`` (:func:`batch_quantizer`), same-shaped weights quantised in stacks."""
    if overlap is None:
        overlap = dev.type == "cuda" and all(ly.weight().device.type == "cpu" for ly in layers)
    return _overlapped(layers, quantize, dev) if overlap else _resident(layers, quantize, dev, batched)
