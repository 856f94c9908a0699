"""Fisher-weighted SVD: truncate ``W`` in a norm weighted by each output row's importance to the task loss.

Hsu, Hua, Tseng, Lin, Shen & Jin, "Language Model Compression with Weighted Low-Rank Factorization", ICLR
2022. The Fisher information of weight ``W_ij`` is estimated by its squared gradient over calibration data,
``F_ij = Σ_batches (∂L/∂W_ij)²``; summing over a row gives the row importance ``I_i = Σ_j F_ij``, and the
weighted objective ``min ‖diag(√I) (W − AB)‖_F`` has the closed-form solution (eq. 5-6)

    diag(√I) W = U Σ Vᵀ,   A = diag(√I)⁻¹ U_r Σ_r,   B = V_rᵀ.

The loss is the model's own: the causal-LM loss on the calibration text (``labels = input_ids``), or the
loss a batch's own ``labels`` give (a fine-tuned classifier).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import Layer
from ._lowrank import LowRankConfig, Weighting


def row_fisher(model: nn.Module, layers: Sequence[Layer], batches: Sequence[Any]) -> dict[str, Tensor]:
    """``I_i = Σ_batches Σ_j (∂L/∂W_ij)²`` per output row [out] of each layer (float32, on the CPU).

    ``batches``: dicts of model inputs; a batch without ``labels`` gets ``labels = input_ids`` (causal LM).
    Only the layers' weights get gradients; ``requires_grad`` flags and ``.grad`` are restored afterwards.
    """
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    targets = {id(ly.module.weight): ly for ly in layers}
    fisher = {ly.name: torch.zeros(ly.shape[0]) for ly in layers}
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(id(p) in targets)
            p.grad = None
        for batch in batches:
            if not isinstance(batch, Mapping) or "input_ids" not in batch and "labels" not in batch:
                raise WeightsmithError("fwsvd: calibration batches must be dicts with input_ids (or labels)")
            b = dict(batch)
            b.setdefault("labels", b["input_ids"])
            dev = next(model.parameters()).device
            with torch.enable_grad():
                out = model(**{k: v.to(dev) if isinstance(v, Tensor) else v for k, v in b.items()})
                loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    raise WeightsmithError(
                        f"fwsvd: {type(model).__name__} returned no loss for the labels given"
                    )
                loss.backward()
            for ly in layers:
                w: Tensor = ly.module.weight  # type: ignore[assignment]
                g = w.grad
                if g is None:
                    raise WeightsmithError(f"fwsvd: no gradient reached '{ly.name}'")
                g = g.T if ly.kind == "conv1d" else g
                fisher[ly.name] += g.detach().float().square().sum(1).cpu()
                w.grad = None
    finally:
        for p, (rg, grad) in zip(params, saved, strict=True):
            p.requires_grad_(rg)
            p.grad = grad
        model.train(was_training)
    return fisher


@register_config("fwsvd", kind="compress")
class FWSVD(LowRankConfig):
    """Fisher-weighted SVD (``eps``: added to the row Fisher before the square root)."""

    calibrated = True
    eps: float = 1e-5

    def context(
        self, model: nn.Module, layers: Sequence[Layer], calib: Sequence[Any] | None
    ) -> dict[str, Any]:
        if not calib:
            raise WeightsmithError("'fwsvd' needs calibration data (gradients of the loss): pass calib=")
        fisher = row_fisher(model, layers, calib)
        return {name: f / f.mean().clamp_min(1e-30) for name, f in fisher.items()}

    def weighting(self, W: Tensor, ctx: Any) -> Weighting:
        if not isinstance(ctx, Tensor):
            raise WeightsmithError("fwsvd needs the row Fisher: run it with compress_lowrank(..., calib=)")
        return Weighting(left=(ctx.to(W.device) + self.eps).sqrt())
