"""The layer walker: which layers a job may touch, their ``[out, in]`` weights, and calibration statistics.

- :func:`find_layers` lists the ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` layers of a model (or of
  one block), named by their weight (``model.layers.0.self_attn.q_proj.weight``). :class:`Layer` gives the
  weight as ``[out, in]`` (Conv1D stores ``[in, out]``; the view is transposed) and writes it back.
- :class:`InputStats` accumulates what data-aware methods read from a layer's inputs ``X`` [n, in]: the
  Hessian of the layer-wise squared error ``H = 2 XᵀX / n`` (GPTQ, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", Frantar et al., 2023, eq. 1-2), the per-channel
  mean ``|x|`` (AWQ, Lin et al., 2024, s_X), the per-channel norm ``‖X_j‖₂`` (Wanda, Sun et al., 2024,
  S_ij = |W_ij| ‖X_j‖₂) and, optionally, up to ``max_rows`` captured rows (EVA, AWQ's search). Layers whose
  forward gets the very same input tensor (q/k/v, gate/up) share one :class:`InputStats` (one Gram matrix
  accumulated, one ``addmm_`` a batch), checked batch by batch. The Gram of bf16/fp16 inputs on CUDA
  multiplies them as they are (their products are exact in float32) and accumulates in float32
  (:func:`gram_product`); :func:`~weightsmith.linalg.tf32_matmul` scopes TF32 matrix products to the
  calibration passes (the ``tf32`` option of :func:`walk_blocks` and :func:`collect_stats`).
- :func:`collect_stats` runs batches through a whole model with hooks; :func:`walk_blocks` does it block by
  block with only one decoder block on the device at a time (sequential onloading): the calibration batch
  runs through block ``i``, the statistics are handed to a callback that may change block ``i`` (quantise
  it), and the outputs of the changed block feed block ``i + 1``. A model larger than the device therefore
  calibrates, and each block sees the inputs the compressed model will really give it.
- Under ``torch.distributed`` every rank feeds its own share of the batches and :meth:`InputStats.all_reduce`
  sums the statistics (and gathers the captured rows), so all ranks hold the statistics of the whole
  calibration set (data-parallel).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import WeightsmithError
from .linalg import mm_float32, tf32_matmul
from .sdpa_gqa import expanded_gqa
from .select import Selector

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "heads", "pooler", "cls")
KINDS = ("linear", "conv1d", "embedding")


def _conv1d_type() -> type | None:
    # A model holding a GPT-2 Conv1D has imported transformers already; look the class up, don't import.
    mod = sys.modules.get("transformers.pytorch_utils")
    return None if mod is None else mod.Conv1D  # type: ignore[no-any-return]


def layer_kind(module: nn.Module) -> str | None:
    """ "linear", "conv1d", "embedding", or None for a module that holds no weight matrix we handle."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def is_head(weight_name: str) -> bool:
    """A classifier / LM head (``lm_head.weight``, ``classifier.weight``, ...)."""
    parts = weight_name.split(".")[:-1]
    return bool(parts) and parts[-1] in HEAD_NAMES


@dataclass(eq=False)
class Layer:
    """One weight matrix of a model: ``name`` is the weight's state-dict name, ``module`` its owner."""

    name: str
    module: nn.Module
    kind: str

    @property
    def path(self) -> str:
        """The owning module's path (the name without ``.weight``)."""
        return self.name[: -len(".weight")]

    def weight(self) -> Tensor:
        """The weight as ``[out, in]`` (a view: a transpose for Conv1D; ``[num, dim]`` for embeddings)."""
        W: Tensor = self.module.weight  # type: ignore[assignment]
        return W.T if self.kind == "conv1d" else W

    def write(self, W: Tensor) -> None:
        """Copy ``W`` (``[out, in]``) into the layer's weight, in its dtype and layout."""
        with torch.no_grad():
            target: Tensor = self.module.weight  # type: ignore[assignment]
            target.copy_((W.T if self.kind == "conv1d" else W).to(target.dtype))

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.weight().shape
        return int(out_f), int(in_f)


