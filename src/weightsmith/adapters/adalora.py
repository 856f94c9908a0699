"""AdaLoRA: SVD-form updates ``ΔW = s · P Λ Q`` whose rank budget is pruned by importance.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
arXiv:2303.10512.

``P`` [out, r] and ``Q`` [r, in] start as N(0, 0.02²) and ``Λ`` (diagonal) at zero; ``s = alpha / r``.
Each step (``adapter_step``, after backward) the sensitivity ``I = |θ · ∇θ|`` of every entry is
smoothed (``Ī ← β1 Ī + (1-β1) I``) with its uncertainty (``Ū ← β2 Ū + (1-β2) |I - Ī|``); triplet ``i``
scores ``S(λ_i) + mean_j S(Q_ij) + mean_j S(P_ji)`` with ``S = Ī · Ū``. The total budget falls
cubically from ``init_rank · L`` to ``target_rank · L`` between ``tinit`` and ``total - tfinal``,
and every ``delta_t`` steps the lowest-scoring triplets over all layers have ``λ_i`` set to zero.
The loss term ``R = orth_weight · mean over P, Q of ||PᵀP - I||_F, ||QQᵀ - I||_F`` keeps P, Q
near-orthogonal. These follow PEFT 0.21's AdaLoRA, which the reference tests compare against.
Defaults differ from PEFT's (alpha 8, orth_weight 0.5): alpha 32 and orth_weight 0.1 are the paper's
GLUE settings. With zero-initialised Λ, Adam moves each λ by at most one learning rate per step. At
PEFT's defaults, a run of a few hundred steps barely moves the model (docs/adapters.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, autocast_off, check_rank, copy_peft
from .lora import lora_forward


class _OrthPenalty(torch.autograd.Function):
    """``||PᵀP - I||_F + ||QQᵀ - I||_F`` in one node: the paper's orthogonality regulariser (its eq. 4
    squares the norms; PEFT 0.21, which the reference tests follow, does not).

    With ``G_P = PᵀP - I`` and ``G_Q = QQᵀ - I`` (both symmetric) the gradients are written out,
    ``∂/∂P = 2 P G_P / ||G_P||`` and ``∂/∂Q = 2 G_Q Q / ||G_Q||`` (zero where a norm is zero, as
    autograd's norm gives): two GEMMs and a few scalar ops instead of autograd's dozen kernels per
    layer. Run with autocast off (the ``[r, r]`` Gram matrices in the parameters' dtype).
    """

    @staticmethod
    def forward(ctx: Any, P: Tensor, Q: Tensor, neg_eye: Tensor) -> Tensor:
        G_P, G_Q = torch.addmm(neg_eye, P.t(), P), torch.addmm(neg_eye, Q, Q.t())
        norms = torch.linalg.vector_norm(torch.stack((G_P, G_Q)), dim=(1, 2))
        ctx.save_for_backward(P, Q, G_P, G_Q, norms)
        return norms.sum()

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        P, Q, G_P, G_Q, norms = ctx.saved_tensors
        # 2 g / ||G||, finite where ||G|| = 0 (then G = 0 and the product below is exactly 0)
        k = (2 * g) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        dP = torch.mm(P, G_P).mul_(k[0]) if ctx.needs_input_grad[0] else None
        dQ = torch.mm(G_Q, Q).mul_(k[1]) if ctx.needs_input_grad[1] else None
        return dP, dQ, None


class RankAllocator:
    """Global budget allocation over every AdaLoRA layer of one adapter (kept in ``ctx.shared``)."""

    def __init__(self, cfg: AdaLoRA, n_layers: int) -> None:
        self.cfg = cfg
        self.layers: list[AdaLoRAAdapter] = []
        self.n_layers = n_layers
        self.done_step: int | None = None
        self.avg: list[Tensor] = []  # smoothed sensitivity Ī per P, Q, Λ of every layer, in order
        self.unc: list[Tensor] = []  # uncertainty Ū
        self._seg: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def budget(self, step: int, total: int) -> tuple[int, bool]:
        c = self.cfg
        init, target = c.init_rank * len(self.layers), c.target_rank * len(self.layers)
        if step <= c.tinit:
            return init, False
        if step > total - c.tfinal:
            return target, True
        frac = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        return int((init - target) * frac**3 + target), step % c.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        # one fused (foreach) update over every P, Q, Λ: Ī ← β1 Ī + (1-β1)|θ∇θ|, Ū ← β2 Ū + (1-β2)|I - Ī|
        triples = [(layer.P, layer.Q, layer.E) for layer in self.layers]
        params: list[Tensor] = [p for t in triples for p in t if p.grad is not None]
        if not params:
            return
        if len(self.avg) != len(params):
            self.avg = [torch.zeros_like(p) for p in params]
            self.unc = [torch.zeros_like(p) for p in params]
        ipt = torch._foreach_mul(params, [p.grad for p in params])  # type: ignore[misc]
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.avg, ipt, 1 - self.cfg.beta1)
        torch._foreach_sub_(ipt, self.avg)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.unc, ipt, 1 - self.cfg.beta2)

    def _segments(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer id of every row of the stacked P scores and of the stacked Qᵀ scores, and their counts."""
        if self._seg is None or self._seg[0].device != device:
            outs = torch.tensor([layer.P.shape[0] for layer in self.layers], device=device)
            ins = torch.tensor([layer.Q.shape[1] for layer in self.layers], device=device)
            ids = torch.arange(len(self.layers), device=device)
            self._seg = (ids.repeat_interleave(outs), ids.repeat_interleave(ins), outs, ins)
        return self._seg

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        k = sum(layer.E.numel() for layer in self.layers) - budget
        if k <= 0 or len(self.avg) != 3 * len(self.layers):
            return
        # triplet score S(λ_i) + mean_j S(Q_ij) + mean_j S(P_ji) for all layers at once: the P and Qᵀ
        # scores stacked and summed per layer by index_add (a few ops instead of a few per layer)
        score = torch._foreach_mul(self.avg, self.unc)
        dev = score[0].device
        seg_p, seg_q, n_out, n_in = self._segments(dev)
        L, r = len(self.layers), self.layers[0].E.shape[0]
        p_sum = torch.zeros(L, r, device=dev, dtype=score[0].dtype).index_add_(
            0, seg_p, torch.cat(score[0::3])
        )
        q_cat = torch.cat([q.t() for q in score[1::3]])
        q_sum = torch.zeros(L, r, device=dev, dtype=score[1].dtype).index_add_(0, seg_q, q_cat)
        e = torch.cat([e.view(1, -1) for e in score[2::3]])
        flat = (e + q_sum / n_in[:, None] + p_sum / n_out[:, None]).view(-1)
        threshold = torch.kthvalue(flat, k).values  # stays on the device: no synchronisation
        keep = flat > threshold
        masks = keep.to(self.layers[0].E.dtype).view(L, r, 1)
        for i, layer in enumerate(self.layers):
            layer.keep = keep[i * r : (i + 1) * r]
            layer.keep_mask = masks[i]
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        Es: list[Tensor] = [layer.E for layer in self.layers]
        masks: list[Tensor] = [layer.keep_mask for layer in self.layers]
        torch._foreach_mul_(Es, masks)  # type: ignore[arg-type]

    def step(self, step: int, total: int) -> None:
        if self.done_step == step:
            return
        self.done_step = step
        c = self.cfg
        if total - c.tfinal <= c.tinit:
            raise ValueError(
                f"AdaLoRA: tinit ({c.tinit}) must be < total steps ({total}) - tfinal ({c.tfinal})"
            )
        final_step = total - c.tfinal
        if step < final_step:
            self.update_importance()
            budget, mask = self.budget(step, total)
            if mask:
                self.mask_to_budget(budget)
        elif step == final_step:  # as in PEFT: no importance update at the final allocation
            self.mask_to_budget(self.budget(step, total)[0])
            self.avg, self.unc = [], []
        else:
            self.apply_masks()


class AdaLoRAAdapter(Adapter):
    keep: Tensor
    keep_mask: Tensor
    neg_eye: Tensor

    def __init__(
        self, P: Tensor, E: Tensor, Q: Tensor, scaling: float, allocator: RankAllocator, dropout: float
    ) -> None:
        super().__init__()
        self.P = nn.Parameter(P)
        self.E = nn.Parameter(E)  # the diagonal Λ as [r, 1], like PEFT's lora_E
        self.Q = nn.Parameter(Q)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer(
            "keep", torch.ones(E.shape[0], dtype=torch.bool, device=E.device), persistent=False
        )
        self.hold(
            keep_mask=torch.ones_like(E),  # keep as E's dtype, [r, 1]
            neg_eye=-torch.eye(E.shape[0], device=E.device),
        )
        self._allocator: Any = allocator

    def delta(self, W0: Tensor) -> Tensor:
        return self.P @ (self.Q * self.E) * self.scaling

    def low_rank(self) -> tuple[Tensor, Tensor]:
        return self.P * self.scaling, self.Q * self.E

    # alone on a layer, the base product x W0ᵀ runs inside the LoRA node (see lora._LoRALinear)
    needs_base_out: ClassVar[bool] = False

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        if base_out is None and self.dropout.training and isinstance(self.dropout, nn.Dropout):
            base_out = F.linear(x, W0)  # the base sees x, the adapter dropout(x): two inputs, no fused dx
        return lora_forward(base_out, self.dropout(x), self.Q * self.E, self.P, self.scaling, W0)

    def on_train_step(self, step: int, total_steps: int) -> None:
        self._allocator.step(step, total_steps)

    def _peft_views(self) -> dict[str, Tensor]:
        # PEFT: lora_A = Q [r, in], lora_B = P [out, r], lora_E = Λ [r, 1]
        return {"lora_A": self.Q.data, "lora_B": self.P.data, "lora_E": self.E.data}

    def peft_state(self) -> dict[str, Tensor] | None:
        return {k: v.detach().float().contiguous() for k, v in self._peft_views().items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        copy_peft(state, self._peft_views())

    def regularizer(self) -> Tensor | None:
        w = self._allocator.cfg.orth_weight
        if w == 0:
            return None
        with torch.autocast(self.P.device.type, enabled=False):
            r = _OrthPenalty.apply(self.P, self.Q, self.neg_eye.to(self.P.dtype))
        return r * (w / (2 * self._allocator.n_layers))


@register_config("adalora", kind="adapter")
class AdaLoRA(AdapterConfig):
    """``init_rank`` triplets per layer pruned to an average of ``target_rank`` per adapted matrix."""

    default_lr: ClassVar[float] = 5e-3
    example_opts: ClassVar[dict[str, Any]] = dict(init_rank=4, target_rank=2)
    peft_type: ClassVar[str | None] = "ADALORA"

    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 32.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_weight: float = 0.1
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.target_rank <= self.init_rank:
            raise ValueError(
                f"AdaLoRA needs 0 < target_rank <= init_rank, got {self.target_rank}, {self.init_rank}"
            )
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError("AdaLoRA beta1 and beta2 must lie in (0, 1)")

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> AdaLoRA:
        """A saved AdaLoRA keeps only the triplets its budget left (``rank_pattern``: a boolean mask per
        ``<module>.lora_E``); PEFT reloads each layer at that rank but keeps the scaling
        alpha / (init_r + 1e-5) it trained with, so alpha is rescaled here to give the same scaling."""
        init_r = int(peft_config.get("init_r") or 12)
        r = init_r
        mask = (peft_config.get("rank_pattern") or {}).get(f"{module}.lora_E")
        if isinstance(mask, list):
            r = sum(bool(b) for b in mask)
        alpha = float(peft_config.get("lora_alpha", 8))
        return cls(
            init_rank=r,
            target_rank=min(int(peft_config.get("target_r") or r), r),
            alpha=alpha * (r + 1e-5) / (init_r + 1e-5),
            beta1=float(peft_config.get("beta1", 0.85)),
            beta2=float(peft_config.get("beta2", 0.85)),
            orth_weight=float(peft_config.get("orth_reg_weight", 0.5)),
            dropout=float(peft_config.get("lora_dropout") or 0.0),
        )

    def create(self, W0: Tensor, ctx: AdapterContext) -> AdaLoRAAdapter:
        check_rank(self.init_rank, W0, ctx)
        n_layers = max(len(ctx.shapes), 1)
        allocator = ctx.shared.group("adalora", lambda: RankAllocator(self, n_layers))
        out_f, in_f = W0.shape
        g = ctx.generator()
        P = torch.randn(out_f, self.init_rank, generator=g) * 0.02
        Q = torch.randn(self.init_rank, in_f, generator=g) * 0.02
        E = torch.zeros(self.init_rank, 1)
        # PEFT divides alpha by (ranknum + 1e-5) with ranknum = init_rank
        adapter = AdaLoRAAdapter(P, E, Q, self.alpha / (self.init_rank + 1e-5), allocator, self.dropout)
        allocator.layers.append(adapter)
        return adapter.to(W0.device)
