"""Low-rank updates ``ΔW = B A`` whose ``A`` is frozen: one node a layer, on the cheaper of two exact paths.

SVFit (``A = V_rᵀ``, ``B = U_r diag(σ - σ_r)``), LoLDU (``A = U_r``, ``B = P L_r diag(σ z - σ0 z0)``) and VeRA
(``A`` the shared random basis, ``B = Λ_b B Λ_d``) all train only vectors that ``B`` is computed from (a
weight-sized product; autograd reduces ``∂B`` to them). Per call, from the shapes and autograd flags only
(``path="auto"``, :func:`frozen_a_costs`), they run on

- the activation path: LoRA's fused node (:func:`~weightsmith.adapters.lora.lora_forward`; Hu et al.,
  "LoRA: Low-Rank Adaptation of Large Language Models", 2021) with this ``A`` (frozen: no ``∂A`` product),
  ``B`` and ``s = 1``, the base product ``x W0ᵀ`` in the same node;
- the weight path: :class:`_FrozenAWeight`, ``W = W0 + B A`` once per call (``out k in`` multiply-adds,
  independent of the N rows), ``y = x Wᵀ``; backward ``∂x = g W`` and ``∂B = (gᵀ x) Aᵀ`` or, when fewer
  multiply-adds, ``∂B = gᵀ (x Aᵀ)``. Where ``B = L diag(c)`` scales the columns of a frozen ``L`` (SVFit,
  LoLDU: :func:`frozen_diag_forward`), :class:`_FrozenDiagWeight` takes the same products without forming
  ``B`` or ``∂B``: the narrower of ``L``, ``A`` is scaled by ``c`` for the build and ``∂c`` is the diagonal
  of ``Lᵀ (gᵀ x) Aᵀ``, one dot per column of the last product (docs/adapters-frozen-a-step.md).

At full rank (SVFit's and LoLDU's default) with N rows the activation path costs about seven N·out·in
products per training step and the weight path four (the frozen layer: two); at rank 16 the weight path also
wins for training batches (it moves no [N, out] tensor beyond the frozen layer's) and the activation path for
a few tokens (generation). The weight path keeps ``W`` (compute dtype, one weight per layer) for backward.
In bfloat16 its forward sees ``W0 + ΔW`` rounded to bfloat16, as a merged model would: an entry of ΔW below
half a bfloat16 step of its ``W0`` entry does not reach the output until it grows; gradients are unaffected.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ._core import amp_dtype, autocast_off, cheaper_path, shared_cast
from .lora import _mm_to, lora_forward
from .lora_group import GroupTerms

FUSED = True  # set False to run LoLDU's coefficients in the weight path as torch ops on CUDA too


def frozen_a_costs(
    tokens: int, out_f: int, in_f: int, k: int, train: bool, input_grad: bool
) -> tuple[int, int]:
    """Multiply-adds of one call (forward, and backward when ``train`` / ``input_grad``), the base product
    included, of the activation path and of the weight path of ``ΔW = B A`` with ``A`` [k, in] frozen and
    ``B`` [out, k] trainable (computed from the parameters: VeRA's ``Λ_b B Λ_d``, SVFit's ``U diag(c)``).

    Activation (LoRA's node): ``h = x Aᵀ``, ``h Bᵀ``, ``x W0ᵀ``; ``∂B = gᵀ h`` when training; with an
    input gradient ``g B``, ``· A`` and ``g W0``. Weight: ``W = W0 + B A`` (independent of N), ``x Wᵀ``;
    ``∂x = g W``; ``∂B`` as ``(gᵀ x) Aᵀ`` or ``gᵀ (x Aᵀ)``, whichever is fewer (:func:`frozen_a_route`).
    """
    N = tokens
    act, weight = N * k * (in_f + out_f) + N * out_f * in_f, out_f * k * in_f + N * out_f * in_f
    if train:
        act += N * out_f * k
        weight += min(N * out_f * in_f + out_f * in_f * k, N * k * (out_f + in_f))
    if input_grad:
        act += N * out_f * k + N * k * in_f + N * out_f * in_f
        weight += N * out_f * in_f
    return act, weight


def frozen_a_route(tokens: int, out_f: int, in_f: int, k: int) -> str:
    """How the weight path gets ``∂B``: ``"G"`` (``(gᵀ x) Aᵀ``, ``N out in + out in k`` multiply-adds) or
    ``"rows"`` (``gᵀ (x Aᵀ)``, ``N k (out + in)``)."""
    return "G" if tokens * out_f * in_f + out_f * in_f * k < tokens * k * (out_f + in_f) else "rows"


class _FrozenAWeight(torch.autograd.Function):
    """``x (W0 + B A)ᵀ`` with the weight built once per call: the weight-space path of a low-rank update
    whose ``A`` is frozen (given in the activations' dtype, cast once: :func:`shared_cast`).

    Saves ``x`` and the built weight ``W`` (compute dtype); gradients for ``x`` and ``B`` only (``∂B`` in
    ``B``'s dtype; autograd takes it on to the parameters ``B`` is computed from).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W0: Tensor, B: Tensor, A_c: Tensor) -> Tensor:
        dt = x.dtype
        W = torch.addmm(W0.to(dt), B.to(dt), A_c)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, W, A_c)
        ctx.x_shape, ctx.B_dtype = x.shape, B.dtype
        return torch.mm(x2, W.t()).view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, W, A_c = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dB = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g2, W).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            (out_f, in_f), k = W.shape, A_c.shape[0]
            if frozen_a_route(x2.shape[0], out_f, in_f, k) == "G":
                dB = _mm_to(torch.mm(g2.t(), x2), A_c.t(), ctx.B_dtype)
            else:
                dB = _mm_to(g2.t(), torch.mm(x2, A_c.t()), ctx.B_dtype)
        return dx, None, dB, None


class _FrozenDiagWeight(torch.autograd.Function):
    """``x (W0 + L diag(c) R)ᵀ``, the weight path of :func:`frozen_diag_forward`: ``L`` [out, k] and ``R``
    [k, in] frozen, ``c`` [k] with a gradient; ``L_c`` / ``R_c`` their compute-dtype casts (None: unused, or
    the factor itself; ``torch.compile`` takes no tensor twice).

    Forward: the narrower factor (``L`` when ``out <= in``) is scaled by ``c`` and written in the compute
    dtype in one pass, and ``W = W0 + (L ⊙ c) R_c`` (or ``W0 + L_c (c ⊙ R)``) is one GEMM with ``W0`` in
    its epilogue. Backward: ``∂x = g W`` and ``∂c_i = (Lᵀ (gᵀ x) Rᵀ)_ii = Σ_n (g L)_ni (x Rᵀ)_ni`` with
    the products of :func:`frozen_a_route` (the multiply-adds ``∂B`` took), the last one written in
    ``c``'s dtype on the narrower side and dotted with the narrower factor: [out, k] (``(gᵀ x) R_cᵀ`` or
    ``gᵀ (x R_cᵀ)``, column dots with ``L``) or [k, in] (``L_cᵀ (gᵀ x)`` or ``(g L_c)ᵀ x``, row dots with
    ``R``); with fewer rows than either side (:func:`_rows_dot`), ``(g L_c) ⊙ (x R_cᵀ)`` summed over the
    rows. No tensor of the wider side in ``c``'s dtype. Saves ``x`` and ``W``; the factors are held.

    With ``sigma`` (0-dim) and ``m0`` given (LoLDU), ``c`` is ``z`` and the coefficients ``σ z + m0`` are
    formed in the scaling pass (:func:`_scale_affine`); backward returns ``∂z = σ ∂c`` and ``∂σ = z · ∂c``
    from the sums of ``∂c`` (:func:`_affine_grad`): on CUDA with Triton the launches SVFit's node makes.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        W0: Tensor,
        c: Tensor,
        L: Tensor,
        R: Tensor,
        L_c: Tensor | None,
        R_c: Tensor | None,
        sigma: Tensor | None,
        m0: Tensor | None,
    ) -> Tensor:
        dt = x.dtype
        L_c, R_c = L if L_c is None else L_c, R if R_c is None else R_c
        scale_L = L.shape[0] <= R.shape[1]
        F = L if scale_L else R
        if sigma is None:  # c itself (SVFit's σ - σ_r)
            Fc = _mul_to(F, c.unsqueeze(0 if scale_L else 1), dt)
        else:  # c is LoLDU's z: the coefficients σ z + m0 (m0 frozen) formed in the scaling pass
            Fc = _scale_affine(F, c, sigma, m0, scale_L, dt)  # type: ignore[arg-type]
        W = torch.addmm(W0.to(dt), Fc, R_c) if scale_L else torch.addmm(W0.to(dt), L_c, Fc)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, W, L, R, L_c, R_c, c, sigma)
        ctx.x_shape, ctx.c_dtype, ctx.scale_L = x.shape, c.dtype, scale_L
        return torch.mm(x2, W.t()).view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, W, L, R, L_c, R_c, c, sigma = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dc = dsigma = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g2, W).view(ctx.x_shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[7]:
            (out_f, k), in_f, N, dt = L.shape, R.shape[1], x2.shape[0], ctx.c_dtype
            route = frozen_a_route(N, out_f, in_f, k)
            # ∂c_i = Σ (T ⊙ F) over the rows (or the columns) of a product T and the factor F it pairs with
            if _rows_dot(N, out_f, in_f, k):  # Σ_n (g L)_ni (x Rᵀ)_ni: [N, k] < either factor
                T, F, axis = _mm_to(g2, L_c, dt), torch.mm(x2, R_c.t()), 0
            elif ctx.scale_L:  # [out, k]: (gᵀ x) R_cᵀ or gᵀ (x R_cᵀ), dotted with L's columns
                G = torch.mm(g2.t(), x2) if route == "G" else None
                T = _mm_to(G, R_c.t(), dt) if G is not None else _mm_to(g2.t(), torch.mm(x2, R_c.t()), dt)
                F, axis = L, 0
            else:  # [k, in]: L_cᵀ (gᵀ x) or (g L_c)ᵀ x, dotted with R's rows
                G = torch.mm(g2.t(), x2) if route == "G" else None
                T = _mm_to(L_c.t(), G, dt) if G is not None else _mm_to(torch.mm(g2, L_c).t(), x2, dt)
                F, axis = R, 1
            if sigma is None:
                dc = T.mul_(F).sum(axis)
            else:  # both from one pass; only those asked for are returned
                dz, ds = _affine_grad(T, F, axis, c, sigma)
                dc, dsigma = (
                    (dz if ctx.needs_input_grad[2] else None),
                    (ds if ctx.needs_input_grad[7] else None),
                )
        return dx, None, dc, None, None, None, None, dsigma, None


def _rows_dot(tokens: int, out_f: int, in_f: int, k: int) -> bool:
    """Whether :class:`_FrozenDiagWeight` takes ``∂c`` as a row sum of ``(g L) ⊙ (x Rᵀ)`` ([N, k], both
    factors cast): on the ``"rows"`` route with fewer rows than either side of ``W``; else the products end
    in an [out, k] or [k, in] tensor dotted with the narrower factor (the same multiply-adds)."""
    return frozen_a_route(tokens, out_f, in_f, k) == "rows" and tokens < min(out_f, in_f)


def _scale_affine(
    F: Tensor, z: Tensor, sigma: Tensor, m0: Tensor, by_col: bool, dtype: torch.dtype
) -> Tensor:
    """``F ⊙ (σ z + m0)`` (by columns or rows) in ``dtype``: one Triton pass where it runs
    (:mod:`._frozen_diag_triton`), else ``addcmul`` for the coefficients and :func:`_mul_to`."""
    if _fused(F, z, sigma, m0):
        from . import _frozen_diag_triton as kernels

        return kernels.scale(F, z, sigma, m0, by_col, dtype)
    return _mul_to(F, torch.addcmul(m0, z, sigma).unsqueeze(0 if by_col else 1), dtype)


def _affine_grad(T: Tensor, F: Tensor, axis: int, z: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(∂z, ∂σ) = (σ ∂c, z · ∂c)`` for ``c = σ z + m0`` with ``∂c = Σ_axis T ⊙ F``: two Triton kernels where
    they run (``T ⊙ F`` never written), else ``mul_``, ``sum``, ``mul`` and ``dot``."""
    if _fused(T, F, z, sigma):
        from . import _frozen_diag_triton as kernels

        return kernels.diag_grad(T.t() if axis else T, F.t() if axis else F, z, sigma)
    dc = T.mul_(F).sum(axis)
    return dc * sigma, torch.dot(z, dc)


def _fused(*tensors: Tensor) -> bool:
    """Whether :mod:`._frozen_diag_triton` takes these (CUDA and Triton; imported only then)."""
    if torch.compiler.is_compiling() or not FUSED:  # the compiler fuses the torch ops itself
        return False
    if not (all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    from . import _frozen_diag_triton as kernels

    return kernels.usable(*tensors)


def _mul_to(F: Tensor, c: Tensor, dtype: torch.dtype) -> Tensor:
    """``F ⊙ c`` (``c`` broadcast) written in ``dtype``: one pass, no product in ``F``'s dtype."""
    return torch.mul(F, c, out=torch.empty(F.shape, dtype=dtype, device=F.device))


def choose_frozen_a_path(path: str, x: Tensor, W0: Tensor, base_out: Tensor | None, B: Tensor) -> str:
    """``"weight"`` or ``"activation"`` for this call of ``ΔW = B A`` (``A`` frozen, ``B`` [out, k]):
    :func:`~._core.cheaper_path` over :func:`frozen_a_costs`."""
    return _choose(path, x, W0, base_out, B.shape[1], B.requires_grad)


def _choose(path: str, x: Tensor, W0: Tensor, base_out: Tensor | None, k: int, trains: bool) -> str:
    out_f, in_f = W0.shape
    return cheaper_path(
        path, x, W0, base_out, trains, lambda n, t, g: frozen_a_costs(n, out_f, in_f, k, t, g)
    )


def frozen_a_cast(A: Tensor, x: Tensor, W0: Tensor, B: Tensor) -> Tensor:
    """``A[:k, :in]`` in the activations' dtype for ``B`` [out, k], ``W0`` [out, in]: ``A`` is a frozen held
    tensor (VeRA's shared basis, sliced per layer), cast once per dtype (:func:`shared_cast`)."""
    return shared_cast(A, amp_dtype(x))[: B.shape[1], : W0.shape[1]]


def frozen_a_forward(
    x: Tensor, W0: Tensor, base_out: Tensor | None, B: Tensor, A: Tensor, path: str
) -> Tensor:
    """``x W0ᵀ + x (B A')ᵀ`` (``base_out + …`` when given) on the path :func:`choose_frozen_a_path` picks;
    ``A' = A[:k, :in]`` frozen (:func:`frozen_a_cast`), ``B`` [out, k] with gradients."""
    A_c = frozen_a_cast(A, x, W0, B)
    if choose_frozen_a_path(path, x, W0, base_out, B) == "weight":
        with torch.autocast(x.device.type, enabled=False):  # as amp_apply; W0 is cast inside
            y: Tensor = _FrozenAWeight.apply(x.to(A_c.dtype), W0, B, A_c)
        return y
    return lora_forward(base_out, x, A_c, B, 1.0, W0)


def frozen_a_group_terms(path: str, x: Tensor, W0: Tensor, B: Tensor, A: Tensor) -> GroupTerms | None:
    """The activation path's terms for sibling layers run as one node (:mod:`.lora_group`); None when
    this call takes the weight path (it then runs per layer)."""
    if choose_frozen_a_path(path, x, W0, None, B) == "weight":
        return None
    return GroupTerms(frozen_a_cast(A, x, W0, B), B, 1.0)


class Coefficients(torch.autograd.Function):
    """``c = σ z + m0`` (``σ`` 0-dim, ``m0`` frozen: LoLDU's ``-σ0 z0``) as one kernel, ``addcmul(m0, z, σ)``;
    backward ``∂z = σ ∂c`` and ``∂σ = z · ∂c``, one kernel each (autograd's product rule takes three). The
    weight path forms ``c`` inside its own passes instead (:func:`frozen_diag_forward` with ``sigma``)."""

    @staticmethod
    def forward(ctx: Any, sigma: Tensor, z: Tensor, m0: Tensor) -> Tensor:
        ctx.save_for_backward(sigma, z)
        return torch.addcmul(m0, z, sigma)

    @staticmethod
    def backward(ctx: Any, dc: Tensor) -> tuple[Tensor | None, ...]:
        sigma, z = ctx.saved_tensors
        dsigma = torch.dot(z, dc) if ctx.needs_input_grad[0] else None
        dz = dc * sigma if ctx.needs_input_grad[1] else None
        return dsigma, dz, None


def frozen_diag_forward(
    x: Tensor,
    W0: Tensor,
    base_out: Tensor | None,
    L: Tensor,
    c: Tensor,
    R: Tensor,
    path: str,
    sigma: Tensor | None = None,
    m0: Tensor | None = None,
) -> Tensor:
    """``x W0ᵀ + x (L diag(c) R)ᵀ`` (``base_out + …`` when given): :func:`frozen_a_forward` for ``B = L
    diag(c)`` with ``L`` [out, k] and ``A = R`` [k, in] frozen and ``c`` [k] (SVFit, LoLDU). On the weight
    path ``B`` is never formed (:class:`_FrozenDiagWeight`); on the activation path it is LoRA's node with
    ``B = L ⊙ c``. With ``sigma`` (0-dim) and ``m0`` [k] (LoLDU), ``c`` is ``z`` and the coefficients are
    ``σ z + m0``: formed inside the weight path's scaling pass and their gradients where ``∂c`` is
    summed (:func:`_scale_affine`, :func:`_affine_grad`), by :class:`Coefficients` on the activation path."""
    dt = amp_dtype(x)
    k = c.shape[0]
    trains = c.requires_grad or (sigma is not None and sigma.requires_grad)
    if _choose(path, x, W0, base_out, k, trains) == "activation":
        coef = c if sigma is None else Coefficients.apply(sigma, c, m0)
        return lora_forward(base_out, x, shared_cast(R, dt), L * coef, 1.0, W0)
    out_f, in_f = W0.shape
    tokens = x.numel() // max(x.shape[-1], 1)
    rows = torch.is_grad_enabled() and trains and _rows_dot(tokens, out_f, in_f, k)
    # the wider factor multiplies the scaled narrower one (and G, or the rows); a row dot needs both
    L_c = shared_cast(L, dt) if (rows or out_f > in_f) and L.dtype != dt else None
    R_c = shared_cast(R, dt) if (rows or out_f <= in_f) and R.dtype != dt else None
    with torch.autocast(x.device.type, enabled=False):  # as amp_apply; W0 is cast inside
        y: Tensor = _FrozenDiagWeight.apply(x.to(dt), W0, c, L, R, L_c, R_c, sigma, m0)
    return y


def frozen_diag_group_terms(
    path: str, x: Tensor, W0: Tensor, L: Tensor, c: Tensor, R: Tensor
) -> GroupTerms | None:
    """:func:`frozen_a_group_terms` for ``B = L diag(c)``, ``A = R``: ``B`` formed only on the activation
    path."""
    if _choose(path, x, W0, None, c.shape[0], c.requires_grad) == "weight":
        return None
    return GroupTerms(shared_cast(R, amp_dtype(x)), L * c, 1.0)
