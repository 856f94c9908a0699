"""Data-free compression (RTN, HQQ, ...) one weight at a time, with the host-device traffic overlapped.

A data-free method reads each weight once and writes it back once, so with the model in host memory and the
arithmetic on a GPU the job is bound by the two copies, not by the quantiser. On CUDA each weight goes
host → pinned buffer → device on a copy stream while the previous weight is quantised, and its result
comes back device → pinned buffer on another stream while the next one is; only the final copy into the
parameter waits. The arithmetic is the plain loop's (same float32 operands, same kernels), so the results
are identical; the per-layer errors are read back in groups instead of one device sync per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layers import Layer

if TYPE_CHECKING:
    from ._core import Compressed

Quantize = Callable[[Tensor], "Compressed"]
LOG_EVERY = 16  # layers between two read-backs of the errors (each read-back is one device sync)


@dataclass
class DataFreeResult:
    layer: Layer
    compressed: Compressed
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F


def relative_error(W: Tensor, W_hat: Tensor) -> Tensor:
    """‖W − Ŵ‖_F / ‖W‖_F as a 0-d tensor on W's device (no host sync)."""
    return (W - W_hat).norm() / W.norm().clamp_min(1e-30)


def _plain(layers: Sequence[Layer], quantize: Quantize, dev: torch.device) -> Iterator[DataFreeResult]:
    for ly in layers:
        W = ly.weight().detach().to(dev, torch.float32, copy=True)
        qw = quantize(W)
        W_hat = qw.dequantize()
        ly.write(W_hat)
        yield DataFreeResult(ly, qw, float(relative_error(W, W_hat.to(W.device))))


def _overlapped(layers: Sequence[Layer], quantize: Quantize, dev: torch.device) -> Iterator[DataFreeResult]:
    """The CUDA pipeline; every weight lives on the host (see :func:`compress_data_free`)."""
    h2d, d2h = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    compute = torch.cuda.current_stream(dev)

    def upload(ly: Layer) -> Tensor:
        src = ly.weight().detach()
        host = src if src.is_pinned() else torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
        with torch.cuda.stream(h2d):
            # the caching host allocator keeps `host` alive until this copy is done
            return host.to(dev, non_blocking=True)

    pending: list[tuple[Layer, Compressed, Tensor, Tensor, torch.cuda.Event]] = []
    errors: list[tuple[Layer, Compressed, Tensor]] = []

    def land(item: tuple[Layer, Compressed, Tensor, Tensor, torch.cuda.Event]) -> None:
        ly, qw, host_out, err, done = item
        done.synchronize()
        ly.write(host_out)
        errors.append((ly, qw, err))

    def flush() -> Iterator[DataFreeResult]:
        values = torch.stack([e for _, _, e in errors]).tolist() if errors else []
        for (ly, qw, _), v in zip(errors, values, strict=True):
            yield DataFreeResult(ly, qw, float(v))
        errors.clear()

    nxt = upload(layers[0]) if layers else None
    for i, ly in enumerate(layers):
        assert nxt is not None
        compute.wait_stream(h2d)
        W_dev = nxt
        W_dev.record_stream(compute)
        W = W_dev.float()
        qw = quantize(W)
        target_dtype = ly.weight().dtype
        W_hat = qw.dequantize()
        err = relative_error(W, W_hat)
        out_dev = W_hat.to(target_dtype)
        host_out = torch.empty(out_dev.shape, dtype=target_dtype, pin_memory=True)
        d2h.wait_stream(compute)
        with torch.cuda.stream(d2h):
            host_out.copy_(out_dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(d2h)
        out_dev.record_stream(d2h)
        nxt = upload(layers[i + 1]) if i + 1 < len(layers) else None  # host copy while the device works
        if pending:
            land(pending.pop())
        pending.append((ly, qw, host_out, err, done))
        if len(errors) >= LOG_EVERY:
            yield from flush()
    while pending:
        land(pending.pop())
    yield from flush()


def compress_data_free(
    layers: Sequence[Layer], quantize: Quantize, dev: torch.device, overlap: bool | None = None
) -> Iterator[DataFreeResult]:
    """Compress every layer with ``quantize`` (float32 ``[out, in]`` on ``dev`` → a compressed weight), write
    the dequantised result back in place and yield one result per layer, in order.

    ``overlap``: the pipelined CUDA path (default: on CUDA when every weight is in host memory)."""
    if overlap is None:
        overlap = dev.type == "cuda" and all(ly.weight().device.type == "cpu" for ly in layers)
    return (_overlapped if overlap else _plain)(layers, quantize, dev)
