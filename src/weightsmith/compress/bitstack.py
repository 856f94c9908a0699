"""BitStack: any-size compression by a global stack of sign × low-rank residual blocks.

Wang, Wang, Chen, Zhang & Li, "BitStack: Any-Size Compression of Large Language Models in Variable Memory
Environments", ICLR 2025 (arXiv 2410.23918).

**Activation-aware scaling** (Sec. 3.1): each weight is scaled by its inputs' per-channel magnitude,
``W_s = W diag(s)``, decomposed, and scaled back, ``Ŵ = Ŵ_s diag(s)⁻¹``, so the decomposition spends its
accuracy where the inputs are large. Here ``s_j = sqrt(mean_t x_tj²)`` over the calibration tokens (the
paper's per-channel ℓ2 norm up to a constant, which the decomposition is invariant to), divided by its
mean; the vector is stored with the layer.

**Absolute-value decomposition** (eq. 3-5), ``n = levels`` times, from ``R_0 = W_s``:

    S_i = sign(R_i)  (sign 0 → +1),   |R_i| ≈ U_k Σ_k V_kᵀ (top-``k`` SVD),
    B_i = S_i ⊙ (u_i v_iᵀ),  u_i = U_k Σ_k^{1/2},  v_i = V_k Σ_k^{1/2},   R_{i+1} = R_i − B_i.

Each block stores the sign matrix packed one bit per weight and ``u_i``, ``v_i`` in float16 (the residual
is updated with the float16 factors, so the stored blocks give back exactly the weights the model holds).
Since ``‖R_i − S_i ⊙ M‖_F = ‖|R_i| − M‖_F`` and ``M = 0`` is a rank-``k`` candidate, Eckart-Young gives
``‖R_{i+1}‖²_F = ‖R_i‖²_F − Σ_{j≤k} σ_j²(|R_i|)``: the (scaled) error never grows as blocks are added.

**Sorting** (Sec. 3.2): every layer keeps at least its first block; for each level ``b = 1 … n−1``, with
all layers at ``b`` blocks, each layer alone gets its block ``b + 1`` and the calibration loss is
measured (``sort="perplexity"``, the paper's rule); the layers' blocks of that level go on the stack in
order of increasing loss, level after level. ``sort="error"`` is a cheaper proxy (not in the paper): the
drop of the layer's relative scaled error ``(‖R_b‖² − ‖R_{b+1}‖²) / ‖W_s‖²`` per stored byte, largest first.
Loading takes the top of the stack that fits a memory budget (:func:`weightsmith.compress.load_compressed`
with ``memory_mb``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ..linalg import rsvd, seeded_generator, truncated_svd
from ..progress import log
from ._alloc import per_layer
from ._core import CompressConfig, CompressReport, LayerReport, PlanJob
from ._sparse import pack_mask, refuse_compressed_tensors, unpack_mask

SORTS = ("perplexity", "error")


@dataclass
class BitStackWeight:
    """The residual blocks of one ``[out, in]`` weight: ``signs`` [levels, out, ceil(in/8)] (uint8, bit
    set where the sign is +1), ``u`` [levels, out, k], ``v`` [levels, k, in] (float16), the activation
    scale ``scale`` [in] (float32), and ``position[i]``: block ``i``'s place in the global stack."""

    signs: Tensor
    u: Tensor
    v: Tensor
    scale: Tensor
    position: list[int] = field(default_factory=list)

    @property
    def levels(self) -> int:
        return int(self.u.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[1]), int(self.v.shape[2])

    def block(self, i: int) -> Tensor:
        """Block ``i`` in the scaled domain, ``S_i ⊙ (u_i v_iᵀ)`` (float32)."""
        sign = unpack_mask(self.signs[i], self.shape[1]).float() * 2 - 1
        return sign * (self.u[i].float() @ self.v[i].float())

    def dequantize(self, levels: int | None = None) -> Tensor:
        """The weight from the first ``levels`` blocks (default: all), scaled back: ``Σ_i B_i diag(s)⁻¹``."""
        n = self.levels if levels is None else levels
        W = torch.zeros(self.shape, dtype=torch.float32, device=self.u.device)
        for i in range(n):
            W += self.block(i)
        return W / self.scale.unsqueeze(0)

    def block_bytes(self) -> int:
        """Stored bytes of one block: the packed signs plus the float16 factors."""
        return int(self.signs[0].numel() + 2 * (self.u[0].numel() + self.v[0].numel()))


