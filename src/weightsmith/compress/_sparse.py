"""Shared pieces of the pruners: option checks, mask selection (unstructured and N:M), the pruned weight.

A pruner scores every weight (``|W|`` for magnitude, ``|W| ‖X_j‖₂`` for Wanda, ``w² / [H⁻¹]_jj²`` for
SparseGPT) and keeps the highest scores inside a comparison group: the whole matrix, each output row, or, for
N:M semi-structured sparsity, each run of ``M`` consecutive input columns of a row, of which ``N`` are kept
("Accelerating Sparse Deep Neural Networks", Mishra et al., 2021: 2:4 keeps 2 of every 4, which NVIDIA's
sparse tensor cores run at up to twice the dense speed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ._core import CompressConfig, CompressReport, _record

SCOPES = ("row", "layer")


def check_sparsity(sparsity: float, method: str) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise WeightsmithError(f"{method} option sparsity={sparsity}: must be in [0, 1)")


def check_nm(n: int, m: int, method: str, in_features: int | None = None, name: str = "") -> None:
    """``n = m = 0`` means unstructured; otherwise ``1 <= n < m`` and ``m`` divides the input size."""
    if n == 0 and m == 0:
        return
    if not (1 <= n < m):
        raise WeightsmithError(
            f"{method} options n={n}, m={m}: N:M sparsity needs 1 <= N < M (e.g. n=2, m=4)"
        )
    if in_features is not None and in_features % m:
        where = f"'{name}' " if name else ""
        raise WeightsmithError(
            f"{method} options n={n}, m={m}: M={m} does not divide the input size {in_features} of {where}"
            "(N:M groups run along the input dimension)"
        )


def check_scope(scope: str, method: str) -> None:
    if scope not in SCOPES:
        raise WeightsmithError(f"{method} option prune_scope={scope!r}: use one of {', '.join(SCOPES)}")


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask [out, in]: the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    out_f, in_f = score.shape
    if in_f % m:
        raise WeightsmithError(f"N:M mask: M={m} does not divide the input size {in_f}")
    g = score.reshape(out_f, in_f // m, m)
    top = g.topk(n, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out_f, in_f)


def dropped(shape: tuple[int, ...], sparsity: float, scope: str) -> int:
    """Entries dropped per group at ``sparsity``: ``⌊sparsity · in⌋`` per row (``scope="row"``) or
    ``⌊sparsity · out · in⌋`` per matrix."""
    return int(shape[1] * sparsity) if scope == "row" else int(shape[0] * shape[1] * sparsity)


def ranked_mask(score: Tensor, most: int, drop: Tensor | int, scope: str) -> Tensor:
    """Keep-mask of ``score`` [out, in] without its ``drop`` lowest entries per group (row or matrix).

    ``drop`` ≤ ``most`` may be a device tensor: one ``topk`` of fixed size ``most`` (ascending) finds the
    candidates and a device comparison ``rank >= drop`` keeps all but the first ``drop``, so nothing is
    read on the host and every ``drop`` has the same shapes (a CUDA graph replays it with a new ``drop``:
    PST's ramp, adapters/pst_adapter.py)."""
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if most == 0:
        return keep
    kept = torch.arange(most, device=score.device) >= drop
    if scope == "row":
        low = score.topk(most, dim=1, largest=False).indices
        return keep.scatter_(1, low, kept.expand_as(low))
    low = score.flatten().topk(most, largest=False).indices
    return keep.view(-1).scatter_(0, low, kept).view(score.shape)


def unstructured_mask(score: Tensor, sparsity: float, scope: str = "row") -> Tensor:
    """Keep-mask [out, in] dropping the ``sparsity`` fraction of lowest scores per row or per matrix:
    exactly ``floor(sparsity · size)`` entries of each group (:func:`ranked_mask`; ties at the cut as
    ``topk`` leaves them)."""
    k = dropped(tuple(score.shape), sparsity, scope)
    return ranked_mask(score, k, k, scope)


def select_mask(score: Tensor, sparsity: float, n: int, m: int, scope: str = "row") -> Tensor:
    """N:M when ``m`` is set, else unstructured at ``sparsity``."""
    return nm_mask(score, n, m) if m else unstructured_mask(score, sparsity, scope)


def layer_gradients(
    model: nn.Module, layers: Sequence[Layer], batches: Sequence[Any], each: Callable[[Layer, Tensor], None]
) -> None:
    """Call ``each(layer, g)`` with every calibration batch's gradient ``g`` [out, in] (float32) of the
    model's loss for each layer: the causal-LM loss (``labels = input_ids``) or the batch's own ``labels``.

    The backward passes are FWSVD's (:func:`~weightsmith.compress.fwsvd.row_fisher`: only the layers'
    weights get gradients, flags and ``.grad`` restored afterwards); a post-accumulate hook on each weight
    hands over the batch's gradient before it is cleared.
    """
    from .fwsvd import row_fisher

    def hook_for(ly: Layer) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                g = p.grad.detach().float()
                each(ly, g.T if ly.kind == "conv1d" else g)

        return hook

    weights: list[Tensor] = [ly.module.weight for ly in layers]  # type: ignore[misc]
    flags = [bool(w.requires_grad) for w in weights]
    for w in weights:  # a hook needs a tensor that requires grad (a frozen, loaded model's do not)
        w.requires_grad_(True)
    handles = [
        w.register_post_accumulate_grad_hook(hook_for(ly)) for w, ly in zip(weights, layers, strict=True)
    ]
    try:
        row_fisher(model, layers, batches)
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)


