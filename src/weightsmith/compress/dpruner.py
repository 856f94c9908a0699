"""D-Pruner: pruning that keeps both general and domain-specific ability (dual-pruning importance).

Zhang, Liu, Zhao, Cheng, Bao, Zhang, Mitra & Chen, "Pruning as a Domain-specific LLM Extractor", Findings of
NAACL 2024. Two calibration texts score every weight:

- **general importance** from an open-domain text, the error of removing ``w_m`` under the layer-wise
  quadratic model of SparseGPT / OBS (the official code takes it from SparseGPT's pass):

      G_m = w_m² / [U]_jj²,      Uᵀ U = (H + λI)⁻¹,  H = 2 XᵀX / n on the general text;

- **domain importance** from a domain text, the second-order Taylor estimate of the change of the
  next-token loss when ``w_m`` is set to zero, with the Hessian diagonal replaced by the empirical Fisher
  ``g_m²`` (accumulated in absolute value per calibration batch ``b``):

      D_m = Σ_b | −g_m^(b) w_m + ½ (g_m^(b) w_m)² |.

D-Pruner fits the domain with the general importance as a regulariser, ``L = L_domain + λ Σ_m G̃_m
(w′_m − w_m)²``, so that weights important in general resist change, and ranks weights by the importance of
that regularised loss. Here the regulariser is the general loss's own quadratic (OBS) model,
``G̃_m = 1 / [U]_jj²``, so removing ``w_m`` costs it exactly ``λ G_m`` and the regularised importance is

      S_m = D_m / mean(D) + λ · G_m / mean(G)          (each normalised per layer; ``lam`` = λ)

What differs from the paper: the official code accumulates the importance along a fine-tuning run (LOMO
updates on the domain data with an approximated regulariser gradient); here no weight is updated, the
scores come from one pass of gradients on the domain batches (as FWSVD gathers them) and one pass of the
layer walker on the general batches, and the pruned weights are not reconstructed. Masks are per layer
(``prune_scope="layer"``, the official code's percentile threshold), per row, or N:M.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec, collect_stats, decoder_blocks, walk_blocks
from ._core import CompressReport, PlanJob, calibration_batches, target_layers
from ._sparse import PruneConfig, check_scope, layer_gradients, prune_by_scores
from .gptq import inverse_hessian_factor


def obs_importance(W: Tensor, H: Tensor, damp: float = 0.01) -> Tensor:
    """``w² / [U]_jj²`` for ``W`` [out, in] and Hessian ``H`` [in, in] (SparseGPT's removal error)."""
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    d = inverse_hessian_factor(H, damp).diagonal().to(W.device)
    return W.float().square() / d.square()


def general_importance(
    model: nn.Module, layers: Sequence[Layer], batches: Sequence[Any], damp: float, device: torch.device
) -> dict[str, Tensor]:
    """``G`` of every layer from its inputs on the general batches (the layer walker, block by block)."""
    chosen = {ly.name: ly for ly in layers}
    spec = StatsSpec(gram=True, channels=False)
    out: dict[str, Tensor] = {}

    def score(stats: dict[str, InputStats]) -> None:
        for name, st in stats.items():
            if name in chosen:
                out[name] = obs_importance(chosen[name].weight().detach(), st.hessian(), damp).cpu()

    try:
        decoder_blocks(model)
        blocks = True
    except WeightsmithError:  # no repeated blocks (a plain MLP): one pass over the whole model below
        blocks = False
    if blocks:
        walk_blocks(model, list(batches), lambda _i, _p, _b, stats: score(stats), spec, device=device)
    rest = [ly for ly in layers if ly.name not in out]
    if rest:
        score(collect_stats(model, rest, batches, spec))
    return out


def domain_importance(model: nn.Module, layers: Sequence[Layer], batches: Sequence[Any]) -> dict[str, Tensor]:
    """``D_m = Σ_b |−g_m w_m + ½ (g_m w_m)²|`` of every layer over the domain batches."""
    acc = {ly.name: torch.zeros(ly.shape) for ly in layers}

    def each(ly: Layer, g: Tensor) -> None:
        t = g * ly.weight().detach().float()
        acc[ly.name] += (0.5 * t.square() - t).abs().cpu()

    layer_gradients(model, layers, batches, each)
    return acc


def dual_importance(general: Tensor, domain: Tensor, lam: float) -> Tensor:
    """``S = D / mean(D) + λ G / mean(G)``."""
    return domain / domain.mean().clamp_min(1e-30) + lam * general / general.mean().clamp_min(1e-30)


@register_config("dpruner", kind="compress")
class DPruner(PruneConfig):
    """D-Pruner (``sparsity`` or ``n:m``): the calibration text (``--calib``) is the general one; ``domain``
    is the domain text (a text file or packaged text), tokenised with the model's tokenizer into
    ``domain_samples`` windows of ``domain_seq_len``; ``lam`` weighs the general importance;
    ``prune_scope``: layer (the paper's) or row; ``damp``: added to the general Hessian's diagonal."""

    calibrated = True
    domain: str = ""
    domain_samples: int = 8
    domain_seq_len: int = 256
    lam: float = 1.0
    damp: float = 0.01
    prune_scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scope(self.prune_scope, "dpruner")
        if not self.lam >= 0:
            raise WeightsmithError(f"dpruner option lam={self.lam}: must be >= 0")
        if not self.damp > 0:
            raise WeightsmithError(f"dpruner option damp={self.damp}: must be > 0")
        if self.domain_samples < 1 or self.domain_seq_len < 2:
            raise WeightsmithError(
                f"dpruner options domain_samples={self.domain_samples}, domain_seq_len="
                f"{self.domain_seq_len}: need at least 1 window of 2 tokens"
            )

    def domain_batches(self, model: nn.Module) -> list[dict[str, Tensor]]:
        """The ``domain`` text as calibration windows, tokenised with the tokenizer saved with the model."""
        if not self.domain:
            raise WeightsmithError(
                "dpruner option domain: name the domain calibration text (a text file), e.g. "
                "--opt domain=notes.txt; --calib is the general text"
            )
        from transformers import AutoTokenizer

        source = str(getattr(model, "name_or_path", "") or "")
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise WeightsmithError(
                f"dpruner option domain={self.domain!r}: cannot load the model's tokenizer from "
                f"'{source}' to tokenise it ({type(exc).__name__}); call dpruner_compress with "
                "domain batches instead"
            ) from exc
        return calibration_batches(tok, self.domain, self.domain_samples, self.domain_seq_len)

    def plan(self, job: PlanJob) -> CompressReport:
        model, layers, calib, device = job.model, job.layers, job.calib, job.device
        if not calib:
            raise WeightsmithError("'dpruner' needs general calibration data: pass calib=")
        return dpruner_scores_and_prune(model, self, layers, calib, self.domain_batches(model), device)


def dpruner_scores_and_prune(
    model: nn.Module,
    config: DPruner,
    layers: Sequence[Layer],
    general: Sequence[Any],
    domain: Sequence[Any],
    device: torch.device,
) -> CompressReport:
    if not domain:
        raise WeightsmithError("dpruner: no domain calibration batches")
    G = general_importance(model, layers, general, config.damp, device)
    D = domain_importance(model, layers, domain)
    scores = {ly.name: dual_importance(G[ly.name], D[ly.name], config.lam) for ly in layers}
    return prune_by_scores(config, layers, scores, config.prune_scope)


def dpruner_compress(
    model: nn.Module,
    config: DPruner,
    general: Sequence[Any],
    domain: Sequence[Any],
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, CompressReport]:
    """D-Pruner with both calibration sets given as batches (dicts with ``input_ids``); prunes ``model``
    in place like :func:`~weightsmith.compress.compress`."""
    import time

    t0 = time.perf_counter()
    layers = target_layers(model, config)
    report = dpruner_scores_and_prune(model, config, layers, general, domain, torch.device(device))
    report.seconds = time.perf_counter() - t0
    return model, report
