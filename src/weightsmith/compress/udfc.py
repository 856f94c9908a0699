"""UDFC: data-free compensation of pruning and quantisation loss by the next layer.

Bai, Chen, Shen, Qian & Liu, "Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning",
ICCV 2023 (arXiv 2308.07209). UDFC's assumption: the information a damaged (pruned or quantised) output
channel of layer ``l`` carried is preserved by a linear combination of the compressed channels; the next
layer's input weights are then rebuilt to restore it, with the combination in closed form.

Here, for a producer ``P`` (rows ``W_G`` [m, in], bias ``b_G``) whose output channels ``G`` reach a consumer
``C`` through an operation that treats every channel of ``G`` alike (a linear map, so that a combination of
channels passes through it unchanged), the compressed rows ``Ŵ_K`` (the kept channels ``K ⊆ G``, quantised)
stand in for the originals through ``S`` [m, |K|]:

    W_G x + b_G ≈ S (Ŵ_K x + b̂_K),   S = argmin_S E_x ‖(W_G − S Ŵ_K) x‖² = W_G Ŵ_Kᵀ (Ŵ_K Ŵ_Kᵀ + λI)⁻¹

with no data: the inputs are taken isotropic (``E[xxᵀ] = I``), the paper's data-free setting; ``λ`` is
1e-6 of the mean diagonal, for a singular ``Ŵ_K Ŵ_Kᵀ``. The consumer's columns for ``G`` become
``C_K ← C_G S`` (pruned columns zero) and its bias takes the bias mismatch, ``c ← c + C_G (b_G − S b̂_K)``.
Since ``S = I`` is a candidate, the data-free error ``‖W_G − S Ŵ_K‖_F`` never exceeds the uncompensated one.
``combine="self"`` restricts a quantised (kept) channel to itself, ``S_cc = ⟨w_c, ŵ_c⟩ / ‖ŵ_c‖²`` (a
per-channel scale, the least the assumption allows), pruned channels still drawing on the whole group.

Pairs and groups (what passes a channel combination through exactly):

- attention ``v_proj → o_proj`` (Llama; BERT ``attention.self.value → attention.output.dense``): one group
  per key/value head, since attention mixes tokens with the same weights for every channel of a head (a
  per-channel bias passes too, the attention rows summing to 1). Under grouped-query attention a value
  head is read by several query heads; each one's ``o_proj`` columns are rebuilt.
- gated MLP ``up_proj → down_proj``: one group per channel (the gate ``act(g_c)`` multiplies channel ``c``
  alone), so ``S`` is the scalar ``⟨W_c, Ŵ_c⟩ / ‖Ŵ_c‖²``; a pruned MLP channel cannot be compensated.

The paper works on CNNs with batch normalisation and ReLU between the layers, which these pairs do not have;
the groups above are where its linear-combination assumption holds exactly in form. ``sparsity`` prunes that
fraction of each producer's output channels (rows of least ℓ2 norm, structured); unless ``prune_only``, every
targeted layer goes on the RTN grid (producers first, each consumer after its compensation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import Layer
from ._core import CompressConfig, Compressed, CompressReport, PlanJob, _record
from ._grid import quantize_rtn
from ._sparse import SparseWeight, check_sparsity

# producer suffix -> (consumer suffix, grouping): "heads" (one group per key/value head) or "channels"
PAIRS = {
    "self_attn.v_proj": ("self_attn.o_proj", "heads"),
    "attention.self.value": ("attention.output.dense", "heads"),
    "mlp.up_proj": ("mlp.down_proj", "channels"),
}


def combination(W: Tensor, Wk: Tensor) -> Tensor:
    """``S = W Ŵ_Kᵀ (Ŵ_K Ŵ_Kᵀ + λI)⁻¹`` [m, k]: the compressed rows ``Wk`` [k, in] combined to best stand for
    the original rows ``W`` [m, in] under isotropic inputs (module docstring)."""
    if Wk.shape[0] == 0:
        return W.new_zeros(W.shape[0], 0)
    G = (Wk @ Wk.T).double()
    lam = 1e-6 * float(G.diagonal().mean().clamp_min(1e-30))
    G.diagonal().add_(lam)
    return torch.linalg.solve(G, (Wk @ W.T).double()).T.float()


def _heads(model: nn.Module, producer_rows: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the model's config."""
    cfg = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    if not heads:
        raise WeightsmithError("udfc: the model config gives no num_attention_heads for its attention pair")
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    dim = producer_rows // kv
    return heads, kv, dim