@dataclass
class SparseWeight:
    """A pruned weight: ``W`` [out, in] with zeros where ``mask`` is False (``n:m`` = 0:0 if unstructured)."""

    W: Tensor
    mask: Tensor
    n: int = 0
    m: int = 0

    def dequantize(self) -> Tensor:
        """The dense weight the model runs with (the name matches :class:`QuantizedWeight`)."""
        return self.W

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


def pruned(W: Tensor, keep: Tensor, n: int = 0, m: int = 0) -> SparseWeight:
    return SparseWeight(W * keep, keep, n, m)


@dataclass(frozen=True)
class PruneConfig(CompressConfig):
    """Options every pruner shares: ``sparsity`` in [0, 1) (unstructured), or ``n:m`` (keep N of every M
    consecutive input weights; ``n=2, m=4`` is 2:4, where ``sparsity`` is ignored). ``bits`` and
    ``group_size`` are inherited from :class:`CompressConfig` and unused (the weights stay in their dtype)."""

    default_format: ClassVar[str] = "dense"
    verb: ClassVar[str] = "pruned"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    group_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        method = getattr(type(self), "method", type(self).__name__)
        check_sparsity(self.sparsity, method)
        check_nm(self.n, self.m, method)

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Refuse an ``m`` that does not divide some selected layer's input size (naming the layer)."""
        method = getattr(type(self), "method", type(self).__name__)
        for ly in layers:
            check_nm(self.n, self.m, method, ly.shape[1], ly.name)

    def describe(self, report: CompressReport) -> str:
        """The fraction of zeros over all pruned weights."""
        ws = [w for w in report.weights.values() if isinstance(w, SparseWeight)]
        zeros = sum(int((~w.mask).sum()) for w in ws)
        total = sum(w.mask.numel() for w in ws)
        return f"{100 * zeros / max(total, 1):.1f} % of the pruned layers' weights are zero"

    def check_format(self, fmt: str) -> None:
        if fmt == "compressed-tensors":
            raise WeightsmithError(
                "--format compressed-tensors cannot hold a pruned model: compressed-tensors 0.20 no longer "
                "decompresses its sparse formats (sparse-bitmask, sparse-24-bitmask) and transformers "
                "cannot load them; use --format dense (zeros kept in place, loads anywhere) or weightsmith"
            )

    def score(self, W: Tensor, stats: InputStats | None) -> Tensor:
        """Importance of every weight of ``W`` [out, in]; the lowest are pruned. Every pruner defines it."""
        raise TypeError(f"{type(self).__name__} must define score(W, stats)")

    def prune(self, W: Tensor, stats: InputStats | None) -> SparseWeight:
        """Prune one ``[out, in]`` float32 weight by its :meth:`score` (no weight update)."""
        check_nm(self.n, self.m, type(self).method, W.shape[1])  # type: ignore[attr-defined]
        keep = select_mask(self.score(W, stats), self.sparsity, self.n, self.m, self.scope())
        return pruned(W, keep, self.n, self.m)

    def scope(self) -> str:
        return "row"

    def quantize(self, W: Tensor, stats: InputStats | None) -> SparseWeight:  # type: ignore[override]
        return self.prune(W, stats)


