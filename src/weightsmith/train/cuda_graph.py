"""A whole training step (forward, backward, optimizer step) replayed as one CUDA graph.

An adapter step on a 1.1B model launches several thousand small kernels (dozens per adapted layer);
on a fast GPU the host cannot issue them as fast as the GPU runs them, so the step is launch-bound
(benchmarks/RESULTS.md, "Adapter training step"). A CUDA graph records the kernels of one step once
and replays them with a single launch: the host cost of a step becomes one ``cudaGraphLaunch``.

This follows PyTorch's recipe for whole-network capture (``torch.cuda.graphs``, "Whole-network
capture", PyTorch documentation "CUDA semantics" since 1.10): warm up on a side stream (lazy
initialisations such as the optimizer state and cuBLAS workspaces must not happen inside the
capture), capture on that stream, read inputs from static buffers that every call copies into, and
use an optimizer whose step counter lives on the GPU (``capturable=True``). The graph (Nguyen et al.,
"CUDA Graphs", NVIDIA 2019) replays the same kernels on the same addresses, so one call of
:class:`GraphedStep` computes exactly what the eager step computes:

    g_t = ∇_θ L(θ_{t-1}; static_batch ← batch_t),   θ_t = step(θ_{t-1}, g_t)

Gradients are zeroed inside the graph (``zero_grad(set_to_none=False)`` semantics: the ``.grad``
tensors are allocated once, by the first eager step, and never replaced), so after a call
``p.grad`` holds that step's gradient, as after an eager ``backward()``; hooks that read it
(AdaLoRA's importance update) run eagerly between replays.

What cannot be captured is refused with a :class:`~weightsmith.errors.WeightsmithError`:

- a step that synchronises with the host (``.item()``, ``bool(tensor)``, ``nonzero``, a shape that
  depends on data): the capture fails and the message says so;
- a new batch shape: each shape gets its own graph after ``warmup`` eager calls of that shape (the
  graphs share one memory pool), up to ``max_graphs``; one more shape is refused;
- a hook between replays that replaces or reshapes a parameter or changes a float learning rate
  (the graph would keep using the old addresses and values): refused at the next call;
- an optimizer that keeps its step count on the host (``capturable=False`` with state already built).

``backend`` is what records and replays; :class:`CudaBackend` is the real one (tests on the CPU
inject a stand-in to check the static-buffer logic).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError

Batch = Mapping[str, Tensor | None]
Outputs = Tensor | tuple[Tensor, ...]
LossFn = Callable[[nn.Module, dict[str, Tensor | None]], Outputs]
Signature = tuple[tuple[str, tuple[int, ...] | None, torch.dtype | None], ...]


class Replay(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """Runs a step eagerly (warm-up) or records it once for replay."""

    def check(self, device: torch.device) -> None:
        """Refuse a device this backend cannot record on (WeightsmithError)."""

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer``'s step recordable (or refuse it)."""

    def eager(self, fn: Callable[[], tuple[Tensor, ...]], watch: bool = False) -> tuple[Tensor, ...]:
        """Run ``fn`` now (on the capture stream) and return its outputs, usable on the current stream.
        ``watch``: note where ``fn`` synchronises with the host (``sync_sites``), for a failed capture's
        message."""

    def capture(self, fn: Callable[[], Any]) -> Replay:
        """Record ``fn`` (its kernels do NOT run); ``replay()`` runs them."""


