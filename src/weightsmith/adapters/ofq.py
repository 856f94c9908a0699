"""OFQ: oscillation-free quantisation-aware training (a QAT mode of the trainer, as an adapter).

Liu, Cheng, Huang, Xing & Shen, "Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023
(arXiv 2302.02210); background: Nagel, Fournarakis, Bondarenko & Blankevoort, "Overcoming Oscillations in
Quantization-Aware Training", ICML 2022.

The layer computes with fake-quantised latent weights ``W = W0 + D`` (``D``: the trainable parameter, zero at
the start), gradients passing the rounding straight through (STE, ``∂W_q/∂W = 1``):

**StatsQ** (statistical weight quantisation, OFQ Sec. 4.1): the scale is a statistic of the current
weights, never a learned parameter (the paper traces oscillation to the learned scale of LSQ). Per output
row ``α = 2 · mean_j |W_j|``; with ``n = 2^{b−1}`` the ``2^b`` symmetric levels ``α (k + ½) / n``,
``k = −n … n−1``:

    W_q = α · (round(clip(W / α, −1, 1) · n − ½) + ½) / n

**CGA** (confidence-guided annealing, OFQ Sec. 4.2): from ``anneal_start`` (a fraction of the run) on, at
every optimisation step the weights whose latent value sits confidently inside its bin are frozen to their
current level. With ``t = clip(W / α, −1, 1) · n − ½`` the confidence is ``c = 1 − 2 |t − round(t)|`` (1 at a
level, 0 on a rounding threshold); weights with ``c ≥ confidence`` are frozen (their integer level kept,
the scale still the row statistic, as in Nagel et al.'s freezing) and get no more gradient, so only the
uncertain weights keep moving while the trainer's schedule anneals the learning rate.

``dampen > 0`` adds Nagel et al.'s oscillation-dampening term ``dampen · Σ (W_q − clip(W))²`` (``W_q``
detached) through the adapter's ``regularizer``, pulling latent weights to their levels.

Merging writes the quantised weights into the layer (unmerging restores the originals, kept at merge
time). The frozen set lives in non-persistent buffers: a saved adapter holds ``D`` only, and reloads with
the codes ``D`` gives (the same codes unless the optimiser carried a frozen latent weight across a bin).
The output is NOT the base output at initialisation (the weights are quantised from the first step); that
is the point of the method, and the one shared adapter behaviour it cannot have.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import Adapter, AdapterConfig, AdapterContext


def stats_scale(W: Tensor) -> Tensor:
    """StatsQ's per-row scale ``α = 2 · mean|W|`` [out, 1] (detached)."""
    return (2 * W.detach().abs().mean(dim=1, keepdim=True)).clamp_min(1e-12)


