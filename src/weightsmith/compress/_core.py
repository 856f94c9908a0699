"""The compress job: ``compress(model, Config(...), calib=...)`` quantises the selected layers in place.

Every method is a registered frozen dataclass (kind ``"compress"``) deriving from :class:`CompressConfig`.
A data-free method implements ``quantize(W, None)``; a calibrated one says so with ``needs_calibration``
and gets each layer's :class:`~weightsmith.layers.InputStats`, gathered block by block with one decoder
block on the device (:func:`~weightsmith.layers.walk_blocks`), so every block is calibrated on the outputs
of the already-quantised blocks before it. A method that must see a whole block at once (AWQ folds scales
into the previous operation) overrides ``compress_block``. A method that must see every layer before it
changes any (low-rank compression with a global rank allocation) does its whole work in :meth:`plan`.

Data-parallel under torchrun: each process calibrates on its share of the samples (``rank`` and
``world_size`` of :func:`calibration_batches`), the walker sums the statistics over the processes
(:meth:`~weightsmith.layers.InputStats.all_reduce`), every process compresses the block from the same
statistics, and rank 0's weights are broadcast before the next block (rank 0 writes the output).

The model keeps the dense weights it now stands for (``Ŵ = s (q − z)`` for a quantiser, the pruned matrix
for a pruner, ``A B`` for a low-rank factorisation): it runs as before, with the compression error. The
compact form (integer codes and scales, mask, factors: anything :class:`Compressed`) is returned in the
report for the writers in ``_format.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import assets
from ..errors import WeightsmithError
from ..layers import (
    InputStats,
    Layer,
    StatsSpec,
    collect_stats,
    decoder_blocks,
    find_layers,
    on_group_device,
    walk_blocks,
)
from ..progress import log
from ._datafree import LOG_EVERY, batch_quantizer, compress_data_free, relative_error
from ._grid import QuantizedWeight, check_bits

PACKAGED_TEXTS = ("hamlet",)
COMMON_GROUPS = (32, 64, 128, 256)


@runtime_checkable
class Compressed(Protocol):
    """One compressed weight (:class:`~._grid.QuantizedWeight`, :class:`~._sparse.SparseWeight`,
    :class:`~._lowrank.LowRankWeight`): it can give back the dense ``[out, in]`` weight it stands for."""

    def dequantize(self) -> Tensor: ...


@dataclass(frozen=True)
class PlanJob:
    """What :meth:`CompressConfig.plan` works on: the model, its selected layers, the calibration batches
    (None for a data-free method) and the device."""

    model: nn.Module
    layers: Sequence[Layer]
    calib: Sequence[Any] | None
    device: torch.device


@dataclass(frozen=True)
class CompressConfig:
    """Options every weight quantiser shares.

    ``bits`` (2-8); ``group_size`` (input columns per scale; 0 = one scale per output row); ``symmetric``
    (zero point fixed at the middle of the grid; the default, because transformers cannot yet load
    asymmetric compressed-tensors checkpoints, llm-compressor issue #1618, though vLLM can); ``targets``
    (a selector of weight names; default: every Linear/Conv1D outside the heads); ``tf32`` (CUDA only;
    methods calibrated through the layer walker): the calibration forward passes and the Gram matrices of
    float32 layers with TF32 matrix products (:func:`~weightsmith.layers.tf32_matmul`); the method's own
    arithmetic (GPTQ's solve, AWQ's search) stays float32. Off by default.
    """

    calibrated: ClassVar[bool] = False
    default_format: ClassVar[str] = "compressed-tensors"  # the CLI's --format when none is given
    verb: ClassVar[str] = "quantised"  # what was done to a layer, for the CLI's summary
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    targets: str | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size < 0:
            raise WeightsmithError(f"--group-size {self.group_size}: use 0 (per-channel) or a positive size")
        check_tf32(self)

    def needs_calibration(self) -> bool:
        return self.calibrated

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=False, channels=False)

    def data_parallel(self) -> bool:
        """Whether the calibration may be split over processes under torchrun: yes for a data-free method
        and for one whose statistics all come from the layer walker (it does not override :meth:`plan`).
        A :meth:`plan` of its own may make passes over the samples that the walker does not sum over the
        processes (gradients, losses), so such a method says yes itself once its passes are reduced."""
        return not self.needs_calibration() or type(self).plan is CompressConfig.plan

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Refuse, before any work, options that do not fit the selected layers (here: the group size)."""
        check_group_size(layers, self.group_size)

    def describe(self, report: CompressReport) -> str:
        """One line on the stored size of the result, for the CLI's summary."""
        return f"{report.bits_per_weight:.2f} bits/weight"

    def check_format(self, fmt: str) -> None:
        """Refuse an output format that cannot hold this method's result (every format holds quantised)."""

    def plan(self, job: PlanJob) -> CompressReport | None:
        """Compress all of ``layers`` at once and return the report, or None (the default) to let
        :func:`compress` go layer by layer (:meth:`quantize`) or block by block (:meth:`compress_block`).
        A method whose choices for one layer depend on every other layer (a global rank budget) does its
        whole work here."""
        return None

    def quantize(self, W: Tensor, stats: InputStats | None) -> QuantizedWeight:
        """Quantise one ``[out, in]`` float32 weight (``stats``: its inputs' statistics, if calibrated).

        Every quantiser defines this; a method that compresses whole blocks overrides ``compress_block``."""
        raise TypeError(f"{type(self).__name__} must define quantize(W, stats) or override compress_block")

    def compress_block(
        self, block: nn.Module | None, layers: Sequence[Layer], stats: dict[str, InputStats] | None
    ) -> dict[str, Compressed]:
        """Compress the ``layers`` of one block; write ``Ŵ`` back into each. Default: layer by layer."""
        out: dict[str, Compressed] = {}
        for ly in layers:
            W = ly.weight().detach().float()
            qw = self.quantize(W, None if stats is None else stats[ly.name])
            ly.write(qw.dequantize())
            out[ly.name] = qw
        return out


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F


@dataclass
class CompressReport:
    """What ``compress`` did: the config, per-layer errors, wall time, and the compressed weights."""

    config: CompressConfig
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    weights: dict[str, Compressed] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Whether every compressed weight is a quantised one (integer codes and scales)."""
        return bool(self.weights) and all(isinstance(w, QuantizedWeight) for w in self.weights.values())

    @property
    def bits_per_weight(self) -> float | None:
        """Stored bits per quantised weight, counting a 16-bit scale (and zero point) per group; None for
        a pruned or low-rank result (the weights keep their dtype)."""
        if not self.quantized:
            return None
        c = self.config
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        groups = sum(r.shape[0] * (r.shape[1] // (c.group_size or r.shape[1])) for r in self.layers)
        return c.bits + groups * (16 + (0 if c.symmetric else c.bits)) / max(total, 1)


def check_group_size(layers: Sequence[Layer], group_size: int) -> None:
    """Refuse a group size that does not divide every layer's input size, saying which would."""
    if group_size == 0:
        return
    bad = [ly for ly in layers if ly.shape[1] % group_size]
    if not bad:
        return
    g = 0
    for ly in layers:
        g = math.gcd(g, ly.shape[1])
    fits = [str(s) for s in COMMON_GROUPS if g % s == 0] + ["0 (per-channel)"]
    names = ", ".join(f"{ly.name} (in={ly.shape[1]})" for ly in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise WeightsmithError(
        f"--group-size {group_size} does not divide the input size of {len(bad)} layer(s): {names}{more}; "
        f"group sizes that divide every layer: {', '.join(fits)}"
    )


def check_tf32(config: CompressConfig, device: torch.device | None = None) -> None:
    """Refuse the ``tf32`` option where it would do nothing: for a method whose calibration passes are not
    the layer walker's (a data-free method has none; one that overrides :meth:`CompressConfig.plan` makes
    its own passes, which the option does not reach), and, once the ``device`` is known, on a device other
    than CUDA (the CPU has no TF32 matrix products: the run would be the float32 one, labelled otherwise)."""
    method = getattr(type(config), "method", type(config).__name__)  # registered configs have a name
    if not isinstance(config.tf32, bool):
        raise WeightsmithError(f"{method} option tf32={config.tf32!r}: must be true or false")
    if not config.tf32:
        return
    if device is not None and device.type != "cuda":
        raise WeightsmithError(
            f"--tf32: TF32 matrix products exist on CUDA devices only, not on '{device}'; "
            "drop --tf32 or use --device cuda"
        )
    if not config.needs_calibration() or type(config).plan is not CompressConfig.plan:
        what = "is data-free" if not config.needs_calibration() else "makes its own calibration passes"
        raise WeightsmithError(
            f"--tf32: '{method}' {what}; the option applies to the layer walker's calibration passes "
            "(gptq, awq, sparsegpt, wanda, ...): drop --tf32"
        )


def target_layers(model: nn.Module, config: CompressConfig) -> list[Layer]:
    layers = find_layers(model, select=config.targets)
    if not layers:
        what = f"selector '{config.targets}'" if config.targets else "the default selection"
        raise WeightsmithError(
            f"{type(model).__name__}: {what} matches no quantisable layer "
            "(nn.Linear / Conv1D outside the heads)"
        )
    config.check_layers(layers)
    return layers


def _record(
    report: CompressReport,
    layers: Sequence[Layer],
    originals: dict[str, Tensor],
    done: dict[str, Compressed],
    home: torch.device | None = None,
) -> None:
    """Report each layer's relative error (one host sync for all) and keep its result in ``home``."""
    errs: list[Tensor] = []
    for ly in layers:
        W = originals[ly.name]  # codes (a byte a weight) go to W's device, not Ŵ (four) to theirs
        errs.append(relative_error(W, _at_home(done[ly.name], W.device).dequantize().to(W.device)))
    dev = errs[0].device if errs else None
    values = torch.stack([e.to(dev) for e in errs]).tolist() if errs else []  # one host sync, not one a layer
    lines = [_record_one(report, ly, err, done[ly.name]) for ly, err in zip(layers, values, strict=True)]
    log("\n".join(lines), markup=False)
    if home is not None:
        for ly in layers:
            report.weights[ly.name] = _at_home(report.weights[ly.name], home)


def _at_home(c: Compressed, home: torch.device) -> Compressed:
    """A quantised weight's codes and grid moved to where the model lives: with the model in host memory
    the codes of every layer (a byte a weight: a gigabyte for a 1.1B model) must not pile up on the GPU."""
    if not isinstance(c, QuantizedWeight):
        return c
    if c.scale.device == home and (not c.holds_codes or c.q.device == home):
        return c
    return c.to(home)


def _record_one(report: CompressReport, ly: Layer, err: float, compressed: Compressed) -> str:
    """Add one layer's result to ``report``; returns its log line (callers print lines in groups: one
    styled print per layer costs as much as quantising a layer on a GPU)."""
    report.layers.append(LayerReport(ly.name, ly.shape, err))
    report.weights[ly.name] = compressed
    return f"  {ly.name} {ly.shape[0]}x{ly.shape[1]}: relative error {err:.4f}"


def compress(
    model: nn.Module,
    config: CompressConfig,
    calib: Sequence[Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, CompressReport]:
    """Compress ``model``'s selected layers in place; returns ``(model, report)``.

    ``calib``: a list of model inputs (dicts such as ``{"input_ids": ...}``) for calibrated methods; see
    :func:`calibration_batches`. ``device``: where each block (or layer) is worked on; the model stays
    where it is.
    """
    t0 = time.perf_counter()
    dev = torch.device(device)
    check_tf32(config, dev)
    tf32 = config.tf32
    layers = target_layers(model, config)
    planned = config.plan(PlanJob(model, layers, calib, dev))
    if planned is not None:
        planned.seconds = time.perf_counter() - t0
        return model, planned
    report = CompressReport(config)
    method = type(config).method  # type: ignore[attr-defined]
    if not config.needs_calibration():
        lines = []
        quantize = lambda W: config.quantize(W, None)  # noqa: E731
        for r in compress_data_free(layers, quantize, dev, batched=batch_quantizer(config)):
            lines.append(_record_one(report, r.layer, r.rel_error, r.compressed))
            if len(lines) == LOG_EVERY:  # the results come in groups of LOG_EVERY anyway (one sync each)
                log("\n".join(lines), markup=False)
                lines.clear()
        if lines:
            log("\n".join(lines), markup=False)
        report.seconds = time.perf_counter() - t0
        return model, report
    if not calib:
        raise WeightsmithError(f"'{method}' needs calibration data: pass calib= (see calibration_batches)")
    spec = config.stats_spec()
    chosen = {ly.name for ly in layers}
    home = next((p.device for p in model.parameters()), None)  # where the results are kept
    try:
        path, _ = decoder_blocks(model)
    except WeightsmithError:  # no repeated blocks (a plain MLP): one pass over the whole model
        path = None
    outside = [ly for ly in layers if path is None or not ly.name.startswith(path + ".")]
    if outside:  # statistics from the unquantised model; quantised after the blocks
        outside_stats = collect_stats(model, outside, calib, spec, tf32=tf32)

    def on_block(index: int, prefix: str, block: nn.Module, stats: dict[str, InputStats]) -> None:
        mine = [ly for ly in find_layers(block, prefix=prefix, select=config.targets) if ly.name in chosen]
        if not mine:
            return
        log(f"block {index}: {len(mine)} layer(s)")
        originals = {ly.name: ly.weight().detach().float().clone() for ly in mine}
        done = config.compress_block(block, mine, stats)
        _from_rank0([block])
        _record(report, mine, originals, done, home)

    if path is not None:
        walk_blocks(model, list(calib), on_block, spec, device=dev, select=config.targets, tf32=tf32)
    if outside:
        originals = {ly.name: ly.weight().detach().float().clone() for ly in outside}
        done = config.compress_block(None, outside, outside_stats)
        _from_rank0([ly.module for ly in outside])
        _record(report, outside, originals, done, home)
    report.seconds = time.perf_counter() - t0
    return model, report


def _from_rank0(modules: Sequence[nn.Module]) -> None:
    """Data-parallel (under torchrun): every rank compressed the same block from the same all-reduced
    statistics; rank 0's parameters are broadcast so that all ranks surely go on from one model (the next
    block's inputs), whatever the arithmetic of each device. A no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                data = p.data
                buf = on_group_device(data)
                dist.broadcast(buf, src=0)
                if buf is not data:
                    data.copy_(buf)


# ----------------------------------------------------------------------------------------- calibration


def calibration_text(calib: str) -> str:
    """A packaged text's training part (its first 90 %; the rest is held out) or a user's text file."""
    if calib in PACKAGED_TEXTS:
        text = assets.load_text(calib)
        return text[: text.rfind("\n", 0, int(len(text) * 0.9)) + 1]
    p = Path(calib).expanduser()
    if not p.is_file():
        raise WeightsmithError(
            f"--calib {calib}: not a packaged text ({', '.join(PACKAGED_TEXTS)}) and not a text file"
        )
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsmithError(f"--calib {calib}: cannot read it as UTF-8 text ({exc})") from exc


def calibration_batches(
    tokenizer: Any,
    calib: str = "hamlet",
    samples: int = 32,
    seq_len: int = 512,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, Tensor]]:
    """``samples`` windows of ``seq_len`` tokens evenly spaced over the text, ``batch_size`` per batch.

    Data-parallel (``world_size`` processes): process ``rank`` gets its contiguous share of the windows,
    ``samples[rank * samples // world_size : (rank + 1) * samples // world_size]``, so the shares taken in
    rank order are the windows one process would use."""
    if samples < 1 or seq_len < 2:
        raise WeightsmithError(
            f"--samples {samples} / --seq-len {seq_len}: need at least 1 sample of 2 tokens"
        )
    if samples < world_size:
        raise WeightsmithError(
            f"--samples {samples}: fewer calibration windows than the {world_size} processes; "
            f"use --samples {world_size} or more (each process needs at least one)"
        )
    ids = tokenizer(calibration_text(calib), return_tensors="pt").input_ids[0]
    need = samples * seq_len
    if len(ids) < need:
        raise WeightsmithError(
            f"--calib {calib}: too little text, {len(ids)} tokens for --samples {samples} x --seq-len "
            f"{seq_len} = {need}; lower --samples or --seq-len, or give a longer text"
        )
    stride = (len(ids) - seq_len) // max(samples - 1, 1)
    windows = torch.stack([ids[i * stride : i * stride + seq_len] for i in range(samples)])
    windows = windows[rank * samples // world_size : (rank + 1) * samples // world_size]
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size)]


def heldout_text(calib: str = "hamlet") -> str:
    """The held-out part (last 10 %) of a packaged text, for perplexity after compression."""
    text = assets.load_text(calib)
    return text[text.rfind("\n", 0, int(len(text) * 0.9)) + 1 :]