class CudaBackend:
    """``torch.cuda.CUDAGraph`` capture on one side stream; every graph shares the first one's memory pool
    (safe here: graphs replay one at a time and their outputs are copied out right after each replay)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: Any = None
        self.pool: Any = None
        self.sync_sites: list[str] = []

    def check(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise WeightsmithError(
                f"CUDA graphs need a CUDA device; the model's trainable tensors are on {device} "
                "(train without --cuda-graphs on the CPU)"
            )
        if not torch.cuda.is_available():
            raise WeightsmithError("CUDA graphs: CUDA is not available on this machine")

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        prepare_optimizer(optimizer)

    def _stream(self) -> Any:
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return self.stream

    def eager(self, fn: Callable[[], tuple[Tensor, ...]], watch: bool = False) -> tuple[Tensor, ...]:
        side, current = self._stream(), torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        mode = torch.cuda.get_sync_debug_mode()
        record: Any = warnings.catch_warnings(record=True) if watch else contextlib.nullcontext([])
        with torch.cuda.stream(side), record as seen:
            if watch:  # torch warns at every host synchronisation; the warning names the Python line
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        current.wait_stream(side)
        if watch:
            syncs = [w for w in seen if "synchroniz" in str(w.message)]
            self.sync_sites = sorted({f"{w.filename}:{w.lineno}" for w in syncs})
            for w in seen:  # the others as they were
                if w not in syncs:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for t in out:  # made on the side stream, used and freed on the current one
            t.record_stream(current)
        return out

    def capture(self, fn: Callable[[], Any]) -> Replay:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self._stream()):
            fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph


@dataclass
class _Entry:
    """One batch shape: its static input buffers, eager calls so far, and its graph once captured."""

    static: dict[str, Tensor | None]
    seen: int = 0
    graph: Replay | None = None
    outputs: tuple[Tensor, ...] = ()
    params: list[tuple[int, torch.Size]] = field(default_factory=list)
    lrs: list[Any] = field(default_factory=list)


def signature(batch: Batch) -> Signature:
    """The keys, shapes and dtypes of a batch (``None`` values included): one graph per signature."""
    out: list[tuple[str, tuple[int, ...] | None, torch.dtype | None]] = []
    for k in sorted(batch):
        v = batch[k]
        if v is None:
            out.append((k, None, None))
        elif isinstance(v, Tensor):
            out.append((k, tuple(v.shape), v.dtype))
        else:
            raise WeightsmithError(
                f"CUDA graphs: batch entry '{k}' is a {type(v).__name__}; a graphed step takes tensors "
                "(or None) only, since anything else would be frozen into the graph"
            )
    return tuple(out)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` capturable: its groups' ``capturable`` flag is switched on while it has no state
    yet (the step counters are then created on the GPU); with state already built, refuse."""
    groups = [g for g in optimizer.param_groups if g.get("capturable") is False]
    if not groups:
        return
    if optimizer.state:
        raise WeightsmithError(
            f"CUDA graphs: {type(optimizer).__name__} was built with capturable=False and has already "
            "stepped (its step counts live on the host); build it with capturable=True"
        )
    for g in groups:
        g["capturable"] = True


