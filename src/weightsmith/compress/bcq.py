"""BCQ: binary-coding quantisation, greedy then alternating least squares, optionally with shift-only scales.

Each group ``w`` (``group_size`` consecutive weights of a row; ``group_size = 0``: the whole row) is
written as a sum of ``k = bits`` scaled binary vectors,

    w ≈ ŵ = Σ_{i<k} α_i b_i,   b_i ∈ {−1, +1}^g,  α_i ≥ 0.

Greedy initialisation (Xu et al., "Alternating Multi-bit Quantization for Recurrent Neural Networks",
ICLR 2018; Guo et al., "Network Sketching", 2017): with the residual ``r_0 = w``,

    b_i = sign(r_i),   α_i = ⟨b_i, r_i⟩ / g = mean|r_i|,   r_{i+1} = r_i − α_i b_i.

Alternating refinement (Xu et al. 2018), ``iters`` rounds of two exact minimisations of
``‖w − B α‖²`` (``B = [b_0 … b_{k−1}]``, g × k):

    α ← (BᵀB)⁺ Bᵀ w                                   (least squares, B fixed)
    B_j ← argmin_{c ∈ {−1,+1}^k} (w_j − cᵀα)²         (each weight to the nearest of the 2^k sums, α fixed)

Both steps can only lower the error, so it is non-increasing over the rounds and never above the greedy
one. ShiftAddLLM (You et al., "ShiftAddLLM: Accelerating Pretrained LLMs via Post-Training
Multiplication-Less Reparameterization", NeurIPS 2024) applies BCQ to LLM weights and rounds every
``α_i`` to a power of two, ``α_i ← 2^round(log₂ α_i)``, so ``Σ α_i (b_i · x)`` needs shifts and adds only;
with ``po2_scales`` the rounded scales are then refined one at a time over powers of two, alternating with
the ``B`` step (:func:`po2_refine`).

The scales are stored in float16: after the fit they are rounded to float16 and the codes refitted to the
rounded scales (one more ``B`` step), so the stored codes and scales give back exactly the model's weights.

**Mixed bits** (ShiftAddLLM Sec. 4.3, "automated bit allocation"): with ``avg_bits`` set, each layer gets
``⌊avg_bits⌋`` or ``⌈avg_bits⌉`` bits, the higher width going to the most sensitive layers while the
size-weighted mean stays within the budget (:func:`~._alloc.allocate_bits`). Sensitivity is the paper's
criterion, computed from calibration inputs ``X`` of the layer: with ``U`` the upper Cholesky factor of
``(H + λI)⁻¹``, ``H = 2XᵀX/n`` (as in GPTQ), and ``W_H = W diag(U)⁻¹`` (each column divided by ``U_jj``),

    sensitivity = ‖W_H‖_F · std(W_H)²

which the paper reports ranks the layers' reparameterisation errors with Kendall τ = 0.905.

The codes are not an integer grid (the ``2^k`` levels ``Σ ±α_i`` are not evenly spaced), so the result is
a :class:`BCQWeight`: ``--format weightsmith`` stores the packed codes and float16 scales (read back by
``ws.load_compressed``), ``--format dense`` the weights they stand for; compressed-tensors cannot hold it.
ShiftAddLLM's calibrated multi-objective fit (GPTQ-style error feedback) is not part of this method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ..progress import log
from ._alloc import allocate_bits, mean_bits, per_layer
from ._core import CompressConfig, CompressReport, PlanJob, _record
from ._grid import check_bits, grouped
from ._sparse import refuse_compressed_tensors
from .gptq import inverse_hessian_factor


@dataclass
class BCQWeight:
    """Binary codes and scales of one ``[out, in]`` weight: ``codes`` [out, in] (uint8; bit ``i`` set where
    ``b_i = +1``), ``alpha`` [out, groups, bits] (float32, positive), ``Ŵ = Σ_i α_i b_i`` per group."""

    codes: Tensor
    alpha: Tensor
    bits: int
    group_size: int  # 0: one group per row

    def dequantize(self) -> Tensor:
        out_f, in_f = self.codes.shape
        g = self.group_size or in_f
        signs = _signs(self.codes.view(out_f, in_f // g, g), self.bits)  # [out, groups, g, bits]
        return (signs * self.alpha.unsqueeze(-2)).sum(-1).view(out_f, in_f)


def _signs(codes: Tensor, bits: int) -> Tensor:
    """The ±1 vectors ``b_i`` [..., bits] of integer codes (bit ``i`` of the code: ``b_i = +1``)."""
    shifts = torch.arange(bits, device=codes.device)
    return ((codes.long().unsqueeze(-1) >> shifts) & 1).float() * 2 - 1


def greedy_bcq(Wg: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Greedy binary coding of ``Wg`` [..., g]: signs [..., g, bits] and scales [..., bits] (eq. 4)."""
    r = Wg.clone()
    signs, alphas = [], []
    for _ in range(bits):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(-1)
        r = r - a.unsqueeze(-1) * b
        signs.append(b)
        alphas.append(a)
    return torch.stack(signs, -1), torch.stack(alphas, -1)


