"""Merge methods that are a pure function of one weight's tensors (the base's and each model's).

Every mergekit method beyond the task-arithmetic rows (SLERP, Model Stock, DELLA, breadcrumbs, SCE, ...)
is a :class:`TensorwiseMethod`: a frozen config whose :meth:`~TensorwiseMethod.merge` maps the tensors of
one weight name to the merged tensor, knowing nothing of names or files. ``run`` streams a whole model
through the shared executor (``_core.write_model``) with that kernel.

The helpers here are the pieces the generalised-task-arithmetic frame of mergekit shares among DELLA,
breadcrumbs and SCE: the L1 rescale of a sparsified task vector and the TIES sign election (Yadav et al.,
"TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..execute import resolve_device
from ..store import SafetensorsStore, WeightStore
from . import _core

Weights = Sequence[float] | None  # one weight per model; None: 1.0 each
Gen = torch.Generator | None  # the random source of ``random`` methods


CPU_PIECE = 1 << 17  # elements per piece on CPU: the kernels' float32 scratch stays in cache
GPU_PIECE = (
    1 << 24
)  # on a GPU: few launches, and scratch bounded (64 MiB of float32) for a 128k-vocab embedding
GPU_WRITE_PIECE = 1 << 20  # pieces of the elementwise (write) passes on a GPU: 4 MiB of float32 scratch


def piece_size(device: torch.device) -> int:
    """Elements per piece of the piecewise kernels on ``device``."""
    return CPU_PIECE if device.type == "cpu" else GPU_PIECE


def write_piece_size(device: torch.device) -> int:
    """Elements per piece of an elementwise pass on ``device``. On a GPU every element goes through the
    same kernel code whatever the piece, so small pieces change no result and bound the float32 scratch
    beside a whole-tensor output; on the CPU the pieces of :func:`piece_size` (a vectorised loop and its
    scalar tail may round differently, so the pieces must not move)."""
    return CPU_PIECE if device.type == "cpu" else GPU_WRITE_PIECE


_OWNED: ContextVar[bool] = ContextVar("weightsmith_inputs_owned", default=False)


def inputs_owned() -> bool:
    """Whether the kernel now running was handed tensors that only it holds (see :func:`owning_inputs`):
    it may then write its result into an input's buffer instead of a new one."""
    return _OWNED.get()


@contextmanager
def owning_inputs(stores: Sequence[WeightStore]) -> Iterator[None]:
    """Within the block, :func:`inputs_owned` is true when every store is a
    :class:`~weightsmith.store.SafetensorsStore`: the executor's reader then hands each kernel fresh
    buffers that nothing reads after the kernel returns (other stores may return tensors they keep)."""
    token = _OWNED.set(all(isinstance(s, SafetensorsStore) for s in stores))
    try:
        yield
    finally:
        _OWNED.reset(token)


def writable_into(t: Tensor, dtype: torch.dtype, others: Sequence[Tensor]) -> bool:
    """Whether a kernel that owns its inputs (:func:`inputs_owned`) may write a ``dtype`` result into
    ``t``'s buffer: ``t`` is contiguous, has that dtype, and shares no storage with ``others``."""
    if not (t.dtype == dtype and t.is_contiguous()):
        return False
    ptr = t.untyped_storage().data_ptr()
    return all(o.untyped_storage().data_ptr() != ptr for o in others)


_KEPT: ContextVar[dict[tuple[str, torch.dtype, torch.device], Tensor] | None] = ContextVar(
    "weightsmith_kept_scratch", default=None
)


