"""RandLoRA: a full-rank update from shared random low-rank bases with trainable diagonal scalings.

Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel & Abbasnejad, "RandLoRA: Full-rank
parameter-efficient fine-tuning of large models", ICLR 2025, arXiv:2502.00987.

For a weight with larger side D and smaller side d (``n = ceil(d / r)`` bases, so ``n r >= d``):

    M = s · Σ_{i=1..n} B_i Λ_i A Γ_i,   B_i [D, r], A [r, d] frozen,  Λ_i = diag(λ_i) [r], Γ_i = diag(γ_i) [d]

and ``ΔW = M`` when ``out >= in``, ``ΔW = Mᵀ`` otherwise (the trainable scalings sit on the small side,
as in PEFT). ``s = alpha / r``. ``λ`` [n, r] starts at 0 (``ΔW = 0``), ``γ`` [n, d] at ``1 / D``; the
bases are unit-variance uniform, drawn once at the largest sizes among the adapted weights (each layer
slices them, as PEFT does) from ``ctx.shared`` and never saved: a file holds ``n (r + d)`` numbers per
layer, where PEFT 0.21 writes the bases again for every layer. The fast path is one autograd node
(``_RandLoRALinear``): the n bases concatenated along the rank, ``x Afᵀ Bfᵀ`` with the scaled
``Af`` [n r, d] and ``Bf`` [D, n r] (a LoRA of rank n r), the frozen bases cast once per dtype for all
layers, and a hand-written backward that reduces ``∂Af`` straight to ``∂λ``, ``∂γ`` (two batched
products) and keeps only the activation on the input side. PEFT's sparse (ternary) bases are not
offered (PEFT notes they bring no speed or memory gain yet). ``basis="orthogonal"`` draws ``A`` with
orthonormal rows and ``B`` as one [D_max, n_max r] matrix with orthonormal columns (so the n r columns of
``Bf`` are orthonormal and the sum of the n rank-r terms is exactly full rank), at unit entry variance
(``_bases``); the PEFT export, written as LoRA factors, is exact with either basis.

Two exact paths, chosen per call from the shapes (``path="auto"``, :func:`randlora_costs`): with N
rows, the activation path above costs ``N k (d + D)`` multiply-adds forward and about as much again
twice in backward (k = n r >= d: five products of the base GEMM's size), while the weight path
builds ``W = W0 + ΔW`` once (``D k d``, independent of N), runs the base GEMM with it (replacing
``x W0ᵀ``) and backward ``g W`` (replacing the base input gradient) and ``∂Af = Bfᵀ gᵀ x``, as
``Bfᵀ (gᵀ x)`` or, with fewer multiply-adds when N < D, ``(g Bf)ᵀ x`` (:func:`weight_grad_rows`): one
N-sized product more than the frozen layer instead of five. For N > d it is the cheaper one (training
batches); for a few tokens (generation) the activation path is. Memory of the weight path: it keeps only
``x`` for backward (the activation path also keeps ``Af`` [n r, d]) and rebuilds ``W0 + ΔW`` there;
while a layer runs it holds one [out, in] temporary (``W0 + ΔW``, then ``∂W`` where that order runs) in
the compute dtype. ``keep_weight=True`` keeps forward's ``W0 + ΔW`` for backward instead (one ``D k d``
product and two [n r, d] passes fewer a layer and step, one [out, in] tensor more per layer from forward
to backward). Beyond the products, a layer's step makes five [n r, d] elementwise passes (``Af`` twice
in two, :func:`scaled_rows`; ``∂Af ⊙ s A`` once and two reads of it, :func:`scalings_grad`), seven
without ``keep_weight``; on a GPU with Triton one fused kernel each (``_randlora_triton``) writes ``Af``
once and reads ``∂Af`` once. ``s A`` is made once for all layers (:func:`scaled_basis`). In bf16 the
weight path's forward sees ``W0 + ΔW`` rounded to bf16, as a merged bf16 model would: an entry of ΔW
below half a bf16 step of its ``W0`` entry does not reach the
output until it grows (the activation path adds ``x ΔWᵀ`` to the rounded output instead); gradients are
unaffected, and at ``λ = 0`` both paths are exactly ``W0``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compress._rtn_choice import triton_installed
from ..config import register_config
from ..errors import WeightsmithError
from ._bases import check_basis, draw_basis, refuse_unsaved_projection
from ._core import (
    Adapter,
    AdapterConfig,
    AdapterContext,
    amp_apply,
    amp_dtype,
    autocast_off,
    cheaper_path,
    check_path,
    check_rank,
    copy_peft,
    peft_take,
    shared_cast,
)


class ScaledBasis(torch.autograd.Function):
    """``λ[:, :, None] * A[None] * γ[:, None, :]`` -> [n, r, d], saving only the factors for backward."""

    @staticmethod
    def forward(ctx: Any, A: Tensor, lam: Tensor, gamma: Tensor) -> Tensor:
        ctx.save_for_backward(A, lam, gamma)
        return lam[:, :, None] * A[None] * gamma[:, None, :]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        A, lam, gamma = ctx.saved_tensors
        grad_lam = torch.einsum("nrd,rd,nd->nr", grad, A, gamma)
        grad_gamma = torch.einsum("nrd,rd,nr->nd", grad, A, lam)
        return None, grad_lam, grad_gamma


def grad_through_tokens(tokens: int, D: int, d: int, k: int) -> bool:
    """Whether the weight path's ``∂Af = Bfᵀ gᵀ x`` (wide; ``Bfᵀ xᵀ g`` tall) is cheaper as ``(g Bf)ᵀ x``
    (``N k (D + d)`` multiply-adds, no [out, in] ``∂W``) than as ``Bfᵀ (gᵀ x)`` (``N D d + D k d``). With
    ``k = d`` that is ``N < D``: at 4096 tokens the 5632-wide MLP weights of the issue's benchmark, not the
    2048-wide attention ones. Shapes only, so a CUDA graph or a compiled trace sees one order per shape."""
    return tokens * k * (D + d) < tokens * D * d + D * k * d


def randlora_costs(
    tokens: int, out_f: int, in_f: int, k: int, train: bool, input_grad: bool, keep: bool = False
) -> tuple[int, int]:
    """Multiply-adds of one call (forward, and backward when ``train``), the base product included, of the
    activation path and of the weight path, for ``tokens`` rows, a [out_f, in_f] weight and rank ``k = n r``.

    Activation path: ``x W0ᵀ``, ``x Afᵀ`` [N, k], ``· Bfᵀ``; backward ``g Bf``, ``∂Af``, and with an input
    gradient ``g W0`` and ``· Af``. Weight path: ``W = W0 + Bf Af`` (k D d, independent of N), ``x Wᵀ``;
    backward ``∂Af = Bfᵀ gᵀ x`` in the cheaper order (:func:`grad_through_tokens`) and with an input
    gradient ``W`` again (not when ``keep``: forward's is kept) and ``g W``.
    """
    N, d, D = tokens, min(out_f, in_f), max(out_f, in_f)
    act, weight = N * D * d + N * k * (d + D), D * k * d + N * D * d
    if train:
        act += N * k * D + N * k * d
        weight += min(N * D * d + D * k * d, N * k * (D + d))
    if input_grad:
        act += N * D * d + N * k * d
        weight += (0 if keep else D * k * d) + N * D * d
    return act, weight


def times(t: Tensor, s: float) -> Tensor:
    """``s t``; ``t`` itself (no kernel) when ``s`` is 1, as for a basis that already carries the scaling."""
    return t if s == 1.0 else t * s


def scaled_basis(A: Tensor, s: float, dtype: torch.dtype) -> Tensor:
    """``s A`` in ``dtype`` for the frozen basis ``A`` that all layers share: made once (again when ``A`` is
    changed in place; :func:`._core.shared_cast`), so no layer spends two [r, d] kernels a step on scaling
    it (``s λ`` in forward, ``s A`` in backward)."""
    return shared_cast(A, dtype, s)


KERNEL_ENV = "WEIGHTSMITH_RANDLORA_KERNEL"  # "auto" (the fused kernels where they apply) or "torch"
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)  # where they apply (tests add "cpu" under Triton's interpreter)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of Af and ∂Af there


def kernel_ok(lam: Tensor, gamma: Tensor, sA: Tensor, s: float, *more: Tensor) -> bool:
    """Whether :mod:`._randlora_triton`'s fused kernels run this step: on a device of
    :data:`KERNEL_DEVICES` with Triton installed, outside ``torch.compile`` (which fuses the torch ops
    itself), for float32 scalings and a float32 basis that carries the scaling (``s = 1``: the adapter's
    :func:`scaled_basis`), contiguous rows (and ``more``: ``∂Af``, contiguous, in :data:`KERNEL_DTYPES`),
    unless ``WEIGHTSMITH_RANDLORA_KERNEL=torch``."""
    mode = os.environ.get(KERNEL_ENV, "auto")
    if mode not in ("auto", "torch"):
        raise WeightsmithError(f"{KERNEL_ENV}={mode!r}: use auto or torch")
    tensors = (lam, gamma, sA, *more)
    return (
        mode == "auto"
        and s == 1.0
        and lam.device.type in KERNEL_DEVICES
        and not torch.compiler.is_compiling()
        and lam.dtype == gamma.dtype == sA.dtype == torch.float32
        and lam.is_contiguous()
        and gamma.is_contiguous()
        and sA.stride(1) == 1
        and all(t.is_contiguous() and t.dtype in KERNEL_DTYPES for t in more)
        and all(t.device == lam.device for t in tensors)
        and triton_installed()
    )


def scaled_rows(lam: Tensor, gamma: Tensor, A: Tensor, s: float, dtype: torch.dtype) -> Tensor:
    """``Af`` [n r, d]: row ``i r + k`` = ``s λ_ik A[k] Γ_i``, computed in the parameters' dtype and rounded
    once to ``dtype``.

    Two weight-sized passes: ``(s λ) ⊙ A`` [n, r, d], then ``⊙ γ`` written straight into the ``dtype``
    result (the cast rides on the second product's store; the same products in the same order as
    ``(s λ ⊙ A ⊙ γ).to(dtype)``, so the values are bit for bit those of three passes). Given ``s A``
    (:func:`scaled_basis`) and ``s = 1`` it is ``λ ⊙ (s A) ⊙ γ``: no [n, r] kernel, and ``s`` meets ``A``
    before ``λ`` (float rounding apart). Where :func:`kernel_ok`, one fused kernel writes it (bit for bit
    the same)."""
    if dtype in KERNEL_DTYPES and kernel_ok(lam, gamma, A, s):
        from . import _randlora_triton

        return _randlora_triton.scaled_rows(lam, gamma, A, dtype)
    n, r = lam.shape
    lam_A = torch.mul(times(lam.unsqueeze(2), s), A.to(lam.dtype))  # [n, r, d]
    out = lam_A if lam_A.dtype == dtype else torch.empty(lam_A.shape, dtype=dtype, device=lam_A.device)
    return torch.mul(lam_A, gamma.unsqueeze(1), out=out).view(n * r, -1)


def scalings_grad(dAf: Tensor, A: Tensor, lam: Tensor, gamma: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """``(∂λ, ∂γ)`` from ``∂Af`` [n r, d]: ``P = ∂Af ⊙ s A`` per basis, ``∂λ = P γ``, ``∂γ = λ P``.

    One weight-sized pass (``P``, in the parameters' dtype: the cast of ``∂Af`` rides on the product; ``s``
    scales the [r, d] basis, not ``P``, and not at all when ``A`` already carries it and ``s = 1``) and two
    batched products that read it. Where :func:`kernel_ok`, one fused kernel reads ``∂Af`` once instead
    (float32 summation order apart)."""
    if kernel_ok(lam, gamma, A, s, dAf):
        from . import _randlora_triton

        return _randlora_triton.scalings_grad(dAf, A, lam, gamma)
    n, r = lam.shape
    P = torch.empty((n, r, dAf.shape[-1]), dtype=lam.dtype, device=dAf.device)
    torch.mul(dAf.view(n, r, -1), times(A.to(lam.dtype), s), out=P)
    return torch.bmm(P, gamma.unsqueeze(2)).view(n, r), torch.bmm(lam.unsqueeze(1), P).view(n, -1)


def merged_weight(W0: Tensor, Af: Tensor, Bf: Tensor) -> Tensor:
    """``W0 + ΔW`` [out, in] in ``Af``'s dtype: ``Bf Af`` when out >= in, else ``Afᵀ Bfᵀ``."""
    W0 = W0.to(Af.dtype)
    return torch.addmm(W0, Bf, Af) if W0.shape[0] >= W0.shape[1] else torch.addmm(W0, Af.t(), Bf.t())


def weight_grad_rows(g2: Tensor, x2: Tensor, Bf: Tensor, wide: bool) -> Tensor:
    """``∂Af = Bfᵀ ∂W`` [n r, d] of the weight path (``∂W = gᵀ x``; its transpose when the layer is tall),
    in the order with fewer multiply-adds (:func:`grad_through_tokens`): through the tokens, ``(g Bf)ᵀ x``
    (tall: ``(x Bf)ᵀ g``), never building the [out, in] ``∂W``, or through the weight, ``Bfᵀ (gᵀ x)``."""
    big, small = (g2, x2) if wide else (x2, g2)  # the D-wide and the d-wide side of the tokens
    if grad_through_tokens(big.shape[0], big.shape[1], small.shape[1], Bf.shape[1]):
        return torch.mm(torch.mm(big, Bf).t(), small)
    return torch.mm(Bf.t(), torch.mm(big.t(), small))


class _RandLoRAWeight(torch.autograd.Function):
    """``x (W0 + ΔW)ᵀ`` with ``ΔW`` built once per call: the weight-space path (replaces the base product).

    Forward keeps ``x`` (and the frozen ``W0``, the bases and the scalings, no copies); backward rebuilds
    ``W0 + ΔW`` for the input gradient rather than keeping a [out, in] tensor per layer alive, unless
    ``keep``: then forward's ``W0 + ΔW`` stays for backward (one ``D k d`` product and the two passes of
    ``Af`` fewer, one [out, in] tensor in the compute dtype more until backward). Nothing is built for
    a gradient nobody asked for (``∂x``; ``∂λ``, ``∂γ`` of frozen scalings).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        W0: Tensor,
        lam: Tensor,
        gamma: Tensor,
        A: Tensor,
        Bf: Tensor,
        s: float,
        keep: bool = False,
    ) -> Tensor:
        W = merged_weight(W0, scaled_rows(lam, gamma, A, s, x.dtype), Bf)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.kept = keep and ctx.needs_input_grad[0]
        ctx.save_for_backward(x2, W if ctx.kept else W0, lam, gamma, A, Bf)
        ctx.s, ctx.x_shape, ctx.wide = s, x.shape, W0.shape[0] >= W0.shape[1]
        return torch.mm(x2, W.t()).view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, W, lam, gamma, A, Bf = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = d_lam = d_gamma = None
        if ctx.needs_input_grad[0]:
            if not ctx.kept:  # W is W0 here
                W = merged_weight(W, scaled_rows(lam, gamma, A, ctx.s, x2.dtype), Bf)
            dx = torch.mm(g2, W).view(ctx.x_shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dAf = weight_grad_rows(g2, x2, Bf, ctx.wide)
            d_lam, d_gamma = scalings_grad(dAf, A, lam, gamma, ctx.s)
        return dx, None, d_lam, d_gamma, None, None, None, None


class _RandLoRALinear(torch.autograd.Function):
    """``base_out + x ΔWᵀ``, ``ΔW = Bf Af`` (wide: out >= in) or ``Afᵀ Bfᵀ``, ``Af = s λ ⊙ A ⊙ γ``."""

    @staticmethod
    def forward(
        ctx: Any, base_out: Tensor, x: Tensor, lam: Tensor, gamma: Tensor, A: Tensor, Bf: Tensor, s: float
    ) -> Tensor:
        Af = scaled_rows(lam, gamma, A, s, x.dtype)
        x2, base2 = x.reshape(-1, x.shape[-1]), base_out.reshape(-1, base_out.shape[-1])
        wide = Bf.shape[0] == base2.shape[1]
        if wide:  # x [N, d] -> [N, n r] -> [N, D]
            y = torch.addmm(base2, torch.mm(x2, Af.t()), Bf.t())
            ctx.save_for_backward(x2, Af, Bf, A, lam, gamma)
        else:  # x [N, D] -> [N, n r] -> [N, d]
            h = torch.mm(x2, Bf)
            y = torch.addmm(base2, h, Af)
            ctx.save_for_backward(h, Af, Bf, A, lam, gamma)
        ctx.wide, ctx.s, ctx.x_shape = wide, s, x.shape
        return y.view(base_out.shape)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        saved, Af, Bf, A, lam, gamma = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.wide:
            gh = torch.mm(g2, Bf)
            dx = torch.mm(gh, Af) if ctx.needs_input_grad[1] else None
            dAf = torch.mm(gh.t(), saved)
        else:
            gh = torch.mm(g2, Af.t())
            dx = torch.mm(gh, Bf.t()) if ctx.needs_input_grad[1] else None
            dAf = torch.mm(saved.t(), g2)
        d_lam, d_gamma = scalings_grad(dAf, A, lam, gamma, ctx.s)
        return g, None if dx is None else dx.view(ctx.x_shape), d_lam, d_gamma, None, None, None


def unit_uniform(shape: tuple[int, ...]) -> Any:
    def make(g: torch.Generator) -> Tensor:
        t = torch.rand(shape, generator=g) * 2 - 1
        return t / t.std()

    return make


class RandLoRAAdapter(Adapter):
    """Trainable ``randlora_lambda`` [n, r], ``randlora_gamma`` [n, d]; shared ``randlora_A``, ``_B``."""

    needs_base_out: ClassVar[bool] = False  # the weight path replaces x W0ᵀ; the activation path computes it
    randlora_A: Tensor
    randlora_B: Tensor

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        out_f: int,
        in_f: int,
        rank: int,
        n: int,
        scaling: float,
        path: str = "auto",
        keep_weight: bool = True,
    ) -> None:
        super().__init__()
        check_path(path, "RandLoRA")
        self.path, self.keep_weight = path, keep_weight
        self.hold(
            randlora_A=A,  # [r, d_max]
            randlora_B=B,  # [D_max, n_max, r]
        )
        self.out_f, self.in_f, self.rank, self.n, self.scaling = out_f, in_f, rank, n, scaling
        d, D = min(out_f, in_f), max(out_f, in_f)
        self.randlora_lambda = nn.Parameter(torch.zeros(n, rank, device=A.device))
        self.randlora_gamma = nn.Parameter(torch.full((n, d), 1.0 / D, device=A.device))

    def scaled_bases(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``Bf`` [D, n r] with column ``i r + k`` = ``B_i[:, k]``, and ``Af`` [n r, d] with row
        ``i r + k`` = ``λ_ik A[k] Γ_i``."""
        d, D = min(self.out_f, self.in_f), max(self.out_f, self.in_f)
        A = self.randlora_A[: self.rank, :d].to(dtype)
        Bf = self.randlora_B[:D, : self.n, : self.rank].reshape(D, self.n * self.rank).to(dtype)
        Af = ScaledBasis.apply(A, self.randlora_lambda.to(dtype), self.randlora_gamma.to(dtype))
        return Bf, Af.reshape(self.n * self.rank, d)

    def delta(self, W0: Tensor) -> Tensor:
        Bf, Af = self.scaled_bases(self.randlora_lambda.dtype)
        M = (Bf @ Af) * self.scaling  # [D, d]
        return M if self.out_f >= self.in_f else M.T

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """Exact factors of rank n r (>= min side: the update is full rank by design)."""
        Bf, Af = self.scaled_bases(self.randlora_lambda.dtype)
        return (Bf * self.scaling, Af) if self.out_f >= self.in_f else (Af.T * self.scaling, Bf.T)

    def peft_state(self) -> dict[str, Tensor] | None:
        return None  # our bases come from our seed and pair B's columns differently from PEFT's

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        """PEFT's ``randlora_lambda`` [r, n] (ours transposed), ``randlora_gamma`` [n, d] and its bases
        ``randlora_A`` [r, 1, d_max], ``randlora_B`` [D_max, n_max, r]. PEFT pairs A-row ``k`` of basis ``i``
        with column ``k n + i`` of ``B[:D, :n].reshape(D, n r)``; ours with ``B[:, i, k]``, so this layer
        gets its own re-ordered copy of B (A is shared as is)."""
        r, n = self.rank, self.n
        d, D = min(self.out_f, self.in_f), max(self.out_f, self.in_f)
        A = peft_take(state, "randlora_A")
        B = peft_take(state, "randlora_B")
        if A.ndim != 3 or A.shape[0] != r or A.shape[1] != 1 or A.shape[2] < d:
            raise WeightsmithError(
                f"tensor 'randlora_A' has shape {tuple(A.shape)}, expected [{r}, 1, >={d}]"
            )
        if B.ndim != 3 or B.shape[0] < D or B.shape[1] < n or B.shape[2] != r:
            raise WeightsmithError(
                f"tensor 'randlora_B' has shape {tuple(B.shape)}, expected [>={D}, >={n}, {r}]"
            )
        mine = B[:D, :n, :].reshape(D, n * r).reshape(D, r, n).permute(0, 2, 1).contiguous()
        lam = peft_take(state, "randlora_lambda", (r, n))
        copy_peft({"randlora_gamma": state["randlora_gamma"]}, {"randlora_gamma": self.randlora_gamma.data})
        with torch.no_grad():
            self.randlora_lambda.copy_(lam.T)
        self._shared_slots = {
            k: v for k, v in self.__dict__.get("_shared_slots", {}).items() if k == "randlora_A"
        }
        if tuple(self.randlora_A.shape) == (r, A.shape[2]):
            with torch.no_grad():
                self.randlora_A.copy_(A[:, 0, :])
        else:
            self._shared_slots.pop("randlora_A", None)
            self.hold(randlora_A=A[:, 0, :].to(self.randlora_A.device))
        self.hold(randlora_B=mine.to(self.randlora_B.device))
        self.peft_bases = True  # not regenerable from our seed any more

    def choose_path(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> str:
        """This call's path (:func:`~._core.cheaper_path` over :func:`randlora_costs`)."""
        trains = self.randlora_lambda.requires_grad or self.randlora_gamma.requires_grad
        out_f, in_f, k, keep = self.out_f, self.in_f, self.n * self.rank, self.keep_weight
        return cheaper_path(
            self.path, x, W0, base_out, trains, lambda n, t, g: randlora_costs(n, out_f, in_f, k, t, g, keep)
        )

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        d, D = min(self.out_f, self.in_f), max(self.out_f, self.in_f)
        lam, gamma = self.randlora_lambda, self.randlora_gamma
        sA = scaled_basis(self.randlora_A, self.scaling, lam.dtype)[: self.rank, :d]  # s A, so s = 1 below
        dt = amp_dtype(x)
        Bf = shared_cast(self.randlora_B, dt)[:D, : self.n, : self.rank].reshape(D, self.n * self.rank)
        if self.choose_path(x, W0, base_out) == "weight":
            with torch.autocast(x.device.type, enabled=False):  # as amp_apply; W0 is cast inside
                y: Tensor = _RandLoRAWeight.apply(x.to(dt), W0, lam, gamma, sA, Bf, 1.0, self.keep_weight)
            return y
        if base_out is None:
            base_out = F.linear(x, W0)  # what the core computes for methods that read base_out
        return amp_apply(_RandLoRALinear, base_out, x, lam, gamma, sA, Bf, 1.0)


@register_config("randlora", kind="adapter")
class RandLoRA(AdapterConfig):
    """``rank`` r of each random basis (PEFT default 32); scaling ``alpha / rank`` (PEFT's alpha: 640);
    ``basis``: "random" (unit-variance uniform, PEFT's) or "orthogonal" (``_bases``). ``path``: "auto"
    (per call, the cheaper of the two exact computations below by multiply-adds), "activation" (a LoRA of
    rank n r on the activations) or "weight" (``x (W0 + ΔW)ᵀ`` with ΔW built once per call).
    ``keep_weight`` (default, as SVFit, LoLDU, VeRA and BOFT keep theirs): the weight path keeps forward's
    ``W0 + ΔW`` for backward instead of rebuilding it (one ``D k d`` product fewer a layer and step, for
    one [out, in] tensor per adapted layer in the compute dtype alive from forward to backward: a second
    copy of the adapted weights at the peak; H200, 1.1B bf16, 4x1024 tokens, graphed: 71.9 against 80.1 ms
    a step, 10.0 against 9.0 GiB, benchmarks/RESULTS.md); ``False`` rebuilds it."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=8, alpha=16.0)
    peft_type: ClassVar[str | None] = "RANDLORA"

    rank: int = 32
    alpha: float = 640.0
    basis: str = "random"
    seed: int = 0
    path: str = "auto"
    keep_weight: bool = True

    def __post_init__(self) -> None:
        check_basis(self.basis, "randlora")
        check_path(self.path, "RandLoRA")
        if not isinstance(self.keep_weight, bool):
            raise WeightsmithError(
                f"RandLoRA option 'keep_weight' must be true or false, got {self.keep_weight!r}"
            )

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> RandLoRA:
        refuse_unsaved_projection(peft_config, "RandLoRA")
        r = int(peft_config["r"])
        return cls(rank=r, alpha=float(peft_config.get("randlora_alpha", 20 * r)))

    def create(self, W0: Tensor, ctx: AdapterContext) -> RandLoRAAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        check_rank(r, W0, ctx, "RandLoRA")
        shapes = (*(ctx.shapes or ()), (out_f, in_f))
        d_max = max(min(s) for s in shapes)
        D_max = max(max(s) for s in shapes)
        n_max = max(math.ceil(min(s) / r) for s in shapes)
        A = draw_basis(ctx.shared, "randlora.A", self.basis, (r, d_max), 1.0, unit_uniform((r, d_max)))
        B = draw_basis(
            ctx.shared, "randlora.B", self.basis, (D_max, n_max, r), 1.0, unit_uniform((D_max, n_max, r))
        )
        n = math.ceil(min(out_f, in_f) / r)
        return RandLoRAAdapter(A, B, out_f, in_f, r, n, self.alpha / r, self.path, self.keep_weight)
