"""Row shards: projected transforms that work on the rows of a gradient one process holds (FSDP2).

Under FSDP2 each process holds rows ``[offset, offset + m_i)`` of an m x n gradient ``G``. A GaLore-style
projection needs no full gradient: every quantity it uses is a sum over the row shards,

    G^T (G S)  = sum_i G_i^T (G_i S)          (n x k: the randomized range finder of the row space)
    (G Q)^T (G Q) = sum_i (G_i Q)^T (G_i Q)  (k x k: the small eigenproblem that ends it)
    P^T G      = sum_i P_i^T G_i              (r x n: a left projection, P's rows split as G's)

("Finding structure with randomness", Halko, Martinsson & Tropp, 2011, Alg. 4.4, written on ``G^T G``), so
one all-reduce of an n x k (or k x k, r x n) matrix replaces the all-gather of the m x n gradient, and a
right projection ``G P^T`` stays split by rows: its Adam moments are row-sharded DTensors, like the weight's.

:class:`Rows` tells a transform where its gradient lies; the optimizer sets it (:func:`use`) around the
update of a sharded weight. Outside that context :func:`rows` describes a whole gradient in one process, and
the same code computes the same thing without communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class Rows:
    """Rows ``[offset, offset + local)`` of an m x n gradient (``shape``); ``mesh`` is None in one process."""

    shape: tuple[int, int]
    offset: int = 0
    local: int = 0
    mesh: Any = None

    @property
    def split(self) -> bool:
        return self.mesh is not None

    def reduce(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the processes (``x`` itself in one process)."""
        if self.mesh is not None:
            dist.all_reduce(x, group=self.mesh.get_group())
        return x

    def take(self, whole: Tensor) -> Tensor:
        """This process's rows of a matrix with the gradient's m rows."""
        return whole[self.offset : self.offset + self.local] if self.split else whole

    def wrap(self, x: Tensor) -> Tensor:
        """Local rows as a row-sharded DTensor (so that checkpoints gather it); ``x`` in one process."""
        if self.mesh is None:
            return x
        shape = torch.Size((self.shape[0], *x.shape[1:]))
        stride = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
        return DTensor.from_local(x, self.mesh, [Shard(0)], shape=shape, stride=stride)


_CURRENT: ContextVar[Rows | None] = ContextVar("weightsmith_rows", default=None)


def rows(G: Tensor) -> Rows:
    """Where ``G`` lies: the rows set by :func:`use`, or the whole of ``G`` in one process."""
    current = _CURRENT.get()
    if current is not None:
        return current
    m, n = G.shape
    return Rows((int(m), int(n)), 0, int(m))


def local(x: Tensor) -> Tensor:
    """The local part of ``x`` (``x`` when it is not a DTensor)."""
    return x.to_local() if isinstance(x, DTensor) else x


def rows_of(grad: Tensor) -> Rows | None:
    """The :class:`Rows` of a 2-D DTensor sharded by rows on a 1-D mesh (FSDP2's layout); None otherwise."""
    if not isinstance(grad, DTensor) or grad.dim() != 2 or grad.device_mesh.ndim != 1:
        return None
    if tuple(grad.placements) != (Shard(0),):
        return None
    return _row_shard(tuple(int(s) for s in grad.shape), grad.device_mesh)


@lru_cache(maxsize=1024)
def _row_shard(shape: tuple[int, ...], mesh: Any) -> Rows:
    """This process's rows of a ``shape`` tensor sharded by rows on ``mesh`` (cached: computing it costs
    tens of microseconds, and the optimizer asks for every weight at every step)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh, [Shard(0)])
    return Rows((shape[0], shape[1]), int(offset[0]), int(local_shape[0]), mesh)


def current() -> Rows | None:
    """The rows set by :func:`use` (None outside it)."""
    return _CURRENT.get()


def reduce_many(parts: list[tuple[Tensor, Rows]]) -> None:
    """Sum each tensor over the processes of its :class:`Rows`' mesh, in place, with one all-reduce per
    process group and dtype: the tensors are flattened into one buffer (many small all-reduces cost a
    launch and a latency each; the sum of each element is the same). Tensors of one process are left as
    they are."""
    buckets: dict[tuple[int, torch.dtype], tuple[Any, list[Tensor]]] = {}
    for x, where in parts:
        if where.mesh is None:
            continue
        group = where.mesh.get_group()
        buckets.setdefault((id(group), x.dtype), (group, []))[1].append(x)
    for group, xs in buckets.values():
        if len(xs) == 1:
            dist.all_reduce(xs[0], group=group)
            continue
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.all_reduce(flat, group=group)
        start = 0
        for x in xs:
            x.copy_(flat[start : start + x.numel()].view_as(x))
            start += x.numel()


@contextmanager
def use(where: Rows) -> Iterator[None]:
    """Transforms called inside see their gradient as the rows ``where`` describes."""
    token = _CURRENT.set(where)
    try:
        yield
    finally:
        _CURRENT.reset(token)
