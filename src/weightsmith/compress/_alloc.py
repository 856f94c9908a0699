"""Shared pieces of the methods that choose per layer before they change any layer (BitStack's activation
scales, ShiftAddLLM's mixed bits): a read-only calibration pass that keeps one number (or vector) per
layer, and the allocation of bit widths under an average-bit budget.

:func:`per_layer` walks the model block by block (:func:`~weightsmith.layers.walk_blocks`, one block on
the device) without changing it, and keeps only ``fn(layer, stats)`` of each layer, so the Gram matrices
of one block at a time are in memory, never all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec, collect_stats, decoder_blocks, walk_blocks

T = TypeVar("T")


def per_layer(
    model: nn.Module,
    layers: Sequence[Layer],
    calib: Sequence[Any] | None,
    spec: StatsSpec,
    fn: Callable[[Layer, InputStats], T],
    device: torch.device,
    method: str,
) -> dict[str, T]:
    """``{layer name: fn(layer, its input statistics)}`` from one pass of ``calib`` through the unchanged
    model (block by block where the model has repeated blocks; the other layers in one whole-model pass)."""
    if not calib:
        raise WeightsmithError(f"'{method}' needs calibration data: pass calib= (see calibration_batches)")
    by_name = {ly.name: ly for ly in layers}
    out: dict[str, T] = {}
    try:
        path: str | None = decoder_blocks(model)[0]
    except WeightsmithError:
        path = None

    def on_block(_i: int, _prefix: str, _block: nn.Module, stats: dict[str, InputStats]) -> None:
        for name, st in stats.items():
            if name in by_name:
                out[name] = fn(by_name[name], st)

    if path is not None:
        walk_blocks(model, list(calib), on_block, spec, device=device, select=list(by_name))
    rest = [ly for ly in layers if ly.name not in out]
    if rest:
        for name, st in collect_stats(model, rest, calib, spec).items():
            out[name] = fn(by_name[name], st)
    return out


def allocate_bits(
    sensitivity: dict[str, float], sizes: dict[str, int], avg_bits: float, choices: Sequence[int]
) -> dict[str, int]:
    """Bit widths from ``choices`` (ascending) whose size-weighted mean is at most ``avg_bits``: every layer
    starts at the widest choice not above the budget, then layers are raised one step at a time in order of
    decreasing sensitivity while the budget allows (ShiftAddLLM's rule: the most sensitive layers get the
    higher bit width). The budget counts code bits only (``Σ_ℓ b_ℓ n_ℓ ≤ avg_bits · Σ_ℓ n_ℓ``)."""
    choices = sorted(choices)
    base = max((b for b in choices if b <= avg_bits + 1e-9), default=None)
    if base is None:
        raise WeightsmithError(f"avg_bits={avg_bits}: below the smallest bit width {choices[0]}")
    bits = {n: base for n in sensitivity}
    budget = avg_bits * sum(sizes.values())
    spent = base * sum(sizes.values())
    order = sorted(sensitivity, key=lambda n: -sensitivity[n])
    for step in [b for b in choices if b > base]:
        for name in order:
            extra = (step - bits[name]) * sizes[name]
            if bits[name] < step and spent + extra <= budget + 1e-6:
                bits[name] = step
                spent += extra
    return bits


def mean_bits(bits: dict[str, int], sizes: dict[str, int]) -> float:
    """The size-weighted mean of per-layer bit widths."""
    total = sum(sizes[n] for n in bits)
    return math.fsum(bits[n] * sizes[n] for n in bits) / max(total, 1)