def position(W: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """``t = clip(W / α, −1, 1) · n − ½`` (``n = 2^{b−1}``): the level index is ``round(t)``, thresholds sit
    at half-integers."""
    n = float(1 << (bits - 1))
    return (W / alpha).clamp(-1.0, 1.0) * n - 0.5


def level(k: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """The value of level index ``k``: ``α (k + ½) / n``."""
    n = float(1 << (bits - 1))
    return alpha * (k + 0.5) / n


def statsq(W: Tensor, bits: int) -> Tensor:
    """StatsQ fake quantisation of ``W`` [out, in] (no gradient; see :meth:`OFQAdapter.quantized`)."""
    alpha = stats_scale(W)
    k = position(W, alpha, bits).round().clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return level(k, alpha, bits)


def confidence(W: Tensor, bits: int) -> Tensor:
    """``c = 1 − 2 |t − round(t)|`` in [0, 1] for every weight (module docstring)."""
    t = position(W, stats_scale(W), bits)
    return 1.0 - 2.0 * (t - t.round()).abs()


class OFQAdapter(Adapter):
    """Trainable offset ``D`` [out, in] of the latent weights; frozen levels in non-persistent buffers."""

    needs_base_out: ClassVar[bool] = False
    frozen: Tensor
    frozen_k: Tensor

    def __init__(self, W0: Tensor, bits: int, anneal_start: float, conf: float, dampen: float) -> None:
        super().__init__()
        self.D = nn.Parameter(torch.zeros_like(W0))
        self.bits, self.anneal_start, self.conf, self.dampen = bits, anneal_start, conf, dampen
        self.register_buffer(
            "frozen", torch.zeros(W0.shape, dtype=torch.bool, device=W0.device), persistent=False
        )
        self.register_buffer("frozen_k", torch.zeros(W0.shape, device=W0.device), persistent=False)
        self._w0: Tensor | None = None  # the live base weight seen by the last forward (for the step hook)
        self._premerge: Tensor | None = None
        self.flips = 0  # level changes seen at the last step (the oscillation count)
        self._last_k: Tensor | None = None

    def latent(self, W0: Tensor) -> Tensor:
        return W0.float() + self.D.float()

    def quantized(self, W0: Tensor) -> Tensor:
        """``W_q`` with the straight-through gradient to ``D``; frozen weights keep their level."""
        W = self.latent(W0)
        alpha = stats_scale(W)
        half = 1 << (self.bits - 1)
        k = position(W, alpha, self.bits).round().clamp(-half, half - 1)
        k = torch.where(self.frozen, self.frozen_k, k)
        Wq = level(k, alpha, self.bits)
        ste = W + (Wq - W).detach()
        return torch.where(self.frozen, Wq, ste)

    def delta(self, W0: Tensor) -> Tensor:
        return self.quantized(W0) - W0.float()

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:  # type: ignore[override]
        self._w0 = W0.detach()
        return F.linear(x, self.quantized(W0).to(x.dtype))

    def merge(self, W0: Tensor) -> Tensor:
        self._premerge = W0.clone()
        return self.quantized(W0).detach()

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if self._premerge is None:
            raise WeightsmithError(
                "ofq: unmerge without a merge in this session (the originals are not kept)"
            )
        W0, self._premerge = self._premerge, None
        return W0

    def regularizer(self) -> Tensor | None:
        if not self.dampen or self._w0 is None:
            return None
        W = self.latent(self._w0)
        alpha = stats_scale(W)
        clipped = torch.maximum(torch.minimum(W, alpha), -alpha)
        return self.dampen * (statsq(W, self.bits).detach() - clipped).square().sum()

    @torch.no_grad()
    def on_train_step(self, step: int, total_steps: int) -> None:
        """Count level flips; from ``anneal_start`` on, freeze the confident weights (CGA)."""
        if self._w0 is None:
            return
        W = self.latent(self._w0)
        half = 1 << (self.bits - 1)
        k = position(W, stats_scale(W), self.bits).round().clamp(-half, half - 1)
        if self._last_k is not None:
            self.flips = int(((k != self._last_k) & ~self.frozen).sum())
        self._last_k = k
        if total_steps <= 0 or step < math.ceil(self.anneal_start * total_steps):
            return
        new = (confidence(W, self.bits) >= self.conf) & ~self.frozen
        self.frozen_k[new] = k[new]
        self.frozen |= new
        if self.D.grad is not None:
            self.D.grad[self.frozen] = 0


@register_config("ofq", kind="adapter")
class OFQ(AdapterConfig):
    """Oscillation-free QAT (``bits`` 2-8; CGA from ``anneal_start`` (fraction of the steps; 1 = off) at
    confidence ``confidence``; Nagel et al.'s ``dampen`` weight, 0 = off)."""

    default_lr: ClassVar[float] = 1e-4
    # the layer runs quantised from the first step: the adapted model is not the base model at init
    identity_at_init: ClassVar[bool] = False
    bits: int = 2
    anneal_start: float = 0.75
    confidence: float = 0.8
    dampen: float = 0.0

    @classmethod
    def example(cls) -> OFQ:
        return cls(bits=4)

    def create(self, W0: Tensor, ctx: AdapterContext) -> OFQAdapter:
        if not 2 <= self.bits <= 8:
            raise ctx.error(f"ofq option bits={self.bits}: weight quantisation supports 2 to 8 bits")
        if not 0.0 <= self.anneal_start <= 1.0 or not 0.0 <= self.confidence <= 1.0:
            raise ctx.error(
                f"ofq options anneal_start={self.anneal_start}, confidence={self.confidence}: both in [0, 1]"
            )
        if self.dampen < 0:
            raise ctx.error(f"ofq option dampen={self.dampen}: must be >= 0")
        if ctx.kind != "linear":
            raise ctx.error("ofq quantises Linear / Conv1D weights only, not embeddings")
        return OFQAdapter(W0, self.bits, self.anneal_start, self.confidence, self.dampen)