def self_combination(W: Tensor, Wk: Tensor, keep: Tensor) -> Tensor:
    """``S`` [m, k] with every kept (quantised) channel standing for itself alone, by the scalar
    ``⟨w_c, ŵ_c⟩ / ‖ŵ_c‖²``, and every pruned channel by the least-squares combination of the kept ones."""
    S = combination(W, Wk)
    kept = keep.nonzero().flatten()
    own = (W[kept] * Wk).sum(1) / Wk.square().sum(1).clamp_min(1e-30)
    S[kept] = torch.diag(own)
    return S


def compensate(
    W: Tensor, b: Tensor | None, Wq: Tensor, bq: Tensor | None, keep: Tensor, groups: list[Tensor],
    C: Tensor, c: Tensor | None, readers: list[list[Tensor]], self_only: bool = False,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The consumer ``C`` [out, in_C] (and bias ``c``) rebuilt for the compressed producer rows ``Wq``.

    ``groups[g]``: the producer rows of group ``g``; ``readers[g]``: for each consumer block reading that
    group, the consumer columns matching ``groups[g]`` in order. ``keep``: bool [rows] (False: pruned).
    ``self_only``: a quantised channel is rebuilt from itself alone (:func:`self_combination`)."""
    C = C.clone()
    c = None if c is None else c.clone()
    for rows, cols_list in zip(groups, readers, strict=True):
        kept = rows[keep[rows]]
        if self_only:
            S = self_combination(W[rows], Wq[kept], keep[rows])
        else:
            S = combination(W[rows], Wq[kept])  # [m, k]
        mismatch = None
        if b is not None:
            bk = bq[kept] if bq is not None else b[kept]
            mismatch = b[rows] - S @ bk
        for cols in cols_list:
            Cg = C[:, cols].clone()
            new = torch.zeros_like(Cg)
            new[:, keep[rows]] = Cg @ S
            C[:, cols] = new
            if mismatch is not None and c is not None:
                c += Cg @ mismatch
    return C, c


@register_config("udfc", kind="compress")
class UDFC(CompressConfig):
    """UDFC (RTN on ``bits`` / ``group_size`` unless ``prune_only``; ``sparsity``: fraction of each producer's
    output channels pruned; ``compensate``: rebuild the next layer, false for the uncompensated baseline;
    ``combine``: "group" (each damaged channel from all compressed channels of its group) or "self" (a
    quantised channel from itself alone, a pruned one from the group))."""

    default_format: ClassVar[str] = "dense"
    prune_only: bool = False
    sparsity: float = 0.0
    compensate: bool = True
    combine: str = "group"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity, "udfc")
        if self.combine not in ("group", "self"):
            raise WeightsmithError(f"udfc option combine={self.combine!r}: use group or self")
        if self.prune_only and not self.sparsity:
            raise WeightsmithError("udfc options prune_only=true, sparsity=0: nothing to compress")

    def check_layers(self, layers: Sequence[Layer]) -> None:
        if not self.prune_only:
            super().check_layers(layers)

    def check_format(self, fmt: str) -> None:
        if fmt == "compressed-tensors" and self.prune_only:
            raise WeightsmithError(
                "--format compressed-tensors holds quantised weights only; udfc with prune_only=true "
                "prunes: use --format dense"
            )

    def describe(self, report: CompressReport) -> str:
        pruned = f"{100 * self.sparsity:.0f} % of producer channels pruned"
        if self.prune_only:
            return pruned
        return super().describe(report) + (f", {pruned}" if self.sparsity else "")

    def _compress_rows(self, W: Tensor, keep: Tensor) -> tuple[Tensor, Compressed]:
        Wk = W * keep.unsqueeze(1)
        if not self.prune_only:
            qw = quantize_rtn(Wk, self.bits, self.group_size, self.symmetric)
            return qw.dequantize(), qw
        mask = keep.unsqueeze(1).expand_as(W).clone()
        return Wk, SparseWeight(Wk, mask)

    def _keep(self, W: Tensor) -> Tensor:
        keep = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
        k = int(W.shape[0] * self.sparsity)
        if k:
            keep[W.norm(dim=1).topk(k, largest=False).indices] = False
        return keep

    def plan(self, job: PlanJob) -> CompressReport:
        """Producers before their consumers, so each consumer is compensated before it is compressed."""
        model, layers, device = job.model, job.layers, job.device
        by_path = {ly.path: ly for ly in layers}
        pairs: dict[str, tuple[str, str]] = {}
        for path in by_path:
            for prod, (cons, how) in PAIRS.items():
                if path.endswith(prod):
                    consumer = path[: -len(prod)] + cons
                    if consumer in by_path:
                        pairs[path] = (consumer, how)
        consumers = {c for c, _ in pairs.values()}
        order = [p for p in by_path if p in pairs] + [p for p in by_path if p not in pairs]
        report = CompressReport(self)
        originals = {ly.name: ly.weight().detach().to(device, torch.float32, copy=True) for ly in layers}
        for path in order:
            ly = by_path[path]
            W = ly.weight().detach().to(device, torch.float32, copy=True)
            if path in pairs:
                keep = self._keep(W)
            elif not self.prune_only:
                keep = torch.ones(W.shape[0], dtype=torch.bool, device=device)
            elif path in consumers:  # pruned columns already zero; record as sparse
                _record(report, [ly], originals, {ly.name: SparseWeight(W, W != 0)})
                continue
            else:
                continue
            Wq, compressed = self._compress_rows(W, keep)
            ly.write(Wq)
            _record(report, [ly], originals, {ly.name: compressed})
            if path in pairs:
                self._rebuild(model, ly, by_path[pairs[path][0]], pairs[path][1], W, Wq, keep)
        return report

    def _rebuild(
        self, model: nn.Module, prod: Layer, cons: Layer, how: str, W: Tensor, Wq: Tensor, keep: Tensor
    ) -> None:
        """Compensate (or, with ``compensate=false``, only zero the pruned columns of) the consumer."""
        C = cons.weight().detach().to(W.device, torch.float32, copy=True)
        rows = W.shape[0]
        if how == "heads":
            heads, kv, dim = _heads(model, rows)
            groups = [torch.arange(g * dim, (g + 1) * dim, device=W.device) for g in range(kv)]
            per = heads // kv
            readers = [
                [torch.arange(h * dim, (h + 1) * dim, device=W.device) for h in range(g * per, (g + 1) * per)]
                for g in range(kv)
            ]
        else:
            groups = [torch.tensor([i], device=W.device) for i in range(rows)]
            readers = [[g] for g in groups]
        if not self.compensate:
            for rows_g, cols_list in zip(groups, readers, strict=True):
                for cols in cols_list:
                    C[:, cols[~keep[rows_g]]] = 0.0
            cons.write(C)
            return
        b = _bias(prod)
        cb = _bias(cons)
        C, cb = compensate(W, b, Wq, None, keep, groups, C, cb, readers, self.combine == "self")
        cons.write(C)
        cons_bias, prod_bias = getattr(cons.module, "bias", None), getattr(prod.module, "bias", None)
        with torch.no_grad():
            if cb is not None and isinstance(cons_bias, Tensor):
                cons_bias.copy_(cb.to(cons_bias.dtype))
            if isinstance(prod_bias, Tensor):  # a pruned channel's bias no longer reaches the consumer
                prod_bias.mul_(keep.to(prod_bias.dtype))


def _bias(ly: Layer) -> Tensor | None:
    b = getattr(ly.module, "bias", None)
    return None if b is None else b.detach().float()
