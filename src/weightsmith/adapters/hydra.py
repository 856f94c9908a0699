"""Hydra: a parallel LoRA branch plus a sequential LoRA branch on the layer's output.

Kim, Yang, Kim, Hong & Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", 2023, arXiv:2309.06922.

    h = W0 x + s · B_p A_p x + s · B_s A_s (W0 x)     =>     ΔW = s · (B_p A_p + B_s A_s W0)

``A_p`` [r, in], ``B_p`` [out, r] (parallel branch, sees the layer's input) and ``A_s`` [r, out],
``B_s`` [out, r] (sequential branch, sees the layer's output). As in the authors' code, the ``A`` are
Xavier-uniform and the ``B`` zero (``ΔW = 0``); their per-branch biases are left out (ours adapts
weights only), and the sequential branch here reads ``W0 x`` without the base bias where theirs also
maps the bias (their merge adds ``s · B_s A_s b0`` to it). ΔW depends on W0, so ``unmerge`` solves
``W' = (I + s B_s A_s) W0 + s B_p A_p`` for W0 through the r×r Woodbury system.
``r (in + out) + 2 r out`` numbers train.

The fast path (:class:`_HydraLinear`, one autograd node) uses that the sequential branch reads the
bias-free base output ``x W0ᵀ``, so ``(x W0ᵀ) A_sᵀ = x (A_s W0)ᵀ``: Hydra is a rank-``2r`` LoRA with

    A = [A_p; A_s W0]  [2r, in],   B = [B_p, B_s]  [out, 2r],   y = x W0ᵀ + s (x Aᵀ) Bᵀ

and runs as LoRA's node does: one thin GEMM ``h = x Aᵀ``, ``y = h (sB)ᵀ`` with the base GEMM
accumulating into it; backward ``gB = g (sB)``, ``dx = gB A + g W0`` (one buffer), ``dA = gBᵀ x`` split
into ``dA_p`` and ``dA_s = (gB_sᵀ x) W0ᵀ``, ``dB = s gᵀ h``. ``A_s W0`` and ``dA_s`` are weight-sized
products with ``K = out`` resp. ``in`` but only ``r`` rows, cheaper than the token-sized ``(x W0ᵀ) A_sᵀ``
they replace, and the base output is neither re-read nor saved. Being exactly a LoRA, Hydra on sibling
layers that read one input (q/k/v, gate/up) joins their grouped node (:meth:`HydraAdapter.group_terms`,
:mod:`weightsmith.adapters.lora_group`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, amp_apply, amp_dtype, autocast_off, check_rank
from .lora import _mm_to
from .lora_group import GroupTerms


class _HydraLinear(torch.autograd.Function):
    """``y = base + s (x A_pᵀ) B_pᵀ + s (x (A_s W0)ᵀ) B_sᵀ``, ``base = x W0ᵀ`` computed here (``base_out``
    None) or given; the rank-``2r`` LoRA form of the module docstring, in one node.

    Parameters may be float32 while activations are 16-bit; gradients come back in the parameters'
    dtypes. With ``base_out`` given the node returns ``g`` for it and leaves ``g W0`` to the base layer.
    Call it through :func:`amp_apply`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        base_out: Tensor | None,
        x: Tensor,
        W0: Tensor,
        A_p: Tensor,
        A_s: Tensor,
        B_p: Tensor,
        B_s: Tensor,
        s: float,
    ) -> Tensor:
        dt, (r, in_f), out_f = x.dtype, A_p.shape, W0.shape[0]
        x2 = x.reshape(-1, in_f)
        W, A_sc = W0.to(dt), A_s.to(dt)
        A = torch.empty(2 * r, in_f, dtype=dt, device=x.device)
        A[:r].copy_(A_p)
        torch.mm(A_sc, W, out=A[r:])  # the sequential branch moved onto x: (x W0ᵀ) A_sᵀ = x (A_s W0)ᵀ
        Bs = torch.cat([B_p, B_s], dim=1, out=torch.empty(out_f, 2 * r, dtype=dt, device=x.device))
        if s != 1.0:
            Bs.mul_(s)
        h = torch.mm(x2, A.t())
        if base_out is None:
            y = torch.mm(h, Bs.t()).addmm_(x2, W.t())
        else:
            y = torch.addmm(base_out.reshape(-1, out_f), h, Bs.t())
        ctx.save_for_backward(x2, h, A, Bs, W, A_sc)
        ctx.s, ctx.r, ctx.x_shape, ctx.fused = s, r, x.shape, base_out is None
        ctx.dtypes = (W0.dtype, A_p.dtype, A_s.dtype, B_p.dtype, B_s.dtype)
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, h, A, Bs, W, A_sc = ctx.saved_tensors
        need_base, need_x, need_W, need_Ap, need_As, need_Bp, need_Bs = ctx.needs_input_grad[:7]
        r, s, (dt_W, dt_Ap, dt_As, dt_Bp, dt_Bs) = ctx.r, ctx.s, ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1])
        dx = dW = dA_p = dA_s = dB_p = dB_s = None
        gB = torch.mm(g2, Bs) if need_x or need_Ap or need_As or need_W else g2  # [g sB_p, g sB_s]
        if need_x:
            dx = torch.mm(gB, A)
            dx = (dx.addmm_(g2, W) if ctx.fused else dx).view(ctx.x_shape)
        if need_Ap or need_As or need_W:
            dA = _mm_to(gB.t(), x2, dt_Ap)  # [dA_p; gB_sᵀ x]
            dA_p = dA[:r] if need_Ap else None
            dA_s_x = dA[r:].to(x2.dtype)  # gB_sᵀ x = s B_sᵀ gᵀ x
            if need_As:
                dA_s = _mm_to(dA_s_x, W.t(), dt_As)
            if need_W:  # ∂(s B_s A_s W0) = A_sᵀ (s B_sᵀ G), plus G = gᵀ x when the node owns the base
                dW = torch.mm(g2.t(), x2).addmm_(A_sc.t(), dA_s_x) if ctx.fused else A_sc.t() @ dA_s_x
                dW = dW.to(dt_W)
        if need_Bp or need_Bs:  # s gᵀ h = [dB_p, dB_s]: column halves (autograd accumulates views alike)
            dB = _mm_to(g2.t(), h, dt_Bp, s)
            dB_p = dB[:, :r] if need_Bp else None
            dB_s = dB[:, r:].to(dt_Bs) if need_Bs else None
        return g if need_base else None, dx, dW, dA_p, dA_s, dB_p, dB_s, None