def refit_alpha(Wg: Tensor, B: Tensor) -> Tensor:
    """Least-squares scales ``α = (BᵀB)⁺ Bᵀ w`` per group (``B`` [..., g, k]); min-norm if BᵀB is singular."""
    Bd = B.double()
    G = Bd.transpose(-1, -2) @ Bd
    c = (Bd.transpose(-1, -2) @ Wg.double().unsqueeze(-1)).squeeze(-1)
    return (torch.linalg.pinv(G, hermitian=True) @ c.unsqueeze(-1)).squeeze(-1).float()


def nearest_codes(Wg: Tensor, alpha: Tensor) -> Tensor:
    """Each weight of ``Wg`` [..., g] to the nearest of the ``2^k`` sums ``Σ ±α_i``: codes [..., g] (long)."""
    k = alpha.shape[-1]
    table = _signs(torch.arange(1 << k, device=Wg.device), k)  # [2^k, k]
    levels = alpha @ table.T  # [..., 2^k]
    sorted_levels, order = levels.sort(-1)
    flat_levels = sorted_levels.reshape(-1, 1 << k)
    flat_w = Wg.reshape(flat_levels.shape[0], -1).contiguous()
    hi = torch.searchsorted(flat_levels, flat_w).clamp(max=(1 << k) - 1)
    lo = (hi - 1).clamp(min=0)
    pick_lo = (flat_w - flat_levels.gather(-1, lo)).abs() < (flat_levels.gather(-1, hi) - flat_w).abs()
    idx = torch.where(pick_lo, lo, hi)  # a tie goes up: sign(0) = +1 as in the greedy step
    return order.reshape(-1, 1 << k).gather(-1, idx).reshape(Wg.shape)


def power_of_two(alpha: Tensor) -> Tensor:
    """``2^round(log₂ α)`` for positive ``α``; zero scales stay zero (ShiftAddLLM)."""
    return torch.where(alpha > 0, torch.exp2(torch.log2(alpha.clamp_min(1e-38)).round()), 0.0)


def _sse(Wg: Tensor, B: Tensor, alpha: Tensor) -> float:
    return float((Wg - (B * alpha.unsqueeze(-2)).sum(-1)).double().square().sum())


def _sign_table(bits: int, device: torch.device) -> Tensor:
    return _signs(torch.arange(1 << bits, device=device), bits)


def bcq_fit(Wg: Tensor, bits: int, iters: int) -> tuple[Tensor, Tensor, list[float]]:
    """Greedy + ``iters`` alternating rounds on ``Wg`` [..., g]: signs [..., g, bits], positive scales
    [..., bits], and the squared error ``‖w − ŵ‖²`` summed over groups after the greedy step and after every
    half-step (α refit, then B refit)."""
    table = _sign_table(bits, Wg.device)
    B, alpha = greedy_bcq(Wg, bits)
    history = [_sse(Wg, B, alpha)]
    for _ in range(iters):
        alpha = refit_alpha(Wg, B)
        history.append(_sse(Wg, B, alpha))
        B = table[nearest_codes(Wg, alpha)]
        history.append(_sse(Wg, B, alpha))
    # a negative scale is the same term with its signs flipped; keep every α ≥ 0
    B = B * torch.where(alpha < 0, -1.0, 1.0).unsqueeze(-2)
    return B, alpha.abs(), history