@contextmanager
def keeping_scratch() -> Iterator[None]:
    """Within the block, :func:`tensor_scratch` keeps its buffers from one weight to the next (one merge
    run). A fresh tensor-sized CPU buffer is new memory from the OS: every first write to a page faults,
    which cost Model Stock 40 % of its kernel time (1.6 ns a float32 element). A kept buffer is as large
    as the largest weight's and lives no longer than the run, so the peak does not grow."""
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def tensor_scratch(slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``shape`` buffer for a kernel's whole-tensor scratch, named ``slot``: inside
    :func:`keeping_scratch` the same memory each call (grown when a weight needs more), else a new one.
    The caller must be done with it before its next call for ``slot``."""
    kept = _KEPT.get()
    numel = math.prod(shape)
    if kept is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    buf = kept.get((slot, dtype, device))
    if buf is None or buf.numel() < numel:
        kept.pop((slot, dtype, device), None)  # freed before the larger one is taken
        buf = kept[(slot, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(tuple(shape))


def work_dtype(t: Tensor) -> torch.dtype:
    """The arithmetic dtype of the kernels: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def blocks(
    rows: int, cols: int, device: torch.device, step: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """(row slice, column slice) pieces of a [rows, cols] view, in memory order, of at most ``CPU_PIECE``
    elements on CPU (so float32 work copies of a piece stay in cache instead of streaming whole-tensor
    temporaries through memory); ``GPU_PIECE`` on other devices, where each kernel launch costs more but
    whole-tensor float32 temporaries would cost GPU memory (``step``: another piece size)."""
    step = step or piece_size(device)
    if cols >= step:
        for r in range(rows):
            for c in range(0, cols, step):
                yield slice(r, r + 1), slice(c, min(c + step, cols))
    else:
        per = max(1, step // max(cols, 1))
        for r in range(0, rows, per):
            yield slice(r, min(r + per, rows)), slice(None)


def scratch(like: Tensor, dtype: torch.dtype, count: int = 1, step: int | None = None) -> Tensor:
    """An uninitialised buffer for ``count`` work copies of the largest piece :func:`blocks` gives for
    ``like`` (a 2-D view; ``step``: as for :func:`blocks`)."""
    n = min(like.numel(), step or piece_size(like.device))
    return torch.empty(count * max(n, 1), dtype=dtype, device=like.device)


def as_work(src: Tensor, buf: Tensor) -> Tensor:
    """``src`` in ``buf``'s dtype: ``src`` itself when it already is, else a copy in the front of ``buf``."""
    if src.dtype == buf.dtype:
        return src
    return buf[: src.numel()].view(src.shape).copy_(src)


class TensorwiseMethod(ABC):
    """A merge config whose result for each weight depends only on that weight's tensors.

    ``base_policy`` is ``"required"``, ``"optional"`` or ``"none"`` (the base, when given, is then one
    more input, as mergekit's Karcher mean treats it); ``min_models`` / ``max_models`` bound the number
    of non-base models. ``random`` methods draw their masks from the ``generator`` passed to ``merge``."""

    base_policy: ClassVar[str] = "required"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    random: ClassVar[bool] = False

    @abstractmethod
    def merge(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: Weights = None, generator: Gen = None
    ) -> Tensor:
        """The merged tensor of one weight (float32, or float64 for float64 inputs)."""

    def merge_as(
        self,
        base: Tensor | None,
        thetas: Sequence[Tensor],
        weights: Weights,
        generator: Gen,
        dtype: torch.dtype,
    ) -> Tensor:
        """:meth:`merge` in ``dtype``, the same values as ``merge(...).to(dtype)``. Kernels that write
        their output piece by piece override it to write ``dtype`` directly: no whole-tensor float32
        result beside the output (half the result memory for bf16 models)."""
        return self.merge(base, thetas, weights, generator).to(dtype)

    @property
    def name(self) -> str:
        return str(getattr(type(self), "method", type(self).__name__))

    def check_counts(self, has_base: bool, n_models: int) -> None:
        """Refuse an input set the method is not defined for, naming the method and the count."""
        if self.base_policy == "required" and not has_base:
            raise WeightsmithError(f"merge method '{self.name}' needs a base model (base: ...)")
        if n_models < self.min_models:
            raise WeightsmithError(
                f"merge method '{self.name}' needs at least {self.min_models} model(s) besides the base "
                f"(got {n_models})"
            )
        if self.max_models is not None and n_models > self.max_models:
            raise WeightsmithError(
                f"merge method '{self.name}' takes at most {self.max_models} model(s) besides the base "
                f"(got {n_models})"
            )

    def run(self, recipe: _core.MergeJob, out: Path, **kw: Any) -> Path:
        """Merge a recipe's models tensor by tensor through the shared executor and write ``out``."""
        models = recipe.open_models()
        base = recipe.open_base() if self.base_policy != "none" else None
        self.check_counts(base is not None, len(models))
        weights = list(recipe.weights) if recipe.weights is not None else [1.0] * len(models)
        if len(weights) != len(models):
            raise WeightsmithError(f"{len(weights)} weights for {len(models)} models; give one per model")
        stores = ([base] if base is not None else []) + list(models)
        out_dtype = _core.parse_dtype(kw.get("dtype"))
        _core.check_inputs(stores, out_dtype)
        chosen = _core.selected_names(stores[0], recipe.select)
        seed = int(getattr(self, "seed", 0))

        def merge_one(name: str, tensors: list[Tensor]) -> Tensor:
            b, thetas = (tensors[0], tensors[1:]) if base is not None else (None, tensors)
            gen = None
            if self.random:
                gen = torch.Generator(device=tensors[0].device).manual_seed(_core.seed_for(seed, 0, name))
            return self.merge_as(b, thetas, weights, gen, out_dtype or tensors[0].dtype)

        with owning_inputs(stores), keeping_scratch():
            return _core.write_model(
                stores,
                merge_one,
                out,
                merged=chosen,
                dtype=out_dtype,
                device=resolve_device(kw.get("device", "cpu")),
                force=bool(kw.get("force", False)),
                shard_bytes=_core.parse_size(kw.get("shard_size", "2GB")),
                copy_from=recipe.copy_from(),
                extra_files=kw.get("extra_files"),
            )


class CheckedMethod(TensorwiseMethod):
    """A tensor-wise method whose inputs :meth:`~TensorwiseMethod.check_counts` decides: :meth:`merge`
    checks them and hands :meth:`merge_checked` one weight per model (1.0 each when none are given)."""

    def merge(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: Weights = None, generator: Gen = None
    ) -> Tensor:
        self.check_counts(base is not None, len(thetas))
        w = list(weights) if weights is not None else [1.0] * len(thetas)
        return self.merge_checked(base, thetas, w, generator)

    @abstractmethod
    def merge_checked(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: list[float], gen: Gen
    ) -> Tensor:
        """The merged tensor of one weight (float32, or float64 for float64 inputs)."""


class OnBaseMethod(CheckedMethod):
    """A checked method that needs the base (``base_policy`` "required"): :meth:`merge_on` gets it."""

    def merge_checked(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: list[float], gen: Gen
    ) -> Tensor:
        assert base is not None  # check_counts refuses a missing base
        return self.merge_on(base, thetas, weights, gen)

    @abstractmethod
    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        """The merged tensor of one weight, given the base (float32, or float64 for float64 inputs)."""

    def merge_as(
        self,
        base: Tensor | None,
        thetas: Sequence[Tensor],
        weights: Weights,
        generator: Gen,
        dtype: torch.dtype,
    ) -> Tensor:
        self.check_counts(base is not None, len(thetas))
        assert base is not None  # check_counts refuses a missing base
        w = list(weights) if weights is not None else [1.0] * len(thetas)
        return self.merge_on_as(base, thetas, w, generator, dtype)

    def merge_on_as(
        self,
        base: Tensor,
        thetas: Sequence[Tensor],
        weights: list[float],
        gen: Gen,
        dtype: torch.dtype | None,
    ) -> Tensor:
        """:meth:`merge_on` in ``dtype`` (``None``: the kernel's float32/float64), the same values as
        ``merge_on(...).to(dtype)``; kernels that write their output piece by piece override it."""
        out = self.merge_on(base, thetas, weights, gen)
        return out if dtype is None else out.to(dtype)


class PiecewiseOnBaseMethod(OnBaseMethod):
    """An on-base method whose kernel writes its output dtype piece by piece: it implements only
    :meth:`merge_on_as`, and :meth:`merge_on` is that in the kernel's float32/float64."""

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return self.merge_on_as(base, thetas, weights, gen, None)

    @abstractmethod
    def merge_on_as(
        self,
        base: Tensor,
        thetas: Sequence[Tensor],
        weights: list[float],
        gen: Gen,
        dtype: torch.dtype | None,
    ) -> Tensor:
        """The merged tensor of one weight in ``dtype`` (``None``: float32, or float64 for float64 inputs)."""


# ------------------------------------------------------------------- generalised task arithmetic parts


def l1_rescale(delta: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """``delta * mask`` rescaled to the L1 norm of ``delta`` (mergekit's ``rescale: true``); left
    unscaled when either norm is below ``eps``."""
    return match_l1(delta * mask, delta.abs().sum(), eps)


def match_l1(kept: Tensor, before: Tensor, eps: float = 1e-7) -> Tensor:
    """``kept`` (a sparsified task vector, scaled in place) times ``before / |kept|_1``: the L1 rescale
    of :func:`l1_rescale` given the L1 norm ``before`` of the unsparsified vector."""
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def sign_agreement(deltas: Tensor) -> Tensor:
    """TIES election over the leading (task) axis: gamma = +1 where sum_i delta_i >= 0 else -1; the
    mask keeps entries whose sign equals gamma (a zero entry agrees with neither sign)."""
    gamma = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == gamma


def combine(
    base: Tensor,
    deltas: Tensor,
    weights: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """theta_0 + lambda * sum_i w_i m_i delta_i / D: ``deltas`` stacks the (sparsified) task vectors;
    ``elect`` applies the TIES sign mask m_i to the weighted deltas; with ``normalize`` D is the sum of
    the weights that contribute at each entry (all of them without election; 1 where that sum is 0).

    Evaluated over pieces of the tensor (:func:`blocks`): every step is elementwise or a sum over the
    task axis, so each piece's temporaries stay in cache and the result is the same as in one piece.
    The result is in the promoted dtype of ``base`` and ``deltas`` (a bf16 base is widened exactly, piece
    by piece), or rounded to ``out_dtype`` piece by piece (the same values as ``.to(out_dtype)``)."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape(-1, 1, 1)
    if not elect:
        total = w.reshape(-1).sum(dim=0)
        divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    n = deltas.shape[0]
    flat_d, flat_b = deltas.reshape(n, 1, -1), base.reshape(1, -1)
    dt = torch.result_type(base, deltas)
    out = torch.empty(flat_b.shape, dtype=out_dtype or dt, device=base.device)
    for _, cs in blocks(1, flat_b.shape[1], base.device):
        weighted = flat_d[:, :, cs] * w
        if elect:
            mask = sign_agreement(weighted).to(deltas.dtype)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = weighted.sum(dim=0)
        if normalize:
            mixed = mixed / divisor
        if scaling != 1:
            mixed = mixed * scaling
        if out.dtype == dt:
            torch.add(flat_b[:, cs], mixed, out=out[:, cs])
        else:
            out[:, cs].copy_(torch.add(flat_b[:, cs], mixed))
    return out.reshape(base.shape)


def stack_deltas(base: Tensor, thetas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(base, stacked task vectors theta_i - theta_0), in the kernels' arithmetic dtype (each filled in
    place: no whole-tensor temporaries besides the stack)."""
    b = base.to(work_dtype(base))
    return b, task_vectors(b, thetas)


def task_vectors(base: Tensor, thetas: Sequence[Tensor]) -> Tensor:
    """The stacked task vectors theta_i - theta_0 in the kernels' arithmetic dtype, without a widened
    copy of ``base`` (a bf16 base is widened exactly inside each subtraction: the same values)."""
    dt = work_dtype(base)
    out = torch.empty((len(thetas), *base.shape), dtype=dt, device=base.device)
    for i, t in enumerate(thetas):
        out[i].copy_(t).sub_(base)
    return out
