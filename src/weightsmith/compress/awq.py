"""AWQ: activation-aware weight quantisation by per-input-channel scaling, then a clipping search.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration", MLSys 2024. Scaling input channel ``j`` of ``W`` by ``s_j`` and
its input by ``1/s_j`` leaves ``WX`` unchanged but shrinks the relative rounding error of salient channels.
The scales solve (eq. 4-5)

    s* = argmin_s ‖Q(W · diag(s)) (diag(s)⁻¹ X) − W X‖,   s = s_X^α,  α ∈ {0, 1/n, …, (n−1)/n}

with ``s_X`` the mean ``|x|`` per input channel, normalised by ``sqrt(max s · min s)``, and the error summed
over all layers that read the same input. ``diag(s)⁻¹`` is folded into the operation that produces that
input, so the model keeps its architecture: a LayerNorm/RMSNorm (found by tracing which module's output
tensor the layers read), or the previous linear layer for ``down_proj``←``up_proj`` and ``o_proj``←``v_proj``
(when their sizes agree). Layers with no such predecessor get no scale. Then, per group, the weights are
clipped to ``ρ · max|w|`` with ``ρ`` from a grid of ``clip_grid`` steps down to ``1 − max_shrink``, choosing
the ``ρ`` with the least output error on the captured inputs (the paper's clipping search). q/k projections
are not clipped (their errors are amplified by the attention softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ._core import CompressConfig, Compressed
from ._grid import QuantizedWeight, codes, fake_quant, grouped, minmax_params

PREDECESSORS = {"down_proj": "up_proj", "o_proj": "v_proj", "w2": "w3"}  # linear -> linear that feeds it
NO_CLIP = ("q_proj", "k_proj", "query", "key", "wq", "wk")


def _short(name: str) -> str:
    return name.split(".")[-2]


def search_scale(
    Ws: Sequence[Tensor],
    X: Tensor,
    mean_abs: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int,
) -> tuple[Tensor, float]:
    """The per-channel scale ``s = s_X^α`` minimising the summed output error of ``Ws`` on inputs ``X``."""
    ref = [X @ W.T for W in Ws]
    best: tuple[float, Tensor, float] | None = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W, y in zip(Ws, ref, strict=True):
            Wg = grouped(W * s, group_size)
            Wq = fake_quant(Wg, *minmax_params(Wg, bits, symmetric), bits).reshape(W.shape) / s
            err += float((X @ Wq.T - y).square().mean())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def search_clip(
    W: Tensor, X: Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int, max_shrink: float
) -> QuantizedWeight:
    """Per (row, group): clip to ``ρ · range`` with the ``ρ`` whose group output error on ``X`` is least."""
    Wg = grouped(W, group_size)  # [out, G, g]
    Xg = X.reshape(X.shape[0], Wg.shape[1], Wg.shape[2])  # [n, G, g]
    y = torch.einsum("ogk,ngk->ong", Wg, Xg)
    best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
    lo0, hi0 = Wg.amin(-1).clamp_max(0), Wg.amax(-1).clamp_min(0)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(int(max_shrink * n_grid) + 1):
        ratio = 1 - i / n_grid
        lo, hi = lo0 * ratio, hi0 * ratio
        Wc = torch.maximum(torch.minimum(Wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))
        Wq = fake_quant(Wc, *minmax_params(Wc, bits, symmetric), bits)
        err = (torch.einsum("ogk,ngk->ong", Wq, Xg) - y).square().mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    Wc = torch.maximum(torch.minimum(Wg, best_hi.unsqueeze(-1)), best_lo.unsqueeze(-1))
    scale, zero = minmax_params(Wc, bits, symmetric)
    q = codes(Wc, scale, zero, bits).reshape(W.shape)
    return QuantizedWeight(q.to(torch.uint8), scale, zero, bits, group_size, symmetric)


@register_config("awq", kind="compress")
class AWQ(CompressConfig):
    """AWQ (``n_grid`` α values; ``clip``: run the clipping search; ``max_shrink``; ``rows``: tokens kept)."""

    calibrated = True
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    rows: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1 or not 0 <= self.max_shrink < 1:
            raise WeightsmithError(
                f"awq options n_grid={self.n_grid}, max_shrink={self.max_shrink}: "
                "need n_grid >= 1 and 0 <= max_shrink < 1"
            )

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=False, channels=True, max_rows=self.rows, feeders=True)

    def compress_block(
        self, block: nn.Module | None, layers: Sequence[Layer], stats: dict[str, InputStats] | None
    ) -> dict[str, Compressed]:
        if stats is None:
            raise WeightsmithError("awq needs calibration statistics")
        by_short = {_short(ly.name): ly for ly in layers}
        groups: dict[str, list[Layer]] = {}
        for ly in layers:
            feeder = stats[ly.name].feeder
            key = feeder if feeder is not None and block is not None else f"layer:{ly.name}"
            groups.setdefault(key, []).append(ly)
        prev_of: dict[str, Layer] = {}
        for ly in layers:
            p = by_short.get(PREDECESSORS.get(_short(ly.name), ""))
            if p is not None and p.shape[0] == ly.shape[1]:
                prev_of[ly.name] = p
        X_of = {ly.name: stats[ly.name].inputs().to(ly.weight().device) for ly in layers}
        for key, group in groups.items():
            first = group[0]
            owner = None if block is None or key.startswith("layer:") else block.get_submodule(key)
            prev = prev_of.get(first.name) if owner is None else None
            if owner is None and prev is None:
                continue
            Ws = [ly.weight().detach().float() for ly in group]
            X = X_of[first.name]
            s, _alpha = search_scale(
                Ws,
                X,
                stats[first.name].mean_abs().to(X.device),
                self.bits,
                self.group_size,
                self.symmetric,
                self.n_grid,
            )
            for ly, W in zip(group, Ws, strict=True):
                ly.write(W * s)
                X_of[ly.name] = X_of[ly.name] / s
            with torch.no_grad():
                if owner is not None:
                    weight = owner.weight
                    assert isinstance(weight, Tensor)
                    weight.div_(s.to(weight.dtype))
                    bias = getattr(owner, "bias", None)
                    if isinstance(bias, Tensor):
                        bias.div_(s.to(bias.dtype))
                else:
                    assert prev is not None
                    prev.write(prev.weight().detach().float() / s.unsqueeze(1))
                    pb = getattr(prev.module, "bias", None)
                    if isinstance(pb, Tensor):
                        pb.div_(s.to(pb.dtype))
        out: dict[str, Compressed] = {}
        for ly in layers:
            W = ly.weight().detach().float()
            if self.clip and _short(ly.name) not in NO_CLIP:
                qw = search_clip(
                    W, X_of[ly.name], self.bits, self.group_size, self.symmetric, 20, self.max_shrink
                )
            else:
                Wg = grouped(W, self.group_size)
                scale, zero = minmax_params(Wg, self.bits, self.symmetric)
                qw = QuantizedWeight(
                    codes(Wg, scale, zero, self.bits).reshape(W.shape).to(torch.uint8),
                    scale,
                    zero,
                    self.bits,
                    self.group_size,
                    self.symmetric,
                )
            ly.write(qw.dequantize())
            out[ly.name] = qw
        return out