class HydraAdapter(Adapter):
    """Trainable ``A_p``, ``B_p`` (parallel) and ``A_s``, ``B_s`` (sequential)."""

    # alone on a layer Hydra computes x W0ᵀ itself (base_out None), fused with its own products
    needs_base_out: ClassVar[bool] = False

    def __init__(self, A_p: Tensor, A_s: Tensor, out_f: int, scale: float) -> None:
        super().__init__()
        r = A_p.shape[0]
        self.A_p = nn.Parameter(A_p)
        self.B_p = nn.Parameter(torch.zeros(out_f, r, device=A_p.device))
        self.A_s = nn.Parameter(A_s)
        self.B_s = nn.Parameter(torch.zeros(out_f, r, device=A_p.device))
        self.scale = scale

    def delta(self, W0: Tensor) -> Tensor:
        return self.scale * (self.B_p @ self.A_p + self.B_s @ (self.A_s @ W0))

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        args = (W0, self.A_p, self.A_s, self.B_p, self.B_s, self.scale)
        return amp_apply(_HydraLinear, base_out, x, *args)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms:
        """The rank-``2r`` LoRA terms ``A = [A_p; A_s W0]``, ``B = [B_p, B_s]`` (computed with gradients),
        for sibling layers run as one node (:mod:`.lora_group`). ``A_s W0`` is formed in the activations'
        dtype, as :class:`_HydraLinear` does, and held in the parameters' dtype like a LoRA factor."""
        dt = amp_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            A_sW = (self.A_s.to(dt) @ W0.to(dt)).to(self.A_p.dtype)
            A = torch.cat([self.A_p, A_sW])
            B = torch.cat([self.B_p, self.B_s], dim=1)
        return GroupTerms(A, B, self.scale)

    def unmerge(self, W_merged: Tensor) -> Tensor:
        s = self.scale
        A_s, B_s = self.A_s.double(), self.B_s.double()
        R = W_merged.double() - s * (self.B_p.double() @ self.A_p.double())
        # (I + s B A)^-1 R = R - s B (I_r + s A B)^-1 A R
        eye = torch.eye(A_s.shape[0], dtype=R.dtype, device=R.device)
        return (R - s * B_s @ torch.linalg.solve(eye + s * A_s @ B_s, A_s @ R)).to(W_merged.dtype)


@register_config("hydra", kind="adapter")
class Hydra(AdapterConfig):
    """``rank`` r of both branches; ``scale`` s multiplies both (the authors' ``scale``)."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4)

    rank: int = 8
    scale: float = 1.0
    seed: int = 0

    def create(self, W0: Tensor, ctx: AdapterContext) -> HydraAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "Hydra")
        g = ctx.generator()
        A_p = nn.init.xavier_uniform_(torch.empty(r, in_f), generator=g)
        A_s = nn.init.xavier_uniform_(torch.empty(r, out_f), generator=g)
        return HydraAdapter(A_p.to(W0.device), A_s.to(W0.device), out_f, self.scale)
