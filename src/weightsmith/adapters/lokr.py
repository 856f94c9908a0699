"""LoKr: the update as one Kronecker product of a small and a (possibly low-rank) larger factor.

Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022, arXiv:2212.10650
(eq. 4), in the LyCORIS form (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", ICLR 2024) that PEFT implements:

    ΔW = s · W1 ⊗ W2,   W1 [a, c],  W2 [b, d],   out = a·b,  in = c·d,   s = alpha / r

``(a, b)`` and ``(c, d)`` factor ``out`` and ``in``: with ``decompose_factor = f > 0`` dividing the
size, ``(f, size / f)``; otherwise the divisor pair closest to a square among divisors ``≤ f`` (``f = -1``:
no bound), smaller first. ``W2 = W2a W2b`` (rank r) when ``r < max(b, d) / 2``, and with
``decompose_both`` also ``W1 = W1a W1b`` when ``r < max(a, c) / 2``; else they are full matrices.
Initialisation (PEFT's): ``W1`` (or ``W1a``) zero, the other factors Kaiming-uniform, so ``ΔW = 0``.

Fast path: ``(W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ)`` for ``x`` viewed as ``X`` [c, d] (row-major)
(Van Loan, "The ubiquitous Kronecker product", 2000), so the update costs ``tokens · (a·c·d + a·b·d)``
multiply-adds (or ``tokens · c·b·(d + a)`` in the other order) instead of a dense ``out × in`` product.
Alone on a layer, LoKr is ONE autograd node that also computes the base product ``x W0ᵀ``
(``needs_base_out = False``) and the factor products ``W = Wa Wb``; backward, with ``G_t`` the output
gradient ``g_t`` of token t viewed [a, b] and ``Z_t = X_t W2ᵀ``:

    dx_t = g_t W0 + s · vec(W1ᵀ G_t W2),   ∂W1 = s Σ_t G_t Z_tᵀ,   ∂W2 = s Σ_t (W1ᵀ G_t)ᵀ X_t

Two exact paths, chosen per call from shapes and autograd flags by counted multiply-adds (``path``,
:func:`lokr_costs`), each in the order with fewer multiply-adds (:func:`inner_first`: ``W2`` first as ONE
GEMM over the [N c, d] rows of ``x`` and ``W1`` as one batched GEMM over the tokens, or the reverse):
the activation path (:class:`_KronLinear`) adds the Kronecker term to the base GEMM's output; the weight
path (:class:`_KronWeight`) builds ``W0 + s W1 ⊗ W2`` (one weight-sized pass) and runs only the frozen
layer's own GEMMs on activations for ``y`` and ``dx``, reading the factors' gradients off the activations
as the activation path does (never the [out, in] ``gᵀ x``). It is the cheaper for more than a few dozen
tokens (every training batch); in bf16 its forward sees ``W0 + ΔW`` rounded to bf16, as a merged model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import (
    Adapter,
    AdapterConfig,
    AdapterContext,
    amp_apply,
    autocast_off,
    cheaper_path,
    check_dropouts,
    check_path,
    load_peft_tensors,
    pattern_value,
)
from .loha import kaiming
from .lora import _cast, _mm_to


def factor_pair(size: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = size``: ``(factor, size // factor)`` if ``factor > 0`` divides ``size``,
    else the pair with the smallest ``m + n`` among divisors ``m ≤ factor`` (any for -1; only 1 for
    other values ≤ 0), smaller first. The same pairs as PEFT's ``factorization``."""
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    bound = size if factor == -1 else max(factor, 1)
    best = min((m + size // m, m) for m in range(1, min(bound, size) + 1) if size % m == 0)[1]
    return min(best, size // best), max(best, size // best)


@dataclass(frozen=True)
class KronShapes:
    """``W1`` [a, c], ``W2`` [b, d] and whether each is a low-rank product."""

    a: int
    b: int
    c: int
    d: int
    w1_low_rank: bool
    w2_low_rank: bool


def kron_shapes(out_f: int, in_f: int, rank: int, factor: int, decompose_both: bool) -> KronShapes:
    a, b = factor_pair(out_f, factor)
    c, d = factor_pair(in_f, factor)
    return KronShapes(a, b, c, d, decompose_both and rank < max(a, c) / 2, rank < max(b, d) / 2)


def inner_first(shapes: KronShapes) -> bool:
    """Whether ``W2`` is applied first (``Z_t = X_t W2ᵀ``, then ``W1 Z_t``) rather than ``W1``
    (``U_t = W1 X_t``, then ``U_t W2ᵀ``): the order with fewer multiply-adds per token, ``c b (d + a)``
    against ``a d (c + b)``, inner on a tie."""
    a, b, c, d = shapes.a, shapes.b, shapes.c, shapes.d
    return c * b * (d + a) <= a * d * (c + b)


def lokr_costs(tokens: int, shapes: KronShapes, train: bool, input_grad: bool) -> tuple[int, int]:
    """Multiply-adds of one call (forward, and backward when ``train`` or ``input_grad``), the base product
    ``x W0ᵀ`` included, of the activation path and of the weight path, for N = ``tokens`` rows and the
    order of :func:`inner_first`.

    Per token the order's first product costs F (inner: ``Z_t = X_t W2ᵀ``, ``c d b``) and its second S
    (``W1 Z_t``, ``a c b``); outer first swaps the sides (F = ``a c d``, S = ``a d b``). Activation path:
    ``x W0ᵀ`` and ``N (F + S)`` forward; backward the gradient of the intermediate (``N S``: ``W1ᵀ G_t``),
    the factors' gradients (``N (F + S)``) and, with an input gradient, ``g W0`` and ``N F`` more. Weight
    path: ``W = W0 + s W1 ⊗ W2`` (``out · in``) and ``x Wᵀ`` forward; backward ``W`` again and ``g W`` for
    the input gradient, and the factors' gradients as in the activation path after recomputing the
    intermediate (``N F``). With an input gradient the weight path saves ``N (F + S) - 2 out · in``: it is
    the cheaper one for N > 2 out · in / (F + S) (43 tokens at 2048 x 2048 with the default shapes), i.e.
    for any training batch, and the activation path for a few tokens (generation).
    """
    N, a, b, c, d = tokens, shapes.a, shapes.b, shapes.c, shapes.d
    F, S = (c * d * b, a * c * b) if inner_first(shapes) else (a * c * d, a * d * b)
    base, w = N * a * b * c * d, a * b * c * d
    act, weight = base + N * (F + S), w + base
    if train:
        act += N * (F + 2 * S)
        weight += N * (2 * F + 2 * S)
    if input_grad:
        act += base + N * F + (0 if train else N * S)
        weight += w + base
    return act, weight


def _factor(first: Tensor, second: Tensor | None) -> Tensor:
    """A Kronecker factor from its parameters: ``first`` itself, or the low-rank product ``first second``."""
    return first if second is None else first @ second


def _cast_factors(
    w1a: Tensor, w1b: Tensor | None, w2a: Tensor, w2b: Tensor | None, dtype: torch.dtype, s: float
) -> tuple[Tensor, Tensor]:
    """``(s W1, W2)`` in the activations' ``dtype``; the scaling rides on W1's cast (one kernel)."""
    return _cast(_factor(w1a, w1b), dtype, s), _factor(w2a, w2b).to(dtype)


def _factor_grads(
    grad: Tensor | None, first: Tensor, second: Tensor | None, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """``(∂first, ∂second)`` from the factor's gradient ``grad`` (the chain rule through ``first second``)."""
    if grad is None or second is None:
        return grad if needs[0] else None, None
    return (grad @ second.t() if needs[0] else None), (first.t() @ grad if needs[1] else None)


def _first(x2: Tensor, W1s: Tensor, W2c: Tensor, inner: bool) -> Tensor:
    """The order's intermediate: ``Z = X W2ᵀ`` [N c, b], ONE GEMM over the [N c, d] rows of ``x`` (inner),
    or ``U_t = W1s X_t`` [N a, d], one batched GEMM over the tokens with ``W1s`` broadcast (no copy)."""
    (a, c), d = W1s.shape, W2c.shape[1]
    N = x2.shape[0]
    if inner:
        return torch.mm(x2.reshape(N * c, d), W2c.t())
    return torch.bmm(W1s.expand(N, a, c), x2.reshape(N, c, d)).view(N * a, d)


def _token_sum(P: Tensor, s: float, dtype: torch.dtype) -> Tensor:
    """``s Σ_t P_t`` in ``dtype``: one reduction reading the 16-bit ``P`` and writing ``dtype`` (on CUDA),
    and the scaling on the small result."""
    out = P.sum(0, dtype=dtype)
    return out if s == 1.0 else out.mul_(s)


def _kron_grads(
    g2: Tensor,
    x2: Tensor,
    mid: Tensor,
    W1s: Tensor,
    W2c: Tensor,
    s: float,
    inner: bool,
    needs: tuple[bool, bool, bool],
    dtypes: tuple[torch.dtype, torch.dtype],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, ∂W1, ∂W2)`` of the Kronecker term ``s vec(W1 X_t W2ᵀ)`` for output gradients ``g2`` [N, out]
    (each wanted only where ``needs`` = (input, W1, W2) says so; the factors' gradients in ``dtypes``).

    With ``G_t`` = ``g_t`` viewed [a, b]: ``dx_t = s vec(W1ᵀ G_t W2)``, ``∂W1 = s Σ_t G_t Z_tᵀ``,
    ``∂W2 = s Σ_t (W1ᵀ G_t)ᵀ X_t``. Inner first: ``∂Z_t = W1sᵀ G_t`` (batched) feeds ``dx = ∂Z W2`` and
    ``∂W2 = ∂Zᵀ X`` (GEMMs over the N c rows); ``∂W1`` is one batched GEMM and one sum over the tokens.
    Outer first: ``∂U = G W2`` (one GEMM over the N a rows) feeds ``dx_t = W1sᵀ ∂U_t`` (batched) and
    ``∂W1 = s Σ_t ∂U_t X_tᵀ``; ``∂W2 = Gᵀ U`` (``U`` carries s).
    """
    need_x, need_w1, need_w2 = needs
    (a, c), (b, d) = W1s.shape, W2c.shape
    N = x2.shape[0]
    G = g2.reshape(N, a, b)
    dx = dW1 = dW2 = None
    if inner:
        if need_x or need_w2:
            dZ = torch.bmm(W1s.t().expand(N, c, a), G).view(N * c, b)  # s W1ᵀ G_t
            if need_x:
                dx = torch.mm(dZ, W2c).view(N, c * d)
            if need_w2:
                dW2 = _mm_to(dZ.t(), x2.reshape(N * c, d), dtypes[1])
        if need_w1:  # s Σ_t G_t Z_tᵀ
            dW1 = _token_sum(torch.bmm(G, mid.view(N, c, b).transpose(1, 2)), s, dtypes[0])
    else:
        if need_x or need_w1:
            dU = torch.mm(g2.reshape(N * a, b), W2c).view(N, a, d)  # G_t W2
            if need_x:
                dx = torch.bmm(W1s.t().expand(N, c, a), dU).view(N, c * d)
            if need_w1:  # s Σ_t ∂U_t X_tᵀ
                dW1 = _token_sum(torch.bmm(dU, x2.reshape(N, c, d).transpose(1, 2)), s, dtypes[0])
        if need_w2:
            dW2 = _mm_to(g2.reshape(N * a, b).t(), mid, dtypes[1])  # Σ G_tᵀ U_t, U carries s
    return dx, dW1, dW2


class _KronLinear(torch.autograd.Function):
    """``y = base + s · vec(W1 X_t W2ᵀ)`` per token, ``base = x W0ᵀ`` computed here (``base_out`` None) or
    given: the activation path, one autograd node for the base product, the Kronecker term and the factor
    products ``W = Wa Wb``.

    ``s`` rides on the one-kernel cast of ``W1`` (``W1s = s W1``). Inner first (``inner`` True): ``Z``
    (:func:`_first`), then ``W1s Z_t`` one batched GEMM over the tokens writing the [N, out] output, onto
    which the base GEMM accumulates (``addmm_``, β = 1) or which starts from ``base_out`` (``baddbmm``).
    Outer first: ``U``, then ``y = U W2ᵀ`` over [N a, d] rows (``addmm`` onto ``base_out``). Backward
    :func:`_kron_grads`, with ``g W0`` accumulated into the input gradient. Only ``x`` and ``Z`` (or ``U``)
    are kept; no activation-sized copy or elementwise pass. Call it through :func:`amp_apply`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        base_out: Tensor | None,
        x: Tensor,
        W0: Tensor | None,
        w1a: Tensor,
        w1b: Tensor | None,
        w2a: Tensor,
        w2b: Tensor | None,
        s: float,
        inner: bool,
    ) -> Tensor:
        W1s, W2c = _cast_factors(w1a, w1b, w2a, w2b, x.dtype, s)
        (a, c), (b, d) = W1s.shape, W2c.shape
        x2 = x.reshape(-1, c * d)
        N = x2.shape[0]
        W: Tensor | None = None
        if base_out is None:
            if W0 is None:
                raise TypeError("_KronLinear needs W0 when base_out is None")
            W = W0.to(x.dtype)
        mid = _first(x2, W1s, W2c, inner)
        if inner and base_out is None:
            y = torch.bmm(W1s.expand(N, a, c), mid.view(N, c, b))
        elif inner:
            y = torch.baddbmm(base_out.reshape(N, a, b), W1s.expand(N, a, c), mid.view(N, c, b))  # type: ignore[union-attr]
        elif base_out is None:
            y = torch.mm(mid, W2c.t())
        else:
            y = torch.addmm(base_out.reshape(N * a, b), mid, W2c.t())
        y = y.view(N, a * b)
        if W is not None:
            y.addmm_(x2, W.t())
        ctx.save_for_backward(x2, mid, W1s, W2c, W, w1a, w1b, w2a, w2b)
        ctx.s, ctx.inner, ctx.x_shape = s, inner, x.shape
        ctx.dtypes = (W0.dtype if W0 is not None else x.dtype, w1a.dtype, w2a.dtype)
        return y.view(*x.shape[:-1], a * b)

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, mid, W1s, W2c, W, w1a, w1b, w2a, w2b = ctx.saved_tensors
        need_base, need_x, need_W = ctx.needs_input_grad[:3]
        need_w1, need_w2 = ctx.needs_input_grad[3:5], ctx.needs_input_grad[5:7]
        g2 = g.reshape(x2.shape[0], -1)
        needs = (need_x, any(need_w1), any(need_w2))
        dx, dW1, dW2 = _kron_grads(g2, x2, mid, W1s, W2c, ctx.s, ctx.inner, needs, ctx.dtypes[1:])
        dW = None
        if need_x and W is not None:
            dx = torch.mm(g2, W) if dx is None else dx.addmm_(g2, W)
        if need_W and W is not None:
            dW = _mm_to(g2.t(), x2, ctx.dtypes[0])
        d1a, d1b = _factor_grads(dW1, w1a, w1b, need_w1)
        d2a, d2b = _factor_grads(dW2, w2a, w2b, need_w2)
        dx = None if dx is None else dx.view(ctx.x_shape)
        return g if need_base else None, dx, dW, d1a, d1b, d2a, d2b, None, None


def _merged(W0: Tensor, W1s: Tensor, W2: Tensor) -> Tensor:
    """``W0 + W1s ⊗ W2`` [out, in] in ``W1s``'s dtype: one broadcast ``addcmul`` on the [a, b, c, d] view,
    written straight in that dtype (a float32 ``W0`` under autocast is not cast first)."""
    (a, c), (b, d) = W1s.shape, W2.shape
    out = torch.empty((a, b, c, d), dtype=W1s.dtype, device=W1s.device)
    torch.addcmul(W0.reshape(a, b, c, d), W1s.view(a, 1, c, 1), W2.view(1, b, 1, d), out=out)
    return out.view(a * b, c * d)


class _KronWeight(torch.autograd.Function):
    """``x (W0 + s W1 ⊗ W2)ᵀ`` with the weight built once per call: the weight path (replaces ``x W0ᵀ``).

    Forward: ``W`` by one broadcast ``addcmul`` (weight-sized), then the one GEMM the frozen layer runs
    anyway; it keeps only ``x`` and the two cast factors. Backward: ``W`` again and ``dx = g W`` (the frozen
    layer's own input-gradient GEMM), then the factors' gradients from the Kronecker structure on the
    activations (:func:`_kron_grads`, after recomputing ``Z`` or ``U``): never the [out, in] ``gᵀ x``,
    a full-size GEMM. In bf16 the forward sees ``W0 + ΔW`` rounded to bf16, as a merged bf16 model does
    (an entry of ΔW below half a bf16 step of its ``W0`` entry does not reach the output until it grows);
    the gradients of the factors are those of the activation path.
    """

    @staticmethod
    def forward(
        ctx: Any,
        base_out: None,
        x: Tensor,
        W0: Tensor,
        w1a: Tensor,
        w1b: Tensor | None,
        w2a: Tensor,
        w2b: Tensor | None,
        s: float,
        inner: bool,
    ) -> Tensor:
        W1s, W2c = _cast_factors(w1a, w1b, w2a, w2b, x.dtype, s)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, W0, W1s, W2c, w1a, w1b, w2a, w2b)
        ctx.s, ctx.inner, ctx.x_shape = s, inner, x.shape
        return torch.mm(x2, _merged(W0, W1s, W2c).t()).view(*x.shape[:-1], W0.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, W0, W1s, W2c, w1a, w1b, w2a, w2b = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        need_w1, need_w2 = ctx.needs_input_grad[3:5], ctx.needs_input_grad[5:7]
        g2 = g.reshape(x2.shape[0], -1)
        dx = dW1 = dW2 = None
        if need_x:
            dx = torch.mm(g2, _merged(W0, W1s, W2c)).view(ctx.x_shape)
        if any(need_w1) or any(need_w2):
            mid = _first(x2, W1s, W2c, ctx.inner)
            needs = (False, any(need_w1), any(need_w2))
            _, dW1, dW2 = _kron_grads(g2, x2, mid, W1s, W2c, ctx.s, ctx.inner, needs, (w1a.dtype, w2a.dtype))
        d1a, d1b = _factor_grads(dW1, w1a, w1b, need_w1)
        d2a, d2b = _factor_grads(dW2, w2a, w2b, need_w2)
        return None, dx, None, d1a, d1b, d2a, d2b, None, None


class LoKrAdapter(Adapter):
    """W1: ``lokr_w1`` [a, c] or ``lokr_w1_a`` [a, r] @ ``lokr_w1_b`` [r, c]; W2 likewise (``lokr_w2``...)."""

    # alone on a layer, LoKr computes x W0ᵀ itself (base_out None), in the same node as its own term
    needs_base_out: ClassVar[bool] = False

    def __init__(
        self, shapes: KronShapes, tensors: dict[str, Tensor], scaling: float, path: str = "auto"
    ) -> None:
        super().__init__()
        check_path(path, "LoKr")
        self.shapes = shapes
        self.scaling = scaling
        self.path = path
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t))
        self.peft_names = {n: n for n in tensors}

    def factors(self, which: int) -> tuple[Tensor, Tensor | None]:
        """``W{which}``'s parameters: ``(full, None)`` or the low-rank pair ``(a, b)``."""
        if self.shapes.w1_low_rank if which == 1 else self.shapes.w2_low_rank:
            return self.get_parameter(f"lokr_w{which}_a"), self.get_parameter(f"lokr_w{which}_b")
        return self.get_parameter(f"lokr_w{which}"), None

    def w1(self) -> Tensor:
        return _factor(*self.factors(1))

    def w2(self) -> Tensor:
        return _factor(*self.factors(2))

    def delta(self, W0: Tensor) -> Tensor:
        return torch.kron(self.w1(), self.w2()) * self.scaling

    def choose_path(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> str:
        """This call's path (:func:`~._core.cheaper_path` over :func:`lokr_costs`)."""
        trains = any(p.requires_grad for p in self.parameters())
        return cheaper_path(
            self.path, x, W0, base_out, trains, lambda n, t, g: lokr_costs(n, self.shapes, t, g)
        )

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        (w1a, w1b), (w2a, w2b) = self.factors(1), self.factors(2)
        args = (w1a, w1b, w2a, w2b, self.scaling, inner_first(self.shapes))
        if self.choose_path(x, W0, base_out) == "weight":
            return amp_apply(_KronWeight, None, x, W0, *args)
        return amp_apply(_KronLinear, base_out, x, W0, *args)

    def peft_state(self) -> dict[str, Tensor]:
        return {k: self.get_parameter(a).detach() for k, a in self.peft_names.items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, self.peft_names)


@register_config("lokr", kind="adapter")
class LoKr(AdapterConfig):
    """``rank`` r of the low-rank factors; scaling ``alpha / r``; ``decompose_factor`` f and
    ``decompose_both`` choose the Kronecker shapes as PEFT does (PEFT defaults: r=8, alpha=8, f=-1).
    ``path``: "auto" (per call, the cheapest exact computation by multiply-adds, :func:`lokr_costs`),
    "activation" (``vec(W1 X W2ᵀ)`` on the activations) or "weight" (``x (W0 + ΔW)ᵀ``, ΔW built per call)."""

    peft_type: ClassVar[str | None] = "LOKR"
    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(rank=2, alpha=4.0, decompose_both=True)

    rank: int = 8
    alpha: float = 8.0
    decompose_factor: int = -1
    decompose_both: bool = False
    seed: int = 0
    path: str = "auto"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise WeightsmithError(f"LoKr rank must be at least 1, got {self.rank}")
        check_path(self.path, "LoKr")

    def create(self, W0: Tensor, ctx: AdapterContext) -> LoKrAdapter:
        out_f, in_f = W0.shape
        s = kron_shapes(out_f, in_f, self.rank, self.decompose_factor, self.decompose_both)
        g, r = ctx.generator(), self.rank
        t: dict[str, Tensor] = {}
        if s.w1_low_rank:
            t["lokr_w1_a"], t["lokr_w1_b"] = torch.zeros(s.a, r), kaiming(r, s.c, g)
        else:
            t["lokr_w1"] = torch.zeros(s.a, s.c)
        if s.w2_low_rank:
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(s.b, r, g), kaiming(r, s.d, g)
        else:
            t["lokr_w2"] = kaiming(s.b, s.d, g)
        return LoKrAdapter(s, {k: v.to(W0.device) for k, v in t.items()}, self.alpha / r, self.path)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> LoKr:
        check_dropouts(peft_config, ("rank_dropout", "module_dropout"), "LoKr")
        # rank_dropout_scale only matters with rank_dropout during training; use_effective_conv2d
        # only for convolutions, which weightsmith does not adapt.
        return cls(
            rank=int(pattern_value(peft_config, "rank_pattern", module, peft_config.get("r", 8))),
            alpha=float(pattern_value(peft_config, "alpha_pattern", module, peft_config.get("alpha", 8))),
            decompose_factor=int(peft_config.get("decompose_factor", -1)),
            decompose_both=bool(peft_config.get("decompose_both", False)),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "LOKR",
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "rank_dropout_scale": False,
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "use_effective_conv2d": False,
            "init_weights": True,
        }