def find_layers(
    model: nn.Module,
    select: Selector | str | Sequence[str] | None = None,
    kinds: Sequence[str] = ("linear", "conv1d"),
    heads: bool = False,
    prefix: str = "",
) -> list[Layer]:
    """The layers of ``model`` of the given ``kinds``, in module order.

    ``select`` filters by weight name (see :class:`~weightsmith.select.Selector`); without it, heads
    (``lm_head``, ``classifier``, ...) are left out unless ``heads``. ``prefix`` is prepended to the names
    (walk one block of a model and keep the model's names).
    """
    for k in kinds:
        if k not in KINDS:
            raise WeightsmithError(f"unknown layer kind '{k}'; known: {', '.join(KINDS)}")
    found: list[Layer] = []

    def walk(module: nn.Module, path: str) -> None:
        for child_name, child in module.named_children():
            p = f"{path}{child_name}"
            kind = layer_kind(child)
            if kind is not None:
                found.append(Layer(f"{p}.weight", child, kind))
            else:
                walk(child, p + ".")

    walk(model, prefix)
    layers = [ly for ly in found if ly.kind in kinds]
    if select is None:
        return [ly for ly in layers if heads or not is_head(ly.name)]
    sel = Selector.of(select)
    return [ly for ly in layers if sel.matches(ly.name)]


# ----------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class StatsSpec:
    """Which input statistics to gather per layer.

    ``gram``: ΣxxT (for H = 2XᵀX/n); ``channels``: Σ|x| and Σx² per input channel; ``max_rows``: keep
    the first ``max_rows`` input rows; ``dtype``: accumulation dtype (float32, or float64 for very long
    calibration runs); ``feeders``: record which normalisation module (a module with a 1-D ``weight``)
    produced each layer's input tensor, as :attr:`InputStats.feeder` (AWQ folds its scales into it).
    """

    gram: bool = True
    channels: bool = True
    max_rows: int = 0
    dtype: torch.dtype = torch.float32
    feeders: bool = False


_LOW = (torch.bfloat16, torch.float16)