def avd_block(R: Tensor, k: int, randomized: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One absolute-value decomposition step of the residual ``R``: the signs (bool, True for +1), and the
    float16 factors ``u`` [out, k], ``v`` [k, in] of the top-``k`` SVD of ``|R|`` (module docstring); with
    ``randomized``, a randomized SVD (Halko et al. 2011, 4 power iterations, fixed seed) instead."""
    positive = R >= 0
    if randomized:
        U, S, Vh = rsvd(R.abs(), k, n_iter=4, generator=seeded_generator(0, R.device))
    else:
        U, S, Vh = truncated_svd(R.abs(), k)
    root = S.sqrt()
    return positive, (U * root).half(), (root.unsqueeze(1) * Vh).half()


def decompose(
    W: Tensor, scale: Tensor, levels: int, k: int, randomized: bool = False
) -> tuple[BitStackWeight, list[float]]:
    """``levels`` blocks of ``W diag(scale)``; also ``‖R_i‖²_F`` for ``i = 0 … levels`` (scaled domain)."""
    R = W.float() * scale.unsqueeze(0)
    signs, us, vs, history = [], [], [], [float(R.double().square().sum())]
    for _ in range(levels):
        positive, u, v = avd_block(R, k, randomized)
        R = R - torch.where(positive, 1.0, -1.0) * (u.float() @ v.float())
        signs.append(pack_mask(positive))
        us.append(u)
        vs.append(v)
        history.append(float(R.double().square().sum()))
    return BitStackWeight(torch.stack(signs), torch.stack(us), torch.stack(vs), scale.float()), history


def _loss(model: nn.Module, batches: Sequence[Any]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            ids = b["input_ids"]
            out = model(**b, labels=ids)
            if getattr(out, "loss", None) is None:
                raise WeightsmithError(
                    "bitstack option sort=perplexity needs a causal language model (one that returns a loss "
                    "for labels=input_ids); use --opt sort=error"
                )
            total += float(out.loss) * ids.numel()
            count += ids.numel()
    return total / max(count, 1)


def sort_blocks(
    model: nn.Module,
    layers: Sequence[Layer],
    weights: dict[str, BitStackWeight],
    history: dict[str, list[float]],
    calib: Sequence[Any],
    sort: str,
) -> list[tuple[str, int]]:
    """The global stack: ``(layer name, level)`` for every block above level 0, most useful first
    (``calib``: the batches the paper's perplexity rule scores on)."""
    levels = max(w.levels for w in weights.values())
    stack: list[tuple[str, int]] = []
    for b in range(1, levels):
        names = [ly.name for ly in layers if weights[ly.name].levels > b]
        if sort == "perplexity":
            for ly in layers:
                ly.write(weights[ly.name].dequantize(b))
            score = {}
            for ly in layers:
                if ly.name not in names:
                    continue
                ly.write(weights[ly.name].dequantize(b + 1))
                score[ly.name] = _loss(model, calib)
                ly.write(weights[ly.name].dequantize(b))
            log(
                f"bitstack level {b}: calibration loss {min(score.values()):.4f} .. {max(score.values()):.4f}"
            )
        else:
            score = {
                n: -(history[n][b] - history[n][b + 1]) / history[n][0] / weights[n].block_bytes()
                for n in names
            }
        stack += [(n, b) for n in sorted(names, key=lambda n: (score[n], names.index(n)))]
    return stack


@register_config("bitstack", kind="compress")
class BitStack(CompressConfig):
    """BitStack (``levels`` residual blocks per weight of rank ``rank``; ``activation_aware`` scaling;
    ``sort``: "perplexity" (the paper's rule, one calibration pass per layer and level, on the first
    ``sort_batches`` calibration batches, 0 = all) or "error"; ``randomized``: randomized SVD)."""

    calibrated: ClassVar[bool] = True
    default_format: ClassVar[str] = "weightsmith"
    verb: ClassVar[str] = "decomposed"
    levels: int = 8
    rank: int = 16
    activation_aware: bool = True
    sort: str = "perplexity"
    sort_batches: int = 0
    randomized: bool = False
    group_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels < 1 or self.rank < 1:
            raise WeightsmithError(
                f"bitstack options levels={self.levels}, rank={self.rank}: both must be >= 1"
            )
        if self.sort_batches < 0:
            raise WeightsmithError(f"bitstack option sort_batches={self.sort_batches}: must be >= 0 (0: all)")
        if self.sort not in SORTS:
            raise WeightsmithError(f"bitstack option sort={self.sort!r}: use one of {', '.join(SORTS)}")

    def needs_calibration(self) -> bool:
        return self.activation_aware or (self.sort == "perplexity" and self.levels > 1)

    def check_layers(self, layers: Sequence[Layer]) -> None:
        for ly in layers:
            if self.rank > min(ly.shape):
                raise WeightsmithError(
                    f"bitstack option rank={self.rank} is larger than the matrix '{ly.name}' "
                    f"{ly.shape} allows"
                )

    def check_format(self, fmt: str) -> None:
        refuse_compressed_tensors(
            fmt,
            "a BitStack stack (sign and low-rank blocks)",
            "the stack, loaded at any size by ws.load_compressed(DIR, memory_mb=...)",
            "all blocks, as ordinary weights",
        )

    def describe(self, report: CompressReport) -> str:
        ws = [w for w in report.weights.values() if isinstance(w, BitStackWeight)]
        total = sum(r.shape[0] * r.shape[1] for r in report.layers)
        first = sum(w.block_bytes() for w in ws)
        full = sum(w.block_bytes() * w.levels for w in ws)
        return (
            f"stack of {sum(w.levels for w in ws)} blocks, {8 * first / max(total, 1):.2f} to "
            f"{8 * full / max(total, 1):.2f} bits/weight"
        )

    def plan(self, job: PlanJob) -> CompressReport:
        """Scales, decompositions and the global sort need every layer first: the whole job runs here."""
        model, layers, calib, device = job.model, job.layers, job.calib, job.device
        if self.needs_calibration() and not calib:
            raise WeightsmithError("'bitstack' needs calibration data: pass calib= (see calibration_batches)")
        scales: dict[str, Tensor] = {}
        if self.activation_aware:
            spec = StatsSpec(gram=False, channels=True)
            scales = per_layer(model, layers, calib, spec, _channel_scale, device, "bitstack")
        weights: dict[str, BitStackWeight] = {}
        history: dict[str, list[float]] = {}
        report = CompressReport(self)
        for ly in layers:
            W = ly.weight().detach().to(device, torch.float32)
            s = scales[ly.name].to(device) if ly.name in scales else torch.ones(W.shape[1], device=device)
            w, history[ly.name] = decompose(W, s, self.levels, self.rank, self.randomized)
            err = float((W - w.dequantize()).norm() / W.norm().clamp_min(1e-30))
            weights[ly.name] = BitStackWeight(w.signs.cpu(), w.u.cpu(), w.v.cpu(), w.scale.cpu())
            report.layers.append(LayerReport(ly.name, ly.shape, err))
            log(f"  {ly.name} {ly.shape[0]}x{ly.shape[1]}: {self.levels} blocks, relative error {err:.4f}")
        batches = [
            {k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}
            for b in list(calib or [])[: self.sort_batches or None]
        ]
        home = next(model.parameters()).device
        if self.sort == "perplexity":  # the paper's rule runs the whole model once per layer and level
            model.to(device)
        try:
            stack = sort_blocks(model, layers, weights, history, batches, self.sort)
        finally:
            model.to(home)
        for ly in layers:
            weights[ly.name].position = [-1] * weights[ly.name].levels
        for pos, (name, level) in enumerate(stack):
            weights[name].position[level] = pos
        for ly in layers:
            ly.write(weights[ly.name].dequantize())
            report.weights[ly.name] = weights[ly.name]
        return report


def _channel_scale(_layer: Layer, stats: InputStats) -> Tensor:
    rms = (stats.sq_sum / stats.n).sqrt() if stats.sq_sum is not None else None  # type: ignore[operator]
    if rms is None:
        raise WeightsmithError(f"layer '{stats.name}': no channel statistics were gathered")
    rms = rms.float().cpu()
    rms = rms / rms.mean().clamp_min(1e-30)
    return rms.clamp_min(1e-3)