class GraphedStep:
    """``step(batch)``: zero the gradients, ``loss_fn(model, batch)``, backward, optionally clip the gradient
    norm, ``optimizer.step()``, as one CUDA graph per batch shape after ``warmup`` eager calls of it.

    ``loss_fn`` returns the loss or a tuple whose first element is differentiated; a call returns copies
    of those tensors (and, with ``max_grad_norm``, the gradient norm last). ``optimizer=None`` captures
    forward and backward only (the caller steps eagerly, e.g. to keep a float learning-rate schedule).
    A float learning rate is baked into the graph: changing it between calls is refused; to schedule
    it, give the optimizer a tensor ``lr`` and change it in place. Under autocast, ``loss_fn`` must open
    ``torch.autocast(..., cache_enabled=False)`` itself (a cached cast would be captured once).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: LossFn,
        example: Batch,
        *,
        warmup: int = 3,
        max_graphs: int = 2,
        max_grad_norm: float | None = None,
        backend: GraphBackend | None = None,
    ) -> None:
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise WeightsmithError(f"CUDA graphs: warmup must be an integer of at least 1 (got {warmup!r})")
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise WeightsmithError(
                f"CUDA graphs: max_graphs must be an integer of at least 1 (got {max_graphs!r})"
            )
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise WeightsmithError(f"CUDA graphs: max_grad_norm must be positive (got {max_grad_norm!r})")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.warmup, self.max_graphs, self.max_grad_norm = warmup, max_graphs, max_grad_norm
        self.named = _trainable(model)
        self.params = [p for _, p in self.named]
        devices = {p.device for p in self.params} | {
            v.device for v in example.values() if isinstance(v, Tensor) and v.device.type != "cpu"
        }
        if len(devices) > 1:
            raise WeightsmithError(
                f"CUDA graphs: the step spans devices {sorted(map(str, devices))}; one graph runs on one GPU"
            )
        self.device = next(iter(devices), None) or _model_device(model)
        self.backend: GraphBackend = backend if backend is not None else CudaBackend(self.device)
        self.backend.check(self.device)
        if optimizer is not None:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [n for n, p in self.named if id(p) not in owned]
            if missing:
                raise WeightsmithError(
                    f"CUDA graphs: trainable parameter '{missing[0]}' is not in the optimizer "
                    f"({len(missing)} missing); the captured step would never update it"
                )
            self.backend.prepare(optimizer)
        self._graphs: dict[Signature, _Entry] = {}
        self._grads: list[Tensor | None] = []
        self._entry(signature(example), example)

    # -------------------------------------------------------------------------------------- per shape

    def _entry(self, key: Signature, batch: Batch) -> _Entry:
        entry = self._graphs.get(key)
        if entry is not None:
            return entry
        if sum(e.graph is not None for e in self._graphs.values()) >= self.max_graphs:
            shapes = "; ".join(_describe(k) for k in self._graphs)
            raise WeightsmithError(
                f"CUDA graphs: a batch of a new shape ({_describe(key)}) after {self.max_graphs} captured "
                f"shape(s) ({shapes}); give every batch the same shape (fixed-length blocks, a dropped last "
                "batch) or raise max_graphs"
            )
        static = {
            k: None if v is None else torch.empty(v.shape, dtype=v.dtype, device=self.device)
            for k, v in batch.items()
        }
        entry = self._graphs[key] = _Entry(static)
        return entry

    def _body(self, static: dict[str, Tensor | None]) -> tuple[Tensor, ...]:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # zero_grad(set_to_none=False): backward accumulates into the same tensors every step
            torch._foreach_zero_(grads)
        out = self.loss_fn(self.model, static)
        outs = out if isinstance(out, tuple) else (out,)
        outs[0].backward()
        extra: tuple[Tensor, ...] = ()
        if self.max_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            extra = (norm,)
        if self.optimizer is not None:
            self.optimizer.step()
        return tuple(o.detach() for o in outs) + extra

    # ----------------------------------------------------------------------------------------- a call

    def __call__(self, batch: Batch) -> Outputs:
        key = signature(batch)
        entry = self._entry(key, batch)
        for k, v in batch.items():
            target = entry.static[k]
            if target is not None and v is not None:
                target.copy_(v, non_blocking=True)
        self._restore_grads()
        if entry.graph is not None:
            self._check_unchanged(entry)
            entry.graph.replay()
            outs = tuple(o.clone() for o in entry.outputs)
        elif entry.seen < self.warmup:
            last = entry.seen == self.warmup - 1  # the last eager call notes where the step syncs
            outs = self.backend.eager(lambda: self._body(entry.static), watch=last)
            entry.seen += 1
            self._grads = [p.grad for p in self.params]
        else:
            entry.graph = self._capture(entry, key)
            entry.graph.replay()
            outs = tuple(o.clone() for o in entry.outputs)
        return outs if len(outs) > 1 else outs[0]

    @property
    def captured(self) -> int:
        """How many batch shapes have a graph."""
        return sum(e.graph is not None for e in self._graphs.values())

    def _capture(self, entry: _Entry, key: Signature) -> Replay:
        def record() -> None:
            entry.outputs = self._body(entry.static)

        known = self._stateful()
        try:
            graph = self.backend.capture(record)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            sites = list(getattr(self.backend, "sync_sites", []))
            where = f"; the eager step synchronised at {', '.join(sites[:6])}" if sites else ""
            raise WeightsmithError(
                f"CUDA graphs: the training step for batch {_describe(key)} could not be captured ({first}"
                f"{where}). Something in it waits for the GPU on the host (.item(), bool(tensor), nonzero, "
                "a shape that depends on data, an attention mask checked on the host) or is otherwise not "
                "capturable; train without CUDA graphs"
            ) from exc
        fresh = [name for name, p in self.named if id(p) in self._stateful() - known]
        if fresh:
            raise WeightsmithError(
                f"CUDA graphs: parameter '{fresh[0]}' got its first gradient inside the captured step, so "
                "the optimizer created its state there and every replay would reset it; give it a gradient "
                f"in the eager warm-up steps (it had none in {self.warmup}) or train without CUDA graphs"
            )
        entry.params = [(p.data_ptr(), p.shape) for p in self.params]
        entry.lrs = self._lrs()
        return graph

    def _stateful(self) -> set[int]:
        """Identities of the parameters the optimizer holds state for (moments, step counts)."""
        if self.optimizer is None:
            return set()
        return {id(p) for p, st in self.optimizer.state.items() if st}

    def _lrs(self) -> list[Any]:
        if self.optimizer is None:
            return []
        return [g["lr"] for g in self.optimizer.param_groups]

    def _restore_grads(self) -> None:
        """Put back gradients set to None between calls (``zero_grad()``): the graph writes the old ones."""
        for p, g in zip(self.params, self._grads, strict=False):
            if g is not None and p.grad is not g:
                p.grad = g

    def _check_unchanged(self, entry: _Entry) -> None:
        """Refuse to replay on parameters that were replaced, reshaped or given a new float lr since the
        capture (an eager hook such as a rank re-allocation): the graph still holds the old ones."""
        for (name, p), (ptr, shape) in zip(self.named, entry.params, strict=True):
            if p.data_ptr() != ptr or p.shape != shape:
                raise WeightsmithError(
                    f"CUDA graphs: parameter '{name}' was replaced or reshaped after the step was captured "
                    f"(shape {tuple(shape)} -> {tuple(p.shape)}); a hook that changes parameters between "
                    "steps cannot be combined with CUDA graphs: train without them"
                )
        for i, (then, now) in enumerate(zip(entry.lrs, self._lrs(), strict=True)):
            if isinstance(then, Tensor):
                if now is not then:
                    raise WeightsmithError(
                        f"CUDA graphs: param group {i}'s lr tensor was replaced after capture; "
                        "change it in place"
                    )
            elif now != then:
                raise WeightsmithError(
                    f"CUDA graphs: param group {i}'s learning rate changed from {then} to {now} after the "
                    "step was captured; a float lr is baked into the graph: give the optimizer a tensor lr "
                    "and change it in place (or step the optimizer outside the graph)"
                )


def _describe(key: Signature) -> str:
    return ", ".join(f"{k}={'None' if s is None else list(s)}" for k, s, _ in key)


def _model_device(model: nn.Module) -> torch.device:
    t: Tensor | None = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


# ------------------------------------------------------------------------------ the trainer's option


def check_trainer_option(args: Any) -> None:
    """``--cuda-graphs`` with the other training options (``TrainArgs``), before any model is loaded."""
    if not isinstance(args.cuda_graphs, bool):
        raise WeightsmithError(f"cuda_graphs must be True or False (got {args.cuda_graphs!r})")
    if not args.cuda_graphs:
        return
    device = str(args.device)
    if device == "cpu" or device.startswith("cpu:") or (device == "auto" and not torch.cuda.is_available()):
        raise WeightsmithError(
            f"--cuda-graphs needs a CUDA GPU (--device {device} trains on the CPU, where there are no CUDA "
            "graphs); leave --cuda-graphs off on the CPU"
        )
    if args.grad_accum != 1:
        raise WeightsmithError(
            f"--cuda-graphs replays one whole batch per optimizer step: use --grad-accum 1 (got "
            f"{args.grad_accum}) and a larger --batch-size"
        )
    if args.micro_batch_tokens is not None:
        raise WeightsmithError(
            "--cuda-graphs replays one whole batch per optimizer step: leave micro_batch_tokens unset"
        )


class TrainerGraph:
    """``--cuda-graphs`` in :func:`~weightsmith.train.finetune`: each batch's forward (under bf16 autocast
    when ``bf16``), regularizer and backward run as one CUDA graph; gradient clipping, the optimizer step
    (so the float learning-rate schedule keeps working) and adapter hooks stay eager, as without graphs.

    ``loss(batch)`` is the task's loss (run under :func:`unpacked_sequences`: LM blocks are never packed),
    ``regularizer()`` the adapters' term (outside autocast, as in the eager loop). A language-modelling
    batch whose attention mask is all ones (a host tensor: checking it costs no GPU sync) is passed with
    ``attention_mask=None``: the same causal attention, without the model's own check of the mask, which
    inside a capture builds an explicit mask and leaves SDPA's causal kernels. Classification batches are
    padded to their longest sentence, so nearly every batch has a new shape: refused."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[dict[str, Tensor | None]], Tensor],
        regularizer: Callable[[], Tensor | float],
        task_kind: str,
        bf16: bool,
        world_size: int,
        in_backward: bool,
        on_nonfinite: Callable[[float], Any],
        backend: GraphBackend | None = None,
    ) -> None:
        if world_size > 1:
            raise WeightsmithError(
                "--cuda-graphs runs in one process; under torchrun (DDP, FSDP2) train without it"
            )
        if in_backward:
            raise WeightsmithError(
                "--cuda-graphs: the optimizer updates parameters inside backward; use one that steps "
                "after backward (the default AdamW)"
            )
        if task_kind != "lm":
            raise WeightsmithError(
                "--cuda-graphs needs batches of one shape: a classification task pads each batch to its "
                "longest sentence; use a language-modelling task or train without --cuda-graphs"
            )
        self.model, self.loss, self.regularizer, self.bf16 = model, loss, regularizer, bf16
        self.on_nonfinite, self.backend = on_nonfinite, backend
        self.step: GraphedStep | None = None

    def _loss(self, _model: nn.Module, batch: dict[str, Tensor | None]) -> tuple[Tensor, Tensor]:
        amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.bf16 else None
        with amp or contextlib.nullcontext(), unpacked_sequences():
            loss = self.loss(batch)
        return loss + self.regularizer(), loss.detach()

    def backward(self, batch: Mapping[str, Tensor]) -> float:
        """Forward and backward of ``batch`` (host tensors); the mean loss. ``on_nonfinite(loss)`` is called
        (before any optimizer step) when the loss or the regularized loss is not finite."""
        b: dict[str, Tensor | None] = dict(batch)
        mask = b.get("attention_mask")
        if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
            b["attention_mask"] = None
        if self.step is None:
            self.step = GraphedStep(self.model, None, self._loss, b, backend=self.backend)
        total, loss = self.step(b)  # type: ignore[misc]
        value = float(loss)
        if not math.isfinite(float(total)) or not math.isfinite(value):
            self.on_nonfinite(value)
        return value


@contextlib.contextmanager
def unpacked_sequences() -> Iterator[None]:
    """Within it, Hugging Face models take every batch row as one sequence (no packing).

    transformers (5.x) looks for several sequences packed in one row when a forward gets no attention mask
    and no cache: it reads the position ids on the host (``.all()``, a GPU sync) in eager mode, and
    inside a CUDA-graph capture skips the read and builds an explicit ``[B, 1, T, T]`` mask instead,
    which takes SDPA off its causal (flash) kernels. Batches that pass no ``position_ids`` (default
    positions ``0..T-1``) are never packed, so the answer is known: this makes the check return "not
    packed" without reading anything. Do not use it with packed ``position_ids``."""
    try:
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing to patch
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:  # another transformers version: nothing to patch
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original