def _reduced(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`gram_product` multiplies ``x`` in its own (bf16/fp16) precision."""
    return x.is_cuda and x.dtype in _LOW and dtype == torch.float32


def gram_product(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``xᵀx`` of rows ``x`` [n, in] in ``dtype``.

    bf16/fp16 inputs on CUDA with a float32 result: :func:`~weightsmith.linalg.mm_float32` (the inputs
    multiplied as they are, their products exact in float32, the sums in float32): what an upcast to float32
    and a float32 GEMM give, in another summation order, on the tensor cores. Everything else: the inputs
    upcast to ``dtype`` and a GEMM in ``dtype`` (bit for bit what it always was)."""
    if _reduced(x, dtype):
        return mm_float32(x.T, x)
    xf = x.to(dtype)
    return xf.T @ xf


# Inputs at least MIN wide accumulate their Gram by lower row blocks of about ROWS rows (see below). On a
# GPU below 2048 one GEMM is as fast; on a CPU the triangle pays from 512 (SmolLM2's 576 and 1536 wide
# inputs, 4096 rows, two threads: 15.1 → 11.1 and 95 → 63 ms a batch).
TRIANGLE_MIN = 2048
TRIANGLE_ROWS = 1024
TRIANGLE_MIN_CPU = 512
TRIANGLE_ROWS_CPU = 256


def row_blocks(d: int, rows: int = TRIANGLE_ROWS, align: int = 128) -> list[tuple[int, int]]:
    """``[i0, i1)`` bounds of about ``d / rows`` equal row blocks of a ``d × d`` matrix (sizes rounded up to
    multiples of ``align``)."""
    nb = max(1, d // rows)
    size = -(-d // nb)
    size = -(-size // align) * align
    return [(i0, min(d, i0 + size)) for i0 in range(0, d, size)]


def accumulate_gram(gram: Tensor | None, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``gram + xᵀx`` (``xᵀx`` when ``gram`` is None), in place, for rows ``x`` [n, d].

    Narrow inputs: one GEMM a batch (:func:`gram_product`; a float32-or-wider GEMM accumulates into
    ``gram`` itself, ``beta = 1``). Inputs of ``d ≥ TRIANGLE_MIN`` columns (``TRIANGLE_MIN_CPU`` on a CPU):
    ``xᵀx`` is symmetric, so only its lower triangle is multiplied, one GEMM per row block ``i``
    (``G[i, :i1] += x_iᵀ x[:, :i1]``, the diagonal block whole), and the strict upper triangle is copied
    from it: ``(nb + 1) / 2nb`` of the products (60 % for a 5632-wide input in 5 blocks) for the same sums
    of the same products, each entry from one GEMM; the result is exactly symmetric."""
    d = x.shape[-1]
    reduced = _reduced(x, dtype)
    xs = x if reduced else x.to(dtype)
    cpu = x.device.type == "cpu"
    if d < (TRIANGLE_MIN_CPU if cpu else TRIANGLE_MIN):
        if reduced:
            p = gram_product(x, dtype)
            return p if gram is None else gram.add_(p)
        return xs.T @ xs if gram is None else gram.addmm_(xs.T, xs)
    if gram is None:
        gram = torch.zeros(d, d, dtype=dtype, device=x.device)
    blocks = row_blocks(d, TRIANGLE_ROWS_CPU, 64) if cpu else row_blocks(d)
    for i0, i1 in blocks:
        lower = gram[i0:i1, :i1]
        if reduced:
            lower.add_(mm_float32(xs[:, i0:i1].T, xs[:, :i1]))
        else:
            lower.addmm_(xs[:, i0:i1].T, xs[:, :i1])
    for i0, i1 in blocks[1:]:
        gram[:i0, i0:i1].copy_(gram[i0:i1, :i0].T)
    return gram


@dataclass(eq=False)
class InputStats:
    """Running statistics of one layer's inputs ``X`` [n, in] (rows are tokens)."""

    name: str
    spec: StatsSpec
    n: int = 0
    gram: Tensor | None = None
    abs_sum: Tensor | None = None
    sq_sum: Tensor | None = None
    total: Tensor | None = None  # Σx per channel
    rows: list[Tensor] = field(default_factory=list)
    kept: int = 0
    feeder: str | None = None  # path (below the walked module) of the norm whose output is this input

    def add(self, x: Tensor) -> None:
        """Add a batch of input rows ``x`` [..., in]."""
        x = x.detach().reshape(-1, x.shape[-1])
        if not (self.spec.gram or self.spec.channels) and not bool(torch.isfinite(x).all()):
            self._broken()  # else the sums carry it to finite(): no sync a batch
        if self.spec.gram:
            self.gram = accumulate_gram(self.gram, x, self.spec.dtype)
        if self.spec.channels:
            xf = x.to(self.spec.dtype)  # bf16/fp16 inputs upcast once
            a, s, t = xf.abs().sum(0), xf.square().sum(0), xf.sum(0)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum.add_(a)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
            self.total = t if self.total is None else self.total.add_(t)
        if self.kept < self.spec.max_rows:
            take = x[: self.spec.max_rows - self.kept].float()
            self.rows.append(take)
            self.kept += take.shape[0]
        self.n += x.shape[0]

    def _broken(self) -> None:
        raise WeightsmithError(
            f"non-finite (NaN/inf) activations reach layer '{self.name}'; the model or the calibration "
            "data is broken (check the weights, or use float32)"
        )

    def finite(self) -> Tensor | None:
        """Whether no NaN/inf input reached the sums (a 0-d bool tensor on the statistics' device, so that
        a caller checks many with one host sync): ``diag(XᵀX) = Σ x²`` (or the channels' Σx²) is non-finite
        exactly when some input was (or a square overflowed the accumulation dtype). None without either
        sum: then :meth:`add` checked each batch itself."""
        probe = self.gram.diagonal() if self.gram is not None else self.sq_sum
        return None if probe is None else torch.isfinite(probe).all()

    def _need(self, what: Tensor | None, option: str) -> Tensor:
        if what is None or self.n == 0:
            raise WeightsmithError(f"layer '{self.name}': no {option} statistics were gathered")
        return what

    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n, the Hessian of ‖WX − ŴX‖² / n with respect to each row of Ŵ."""
        return self._need(self.gram, "Gram") * (2.0 / self.n)

    def mean_abs(self) -> Tensor:
        """Per-channel mean |x| (AWQ's activation scale s_X)."""
        return self._need(self.abs_sum, "channel") / self.n

    def mean(self) -> Tensor:
        """Per-channel mean of x."""
        return self._need(self.total, "channel") / self.n

    def covariance(self) -> Tensor:
        """The (biased) input covariance XᵀX / n − μμᵀ, from the Gram matrix and the channel sums."""
        mu = self.mean().to(self._need(self.gram, "Gram").dtype)
        return self._need(self.gram, "Gram") / self.n - torch.outer(mu, mu)

    def norms(self) -> Tensor:
        """Per-channel ‖X_j‖₂ over all rows (Wanda)."""
        return self._need(self.sq_sum, "channel").sqrt()

    def inputs(self) -> Tensor:
        """The captured input rows [kept, in] (float32)."""
        if not self.rows:
            raise WeightsmithError(f"layer '{self.name}': no input rows were captured")
        return torch.cat(self.rows)

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group (no-op without one), and gather
        the captured rows in rank order (the first ``max_rows`` of them are kept), so that with the samples
        split into contiguous shares by rank every rank holds what one process would have gathered."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count = on_group_device(torch.tensor([float(self.n)], dtype=torch.float64))
        dist.all_reduce(count)
        self.n = int(count.item())
        for t in (self.gram, self.abs_sum, self.sq_sum, self.total):
            if t is not None:
                buf = on_group_device(t)
                dist.all_reduce(buf)
                if buf is not t:
                    t.copy_(buf)
        if self.spec.max_rows and self.rows:
            mine = torch.cat(self.rows)
            rows = _gather_rows(on_group_device(mine))[: self.spec.max_rows].to(mine.device)
            self.rows, self.kept = [rows], rows.shape[0]


def on_group_device(t: Tensor) -> Tensor:
    """``t`` where the default process group's backend can work on it: NCCL takes CUDA tensors only, so a
    CPU tensor is copied to this process's GPU; gloo takes ``t`` as it is."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _gather_rows(mine: Tensor) -> Tensor:
    """Every rank's ``[k_r, in]`` rows concatenated in rank order (``k_r`` may differ between ranks)."""
    size = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=mine.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([mine.shape[0]], dtype=torch.int64, device=mine.device))
    ks = [int(c.item()) for c in counts]
    padded = mine.new_zeros(max(ks), mine.shape[1])
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, ks, strict=True)])


def _mask_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(x.device).bool()]
    return x


class _Unshare(Exception):
    """Raised when layers that read one input tensor in the first batch read different ones later (the pass
    is then run again with one :class:`InputStats` per layer)."""


class _Done(Exception):
    """Raised by a statistics hook once a batch has given every hooked layer its input (the rest of the
    forward is not needed; see :class:`_Hooks`)."""


@dataclass(eq=False)
class _Seen:
    """One input tensor of the current batch: a weak reference (an id may be reused once it is freed), a
    serial number, and how many times each :class:`InputStats` has added it."""

    ref: weakref.ref[Tensor]
    token: int
    added: dict[InputStats, int] = field(default_factory=dict)


class _Hooks:
    """Forward pre-hooks that feed each layer's input into its :class:`InputStats`.

    With ``share`` (the default), layers whose forward gets the very same input tensor (q/k/v reading one
    normalised hidden state; gate/up) share one :class:`InputStats`: it is decided in the first batch (a
    layer whose first input another layer has already added joins that layer's statistics) and checked at
    the end of every batch (each layer of a shared set must have read exactly the tensors the set added, as
    many times). Where the check fails, :class:`_Unshare` is raised and the caller runs the pass again with
    ``share=False``. ``stats`` still maps every layer name to its statistics (the same object for a set).

    Early stop: the rest of a forward after the last hooked layer's input is work nobody reads (a Llama
    block's ``down_proj`` product, a quarter of its GEMMs; a whole model's head). When the first batch
    called every hooked layer exactly once, the hook of the layer it called last raises :class:`_Done` in
    later batches, once it has added its input, if every hooked layer has already been called in that
    batch (so a batch whose control flow differs, e.g. a mixture of experts routing elsewhere, runs to the
    end and loses nothing). The caller's loop catches :class:`_Done`.
    """

    def __init__(
        self, layers: Sequence[Layer], spec: StatsSpec, root: nn.Module | None = None, share: bool = True
    ) -> None:
        self.stats = {ly.name: InputStats(ly.name, spec) for ly in layers}
        self.share = share
        self.mask: Tensor | None = None
        self.outputs: dict[int, tuple[str, Tensor]] = {}
        self._seen: dict[int, _Seen] = {}  # this batch's live inputs, by id (an id is reused once freed)
        self._entries: list[_Seen] = []  # all of this batch's inputs, freed ones too
        self._read: dict[str, dict[int, int]] = {}  # this batch: per layer, times it read each token
        self._first = True
        self._tokens = 0
        self._calls: dict[str, int] = {}  # this batch: how many times each layer was called
        self._last: str | None = None  # the layer after whose input a batch may stop (see Early stop)
        self.handles = [ly.module.register_forward_pre_hook(self._hook(ly.name)) for ly in layers]
        if spec.feeders and root is not None:
            for path, m in root.named_modules():
                w = getattr(m, "weight", None)
                if path and isinstance(w, Tensor) and w.dim() == 1:
                    self.handles.append(m.register_forward_hook(self._keep(path)))

    def _keep(self, path: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                self.outputs[id(out)] = (path, out)

        return hook

    def _entry(self, x: Tensor) -> _Seen:
        seen = self._seen.get(id(x))
        if seen is None or seen.ref() is not x:
            self._tokens += 1
            seen = self._seen[id(x)] = _Seen(weakref.ref(x), self._tokens)
            self._entries.append(seen)
        return seen

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            self._calls[name] = self._calls.get(name, 0) + 1
            self._add(name, args[0])
            if name == self._last and len(self._calls) == len(self.stats):
                raise _Done

        return hook

    def _add(self, name: str, x: Tensor) -> None:
        """Add input ``x`` of layer ``name`` to its statistics (once per shared set)."""
        st = self.stats[name]
        if self.share:
            seen = self._entry(x)
            read = self._read.setdefault(name, {})
            if self._first and st.n == 0 and not read and seen.added:
                st = self.stats[name] = next(iter(seen.added))  # another layer's input: share its stats
            k = read[seen.token] = read.get(seen.token, 0) + 1
            if k <= seen.added.get(st, 0):
                return  # a layer of this set has added this tensor already
            seen.added[st] = k
        if st.n == 0 and st.spec.feeders:
            hit = self.outputs.get(id(x))
            st.feeder = hit[0] if hit is not None and hit[1] is x else None
        st.add(_mask_rows(x, self.mask))

    def end_batch(self) -> None:
        """After each batch: check that the layers of each shared set read the same tensors (else raise
        :class:`_Unshare`) and forget the batch's tensors."""
        self.outputs.clear()
        if self.share:
            owners: dict[InputStats, list[str]] = {}
            for name, st in self.stats.items():
                owners.setdefault(st, []).append(name)
            for st, names in owners.items():
                if len(names) > 1:
                    added = {s.token: s.added[st] for s in self._entries if st in s.added}
                    if any(self._read.get(n, {}) != added for n in names):
                        raise _Unshare
            self._seen.clear()
            self._entries.clear()
            self._read.clear()
        if self._first and len(self._calls) == len(self.stats) and set(self._calls.values()) == {1}:
            self._last = list(self._calls)[-1]  # dicts keep insertion order: the layer called last
        self._calls.clear()
        self._first = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs.clear()
        self._seen.clear()
        self._entries.clear()

    def close(self) -> dict[str, InputStats]:
        self.remove()
        missing = [n for n, s in self.stats.items() if s.n == 0]
        if missing:
            raise WeightsmithError(f"calibration batches never reached layer '{missing[0]}' (no inputs)")
        unique = list(dict.fromkeys(self.stats.values()))  # each shared statistics once
        for s in unique:
            s.all_reduce()
        probed = [(s, f) for s in unique if (f := s.finite()) is not None]
        if probed:
            dev = probed[0][1].device
            flags = torch.stack([f.to(dev) for _, f in probed]).tolist()  # one host sync for the block
            for (s, _), ok in zip(probed, flags, strict=True):
                if not ok:
                    s._broken()
        return self.stats


def _stats_pass(
    layers: Sequence[Layer], spec: StatsSpec, root: nn.Module, run: Callable[[_Hooks], None]
) -> dict[str, InputStats]:
    """Hooks on ``layers``, ``run(hooks)`` (which calls ``hooks.end_batch()`` after each batch), the
    statistics; run once more without sharing where the layers' inputs did not stay shared (on any rank:
    the ranks must all-reduce the same statistics objects)."""
    for share in (True, False):
        hooks = _Hooks(layers, spec, root, share)
        try:
            run(hooks)
            broke = False
        except _Unshare:
            broke = True
        except BaseException:
            hooks.remove()
            raise
        if share and not _same_sharing(hooks, broke):
            hooks.remove()
            continue
        return hooks.close()
    raise AssertionError("unreachable: the unshared pass never raises _Unshare")


def _same_sharing(hooks: _Hooks, broke: bool) -> bool:
    """Whether the shared statistics can be kept: this process's sharing held, and under
    ``torch.distributed`` every rank's held and grouped the layers alike (one collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return not broke
    first: dict[InputStats, int] = {}
    groups = [first.setdefault(st, i) for i, st in enumerate(hooks.stats.values())]
    mine = torch.tensor([int(broke), *groups], dtype=torch.int64)
    both = on_group_device(torch.cat([mine, -mine]))  # max of x and max of -x: the max and the min
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both.cpu().split(len(mine))
    return int(hi[0]) == 0 and bool(torch.equal(hi[1:], -lo[1:]))


@contextlib.contextmanager
def calibration_forward(tf32: bool = False) -> Iterator[None]:
    """The context of a calibration forward pass: float32 matrix products in TF32 where ``tf32`` asks
    (:func:`~weightsmith.linalg.tf32_matmul`), and grouped-query attention on the memory-efficient kernel
    (:func:`~weightsmith.sdpa_gqa.expanded_gqa`)."""
    with tf32_matmul(tf32), expanded_gqa():
        yield


def _call(module: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layers: Sequence[Layer],
    batches: Iterable[Any],
    spec: StatsSpec = StatsSpec(),
    tf32: bool = False,
) -> dict[str, InputStats]:
    """Run ``batches`` (dicts of model inputs, tuples or tensors) through ``model``; statistics per layer.

    For dict batches with an ``attention_mask``, padding positions are left out. ``tf32``: the passes
    (and the Gram products in the hooks) with float32 matrix products in TF32 (:func:`tf32_matmul`).
    """
    batches = list(batches)  # a second pass may be needed (inputs not shared as in the first batch)

    def run(hooks: _Hooks) -> None:
        for batch in batches:
            hooks.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            with contextlib.suppress(_Done), calibration_forward(tf32):
                _call(model, batch)
            hooks.end_batch()

    return _stats_pass(layers, spec, model, run)


# ----------------------------------------------------------------------------------------- block walking


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the ``nn.ModuleList`` of same-typed modules holding the most
    parameters (``model.layers`` for Llama, ``transformer.h`` for GPT-2, ``encoder.layer`` for BERT)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > 0 and (best is None or size > best[0]):
                best = (size, path, m)
    if best is None:
        raise WeightsmithError(
            f"{type(model).__name__} has no stack of repeated blocks (nn.ModuleList) to walk layer by layer"
        )
    return best[1], best[2]


class _Stop(Exception):
    """Raised by the hook on block 0 once its inputs are captured."""


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[no-any-return]


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer not inside ``blocks`` to ``device`` (in place: ties survive)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside and t.device != device:
            t.data = t.data.to(device)


BlockFn = Callable[[int, str, nn.Module, dict[str, InputStats]], None]

OVERLAP_TRANSFERS = True  # False: each block moves at once on the main stream (to measure what overlap saves)


class _Mover:
    """Moves blocks between their home and the device for :func:`walk_blocks`.

    On a CUDA device with the model on the host, the copies run on a side stream while the device works
    on the main stream: the next block is fetched while the current block's outputs are computed, and a
    finished block goes home (:meth:`done`, then :meth:`flush`) while the next block's statistics pass
    runs, so at most two blocks are on the device. Each copy is synchronous for the host (it returns with
    the data in place), and a block goes home only after an event on the main stream says its last pass
    is over, so the main stream never sees a half-moved block. Elsewhere every move happens at once."""

    def __init__(self, device: torch.device, home: torch.device) -> None:
        self.device, self.home = device, home
        on_gpu = device.type == "cuda" and home.type == "cpu" and OVERLAP_TRANSFERS
        self.stream = torch.cuda.Stream(device) if on_gpu else None
        self.pending: list[tuple[nn.Module, Any]] = []

    def fetch(self, block: nn.Module) -> None:
        with contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream):
            block.to(self.device)

    def done(self, block: nn.Module) -> None:
        if self.stream is None:
            block.to(self.home)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pending.append((block, event))

    def flush(self) -> None:
        for block, event in self.pending:
            assert self.stream is not None  # pending only with a side stream
            self.stream.wait_event(event)
            with torch.cuda.stream(self.stream):
                block.to(self.home)
        self.pending.clear()


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    batches: Sequence[Any],
    on_block: BlockFn,
    spec: StatsSpec = StatsSpec(),
    device: torch.device | str = "cpu",
    select: Selector | str | Sequence[str] | None = None,
    tf32: bool = False,
) -> None:
    """Calibrate ``model`` block by block with one block on ``device`` at a time (sequential onloading).

    ``on_block(index, prefix, block, stats)`` gets the statistics of the selected layers of that block
    (named as in the model, e.g. ``model.layers.3.mlp.down_proj.weight``) and may change the block in
    place; the block's outputs are then recomputed and feed the next block (a block runs once for its
    statistics and, unless it is the last, once for its changed outputs). Layers outside the blocks are not
    walked. The model's parameters end where they started (the blocks back on their own device).
    ``tf32``: the forward passes (and the Gram products in the hooks) with float32 matrix products in TF32
    (:func:`tf32_matmul`); ``on_block`` runs outside it, in the caller's precision.
    """
    device = torch.device(device)
    path, blocks = decoder_blocks(model)
    home = next(model.parameters()).device
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def catch(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    _move_outside(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            b = _to(batch, device)
            if isinstance(b, Mapping):
                b = {**b, "use_cache": False}
            with contextlib.suppress(_Stop), calibration_forward(tf32):
                _call(model, b)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise WeightsmithError(f"calibration batches never reached the first block of '{path}'")
    hidden = [_first(a) if a else k.pop("hidden_states") for a, k in captured]
    rest = [(tuple(a[1:]) if a else (), k) for a, k in captured]
    # padding positions are left out of the statistics, as in collect_stats
    masks = [b.get("attention_mask") if isinstance(b, Mapping) else None for b in batches]
    mover = _Mover(device, home)
    try:
        for i, block in enumerate(blocks):
            mover.fetch(block)  # (already there when it was fetched while the previous block ran)
            prefix = f"{path}.{i}." if path else f"{i}."
            layers = find_layers(block, prefix=prefix)
            if select is not None:
                layers = find_layers(block, select=select, prefix=prefix)
            if layers:

                def run(hooks: _Hooks, block: nn.Module = block, hidden: list[Tensor] = hidden) -> None:
                    for h, (args, kwargs), mask in zip(hidden, rest, masks, strict=True):
                        hooks.mask = mask
                        with contextlib.suppress(_Done), calibration_forward(tf32):
                            block(h, *args, **kwargs)
                        hooks.end_batch()
                    mover.flush()  # the previous block goes home while the device runs this pass

                on_block(i, prefix, block, _stats_pass(layers, spec, block, run))
            last = i + 1 == len(blocks)
            if not last:  # the changed block's outputs feed the next one (the last feeds none)
                with calibration_forward(tf32):
                    hidden = [
                        _first(block(h, *args, **kwargs))
                        for h, (args, kwargs) in zip(hidden, rest, strict=True)
                    ]
            mover.flush()
            if not last:
                mover.fetch(blocks[i + 1])  # the next block comes while the device computes these outputs
            mover.done(block)
    finally:
        mover.flush()
        _move_outside(model, blocks, home)
        blocks.to(home)


def iter_layers(model: nn.Module, names: Iterable[str]) -> Iterator[Layer]:
    """The :class:`Layer` for each weight name (an unknown name is an error naming it)."""
    table = {ly.name: ly for ly in find_layers(model, kinds=KINDS, heads=True)}
    for n in names:
        if n not in table:
            raise WeightsmithError(f"'{n}' is not a Linear/Conv1D/Embedding weight of the model")
        yield table[n]