@dataclass(frozen=True)
class Refiner(PruneConfig):
    """A pruner that starts from another pruner's mask and improves on it (DSnoT, ARMOR): ``init`` names
    the starting pruner (one of ``inits``), with this config's sparsity or N:M; ``damp`` is its Hessian
    damping when it is SparseGPT."""

    calibrated = True
    inits: ClassVar[tuple[str, ...]] = ("wanda", "magnitude", "sparsegpt")
    init: str = "wanda"
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in self.inits:
            method = getattr(type(self), "method", type(self).__name__)
            raise WeightsmithError(f"{method} option init={self.init!r}: use one of {', '.join(self.inits)}")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=self.init == "sparsegpt", channels=True)

    def base(self) -> PruneConfig:
        """The starting pruner's config."""
        from .magnitude import Magnitude
        from .sparsegpt import SparseGPT
        from .wanda import Wanda

        common = dict(sparsity=self.sparsity, n=self.n, m=self.m, targets=self.targets)
        if self.init == "sparsegpt":
            return SparseGPT(damp=self.damp, **common)  # type: ignore[arg-type]
        if self.init == "magnitude":
            return Magnitude(prune_scope="row", **common)  # type: ignore[arg-type]
        return Wanda(**common)  # type: ignore[arg-type]


def prune_by_scores(
    config: PruneConfig, layers: Sequence[Layer], scores: dict[str, Tensor], scope: str
) -> CompressReport:
    """Prune every layer by its precomputed score [out, in] (methods that score all layers before any
    changes, from gradients of the whole model); writes the pruned weights and returns the report."""
    report = CompressReport(config)
    for ly in layers:
        W = ly.weight().detach().float().clone()
        sw = pruned(W, select_mask(scores[ly.name].to(W.device), config.sparsity, config.n, config.m, scope),
                    config.n, config.m)  # fmt: skip
        ly.write(sw.W)
        _record(report, [ly], {ly.name: W}, {ly.name: sw})
    return report


# ------------------------------------------------------------------------ compressed-tensors sparse layouts


def refuse_compressed_tensors(fmt: str, held: str, weightsmith: str, dense: str) -> None:
    """Refuse ``--format compressed-tensors`` for a result it cannot hold (bit masks, sign codes), saying what
    ``--format weightsmith`` and ``--format dense`` store instead."""
    if fmt == "compressed-tensors":
        raise WeightsmithError(
            f"--format compressed-tensors cannot hold {held}; use --format weightsmith ({weightsmith}) or "
            f"dense ({dense})"
        )


def pack_mask(mask: Tensor) -> Tensor:
    """Bool [rows, cols] to uint8 [rows, ceil(cols / 8)], bit ``j % 8`` of byte ``j // 8`` (little-endian)."""
    rows, cols = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-cols) % 8)).view(rows, -1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=m.device)
    return (m * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> bits) & 1).view(packed.shape[0], -1)[:, :cols].bool()


def bitmask_tensors(path: str, sw: SparseWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """compressed-tensors' ``sparse-bitmask`` tensors of one layer at module ``path``: ``shape``, the kept
    values row by row (``compressed``), the packed mask (``bitmask``) and each row's first value
    (``row_offsets``)."""
    mask = sw.mask.cpu()
    counts = mask.sum(1)
    return {
        f"{path}.shape": torch.tensor(list(mask.shape), dtype=torch.int64),
        f"{path}.compressed": sw.W.cpu()[mask].to(dtype).contiguous(),
        f"{path}.bitmask": pack_mask(mask),
        f"{path}.row_offsets": (torch.cumsum(counts, 0) - counts).contiguous(),
    }


def sparse24_tensors(path: str, sw: SparseWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """compressed-tensors' ``sparse-24-bitmask`` tensors: ``shape`` [2, 1], the two kept values of every
    four as ``compressed`` [rows, cols / 2], and the packed mask."""
    if (sw.n, sw.m) != (2, 4):
        raise WeightsmithError(
            f"'{path}': the sparse-24-bitmask layout needs 2:4 sparsity, not {sw.n}:{sw.m}"
        )
    mask = sw.mask.cpu()
    rows, cols = mask.shape
    return {
        f"{path}.shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        f"{path}.compressed": sw.W.cpu()[mask].to(dtype).reshape(rows, cols // 2).contiguous(),
        f"{path}.bitmask": pack_mask(mask),
    }


def dense_from_bitmask(compressed: Tensor, bitmask: Tensor, shape: Tensor) -> Tensor:
    """The dense weight from either layout's ``compressed`` values, ``bitmask`` and ``shape``."""
    rows, cols = (int(v) for v in shape.flatten().tolist())
    mask = unpack_mask(bitmask, cols)
    W = torch.zeros(rows, cols, dtype=compressed.dtype)
    W[mask] = compressed.flatten()
    return W