def po2_refine(Wg: Tensor, B: Tensor, alpha: Tensor, rounds: int) -> tuple[Tensor, Tensor, list[float]]:
    """Power-of-two scales for the codes ``B`` [..., g, k] and scales ``alpha`` [..., k] of :func:`bcq_fit`.

    Plain rounding ``2^round(log₂ α_i)`` can break the balance ALS found (on heavy-tailed rows the levels
    ``Σ ±α_i`` then miss zero and the error exceeds ‖w‖), so after rounding each of ``rounds`` passes
    takes every ``α_i`` in turn to the best power of two with the others fixed (the error is a convex
    quadratic in ``α_i``, minimised at ``a* = ⟨b_i, r_i⟩ / g`` with ``r_i = w − Σ_{j≠i} α_j b_j``, so the best
    power of two is ``2^⌊log₂|a*|⌋`` or ``2^⌈log₂|a*|⌉``; a negative ``a*`` flips ``b_i``), then refits the
    codes (the ``B`` step). Every step is a minimisation, so the error is non-increasing from the rounded
    start. Returns the signs, the scales and the error history."""
    k, g = alpha.shape[-1], Wg.shape[-1]
    table = _sign_table(k, Wg.device)
    B, alpha = B.clone(), power_of_two(alpha)
    history = [_sse(Wg, B, alpha)]
    for _ in range(rounds):
        for i in range(k):
            b = B[..., i]
            r = Wg - (B * alpha.unsqueeze(-2)).sum(-1) + alpha[..., i : i + 1] * b
            d = (b * r).sum(-1)
            e = torch.log2((d / g).abs().clamp_min(1e-30))
            lo, hi = torch.exp2(e.floor()), torch.exp2(e.ceil())
            cost_lo = lo * lo * g - 2 * lo * d.abs()  # ‖r − c b‖² − ‖r‖² at c = ±lo (sign of d)
            cost_hi = hi * hi * g - 2 * hi * d.abs()
            a = torch.where(cost_lo <= cost_hi, lo, hi)
            flip = torch.where(d < 0, -1.0, 1.0)
            B[..., i] = b * flip.unsqueeze(-1)
            alpha[..., i] = a
        history.append(_sse(Wg, B, alpha))
        B = table[nearest_codes(Wg, alpha)]
        history.append(_sse(Wg, B, alpha))
    return B, alpha, history


def _codes(B: Tensor) -> Tensor:
    """Integer codes (bit ``i`` set where ``b_i = +1``) of signs ``B`` [..., bits]."""
    weights = 2 ** torch.arange(B.shape[-1], device=B.device)
    return ((B > 0).long() * weights).sum(-1)


def sensitivity(W: Tensor, H: Tensor, damp: float = 0.01) -> float:
    """ShiftAddLLM's layer sensitivity ``‖W_H‖_F · std(W_H)²`` , ``W_H = W diag(U)⁻¹`` (module docstring)."""
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    WH = W.float() / inverse_hessian_factor(H, damp).diagonal().unsqueeze(0)
    return float(WH.norm() * WH.std().square())


def bcq_quantize(W: Tensor, bits: int, group_size: int, iters: int, po2_scales: bool) -> BCQWeight:
    """BCQ of one ``[out, in]`` weight with float16 scales (module docstring)."""
    Wg = grouped(W.float(), group_size)
    B, alpha, _ = bcq_fit(Wg, bits, iters)
    if po2_scales:
        B, alpha, _ = po2_refine(Wg, B, alpha, max(iters, 1))
    alpha = alpha.half().float()
    idx = nearest_codes(Wg, alpha)
    codes = idx.reshape(W.shape).to(torch.uint8)
    return BCQWeight(codes, alpha, bits, group_size)


