"""Which weights to analyse, how they are grouped into same-shaped batches, and how they are read.

Reading is the only part of an analysis that cannot run on the accelerator: on CUDA the next batch is
read and copied to the device in its stored dtype (``read_device``) by the executor's read-ahead thread
(``weightsmith.execute.ReadAhead``) while the GPU works on the current one, and the host never waits for
results until the end of the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch

from ..select import Selector
from ..store import WeightStore
from .conv import layer_shape

MIN_EVALS = 8  # WeightWatcher's min_evals: a layer with fewer eigenvalues (M * rf) has no ESD


def candidate_matrices(
    store: WeightStore, select: Selector | str | None, min_side: int = MIN_EVALS, kernels: bool = False
) -> tuple[list[str], list[dict[str, str]]]:
    """Names of analysable floating weights and ``{"name", "reason"}`` for every other tensor.

    2-D weights (and with ``kernels`` Conv1d (3-D) and Conv2d (4-D) kernels) are analysable when their
    ESD (``M * rf`` eigenvalues as WeightWatcher counts them, ``conv.layer_shape``) has at least
    ``min_side`` values.
    """
    sel = Selector.of(select)
    names = sel.require(list(store), "tensors") if sel.include else sel.filter(store)
    keep, skipped = [], []
    for name in names:
        meta = store.meta(name)
        view = layer_shape(meta.shape) if kernels or len(meta.shape) == 2 else None
        if view is None:
            only = "only 2-D weights and Conv1d/Conv2d kernels" if kernels else "only 2-D weights"
            what = f"{len(meta.shape)}-D tensor of shape {list(meta.shape)}"
            skipped.append({"name": name, "reason": f"{what}; {only}"})
        elif not meta.dtype.is_floating_point:
            skipped.append(
                {"name": name, "reason": f"non-floating dtype {str(meta.dtype).removeprefix('torch.')}"}
            )
        elif view.num_evals < min_side:
            what = "smaller side" if view.rf == 1 else "eigenvalue count M * rf"
            skipped.append(
                {"name": name, "reason": f"{what} {view.num_evals} < {min_side}: too few eigenvalues"}
            )
        else:
            keep.append(name)
    return keep, skipped


def shape_batches(
    store: WeightStore, names: list[str], max_bytes: int, transposed_alike: bool = True
) -> Iterator[tuple[tuple[int, int], list[str]]]:
    """Group names by shape and split groups into batches of at most ``max_bytes`` (as float32).

    With ``transposed_alike`` the key is (short side, long side), so W and W^T shapes batch together.
    """
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n in names:
        s = store.meta(n).shape
        groups[(min(s), max(s)) if transposed_alike else (s[0], s[1])].append(n)
    for shape, members in groups.items():
        per = max(1, max_bytes // (shape[0] * shape[1] * 4))
        for i in range(0, len(members), per):
            yield shape, members[i : i + per]


def read_host(store: WeightStore, names: list[str]) -> list[torch.Tensor]:
    """The named tensors in their stored dtype on the host (the CPU analysis reads them in place)."""
    return [store[n] for n in names]


_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


def read_device(store: WeightStore, names: list[str], device: torch.device) -> list[torch.Tensor]:
    """The named tensors in their stored dtype on CUDA ``device``, the copies finished.

    No pinned memory: allocating it (``cudaHostAlloc``) cost ~1 s per GB of weights on an H200 host,
    while a copy from ordinary memory runs at several GB/s and, done in the read-ahead thread, hides
    behind the GPU's work. Each tensor is read into host memory and copied synchronously on a side
    stream, so the data are on the device when this returns; the consumer marks them as used on its own
    stream (``to_device_batch`` does) so that the allocator reuses their memory only after that use. The
    cast to float32 is left to the GPU.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()  # this thread's
    side = _COPY_STREAMS.get(index)
    if side is None:
        side = _COPY_STREAMS[index] = torch.cuda.Stream(index)
    out = []
    for n in names:
        t = store[n]
        if t.is_cuda:  # an in-memory store of device tensors: nothing to copy
            out.append(t)
            continue
        with torch.cuda.stream(side):
            dst = torch.empty(t.shape, dtype=t.dtype, device=torch.device("cuda", index))
            dst.copy_(t)  # host-synchronous (pageable source): done when copy_ returns
        out.append(dst)
    side.synchronize()  # a no-op after synchronous copies; certain whatever the source was
    return out


def short_side_first(W: torch.Tensor) -> torch.Tensor:
    """A view of ``W`` with the shorter side as rows (no copy)."""
    return W.T if W.shape[0] > W.shape[1] else W


def to_device_batch(host: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack tensors (host, or already on ``device``) as float32 ``(B, short, long)`` on ``device``.

    CUDA inputs are marked as used on the current stream (``Tensor.record_stream``): ``read_device``
    allocates them on its side stream.
    """
    if device.type == "cuda":
        for t in host:
            if t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))
    mats = [short_side_first(t.to(device, non_blocking=True).float()) for t in host]
    return torch.stack(mats)


def oversized(store: WeightStore, names: list[str], max_bytes: int) -> tuple[list[str], list[str]]:
    """Split ``names`` into matrices that fit ``max_bytes`` as float32 and those that do not (2-D only):
    the latter are for ``sketch.streamed_norm_metrics``, which reads them in row blocks."""
    fit: list[str] = []
    big: list[str] = []
    for n in names:
        shape = store.meta(n).shape
        (big if len(shape) == 2 and shape[0] * shape[1] * 4 > max_bytes else fit).append(n)
    return fit, big