@register_config("bcq", kind="compress")
class BCQ(CompressConfig):
    """Binary-coding quantisation: ``bits`` scaled ±1 vectors per group, greedy then ``iters`` rounds of
    alternating least squares; ``po2_scales`` rounds the scales to powers of two (ShiftAddLLM);
    ``avg_bits`` (0: off) mixes ``⌊avg_bits⌋`` and ``⌈avg_bits⌉`` bits by layer sensitivity (calibrated)."""

    default_format = "dense"
    bits: int = 3
    iters: int = 15
    po2_scales: bool = False
    avg_bits: float = 0.0
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0:
            raise WeightsmithError(f"bcq option iters={self.iters}: use 0 (greedy only) or more rounds")
        if not self.symmetric:
            raise WeightsmithError("bcq codes are ±1 sums with no zero point; it has no asymmetric form")
        if self.avg_bits:
            check_bits(math.floor(self.avg_bits), "bcq option avg_bits")
            check_bits(math.ceil(self.avg_bits), "bcq option avg_bits")
        if not self.damp > 0:
            raise WeightsmithError(f"bcq option damp={self.damp}: must be > 0")

    def needs_calibration(self) -> bool:
        return bool(self.avg_bits)

    def check_format(self, fmt: str) -> None:
        refuse_compressed_tensors(
            fmt,
            "binary codes (their 2^bits levels are not an integer grid)",
            "packed codes and scales, read by ws.load_compressed",
            "the weights the codes stand for, loads anywhere",
        )

    def describe(self, report: CompressReport) -> str:
        ws = {n: w for n, w in report.weights.items() if isinstance(w, BCQWeight)}
        sizes = {r.name: r.shape[0] * r.shape[1] for r in report.layers}
        total = sum(sizes.values())
        code = mean_bits({n: w.bits for n, w in ws.items()}, sizes)
        scale_bits = 8 if self.po2_scales else 16  # a power of two needs only its exponent
        scales = sum(w.alpha.numel() for w in ws.values()) * scale_bits
        return f"{code + scales / max(total, 1):.2f} bits/weight (binary codes, {code:.2f} code bits)"

    def quantize(self, W: Tensor, stats: InputStats | None) -> BCQWeight:  # type: ignore[override]
        return bcq_quantize(W, self.bits, self.group_size, self.iters, self.po2_scales)

    def allocate(
        self, model: nn.Module, layers: Sequence[Layer], calib: Sequence[Any] | None, device: torch.device
    ) -> dict[str, int]:
        """Per-layer bit widths under ``avg_bits`` from the layers' sensitivities (module docstring)."""
        score = per_layer(
            model,
            layers,
            calib,
            StatsSpec(gram=True, channels=False),
            lambda ly, st: sensitivity(ly.weight().detach().float(), st.hessian(), self.damp),
            device,
            "bcq",
        )
        sizes = {ly.name: ly.shape[0] * ly.shape[1] for ly in layers}
        choices = sorted({math.floor(self.avg_bits), math.ceil(self.avg_bits)})
        return allocate_bits(score, sizes, self.avg_bits, choices)

    def plan(self, job: PlanJob) -> CompressReport | None:
        """Mixed bits must rank every layer first; uniform bits go layer by layer (``None``)."""
        model, layers, calib, device = job.model, job.layers, job.calib, job.device
        if not self.avg_bits:
            return None
        bits = self.allocate(model, layers, calib, device)
        report = CompressReport(self)
        for ly in layers:
            W = ly.weight().detach().to(device, torch.float32, copy=True)
            qw = bcq_quantize(W, bits[ly.name], self.group_size, self.iters, self.po2_scales)
            ly.write(qw.dequantize())
            log(f"  {ly.name}: {qw.bits} bits")
            _record(report, [ly], {ly.name: W}, {ly.name: qw})
        return report
