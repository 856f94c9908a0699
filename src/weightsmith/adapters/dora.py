"""DoRA: weight-decomposed low-rank adaptation, ``W' = m ⊙ (W0 + s·BA) / ||W0 + s·BA||``.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024, arXiv:2402.09353.
The norm is taken per output row (over the input dimension, as PEFT does) and, as in the paper's
section 4.3, treated as a constant in the backward pass.

Speed: the row norms are computed without building ``W0 + s·BA``:
``||W0_i + s(BA)_i||² = ||W0_i||² + 2s <B_i, (W0 Aᵀ)_i> + s² B_i (A Aᵀ) B_iᵀ`` with ``||W0_i||²``
cached (the frozen base changes only when something is merged into it), so a step costs one thin
``W0 Aᵀ`` product instead of a dense ``out × in`` update and its norm. Alone on a layer, DoRA computes
``x W0ᵀ`` inside LoRA's autograd node (:func:`dora_forward`); with siblings reading the same input
(q/k/v, gate/up) it joins their grouped node (:meth:`DoRAAdapter.group_terms`,
:mod:`weightsmith.adapters.lora_group`) and applies its row scale to its own output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, autocast_off, check_rank, copy_peft
from .lora import _mm_to, lora_forward, lora_init, lora_scaling
from .lora_group import GroupTerms

FUSED = True  # set False to run the row scale's backward as torch ops on CUDA too


class _RowScale(torch.autograd.Function):
    """``y = z ⊙ c``, ``c = m / n`` per output feature (last axis), with the norm ``n`` a constant.

    ``c`` is divided straight into ``z``'s dtype (one kernel); backward gives ``dz = g ⊙ c`` and
    ``dm = Σ_t g_t ⊙ z_t / n`` summed in float32, in ``m``'s dtype: on CUDA with Triton in one pass over
    ``g`` and ``z`` (:mod:`._dora_triton`), else three torch passes.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, m: Tensor, n: Tensor) -> Tensor:
        c = torch.div(m, n, out=torch.empty(n.shape, dtype=z.dtype, device=n.device))
        ctx.save_for_backward(z, c, n)
        ctx.m_dtype = m.dtype
        return z * c

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, c, n = ctx.saved_tensors
        dm = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and FUSED and g.is_cuda:
            from . import _dora_triton  # imports Triton: only on a GPU

            if _dora_triton.usable(g, z, c):
                dz, gz = _dora_triton.row_scale_backward(g, z, c)
                return dz, gz.div_(n).to(ctx.m_dtype), None
        if ctx.needs_input_grad[1]:
            dm = (g * z).reshape(-1, z.shape[-1]).sum(0, dtype=n.dtype).div_(n).to(ctx.m_dtype)
        return g * c if ctx.needs_input_grad[0] else None, dm, None


def _stack(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


@torch.no_grad()
def row_norms(adapters: list[DoRAAdapter], weights: list[Tensor]) -> list[Tensor]:
    """``||W0_i + s_i B_i A_i||`` per output row for each adapter ``i`` on its weight (float32, no gradient).

    With ``P_i = W0_i A_iᵀ``: ``||W0 + sBA||²`` per row is ``||W0||² + B·(2s P + s² B (A Aᵀ))`` (row-wise
    dot), ``||W0||²`` cached per weight. For several adapters of one rank and dtype (siblings) the
    small products are batched: one cast of the stacked A, one Gram matrix ``[A_1; …][A_1; …]ᵀ`` whose
    diagonal blocks are the ``A_i A_iᵀ``, the ``addmm`` of each into one buffer, then one row-dot, one
    clamp and one square root for all rows; the per-adapter work left is ``P_i`` and its ``addmm``.
    """
    W0 = weights[0]
    ranks = {a.A.shape[0] for a in adapters}
    if len(adapters) > 1 and (
        len(ranks) > 1
        or len({(a.A.dtype, a.B.dtype, W.dtype) for a, W in zip(adapters, weights, strict=True)}) > 1
    ):
        return [row_norms([a], [W])[0] for a, W in zip(adapters, weights, strict=True)]
    r = ranks.pop()
    A = _stack([a.A for a in adapters]).float()
    A_w = A.to(W0.dtype)
    gram = A @ A.t()
    rows = [W.shape[0] for W in weights]
    inner = torch.empty(sum(rows), r, dtype=torch.float32, device=W0.device)
    start = 0
    for i, (a, W) in enumerate(zip(adapters, weights, strict=True)):
        P = _mm_to(W, A_w[i * r : (i + 1) * r].t(), torch.float32)  # W0 Aᵀ, [out, r]
        s, blk = a.scaling, slice(i * r, (i + 1) * r)
        torch.addmm(
            P, a.B.float(), gram[blk, blk], beta=2 * s, alpha=s * s, out=inner[start : start + rows[i]]
        )
        start += rows[i]
    B = _stack([a.B for a in adapters]).float()
    base = _stack([a._base_row_sq(W) for a, W in zip(adapters, weights, strict=True)])
    sq = torch.baddbmm(base.view(-1, 1, 1), B.unsqueeze(1), inner.unsqueeze(2))
    n = sq.view(-1).clamp_min_(0).sqrt_()
    return [n] if len(rows) == 1 else list(n.split(rows))


def dora_forward(
    base_out: Tensor | None,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    m: Tensor,
    n: Tensor,
    s: float,
    W0: Tensor | None = None,
) -> Tensor:
    """``(m / n) ⊙ (base_out + s · (x Aᵀ) Bᵀ)`` with the row norm ``n`` constant (the paper's section 4.3).

    The LoRA part is LoRA's own node (:func:`.lora.lora_forward`): with ``base_out`` None it computes
    ``x W0ᵀ`` itself, so the input gradient ``gz W0 + (gz sB) A`` (``gz = g ⊙ m / n``) is one GEMM
    accumulating into the small one, ``s`` rides on B's one cast and on CUDA ``dA``, ``dB`` come out
    of the GEMMs in float32; the scaling by ``m / n`` is one more small node (:class:`_RowScale`).
    """
    return _RowScale.apply(lora_forward(base_out, x, A, B, s, W0), m, n)  # type: ignore[no-any-return]


class DoRAAdapter(Adapter):
    # alone on a layer, DoRA computes x W0ᵀ itself (base_out None), fused with its own products
    needs_base_out: ClassVar[bool] = False

    def __init__(self, A: Tensor, B: Tensor, m: Tensor, scaling: float) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.m = nn.Parameter(m)
        self.scaling = scaling
        self._w0_sq: tuple[tuple[int, int, torch.dtype], Tensor] | None = None
        self.hold(merge_norm=torch.zeros(0))

    def _base_row_sq(self, W0: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # the cache key (data pointer, version) would break the compiled graph at every layer, and each
            # break recompiles per weight shape until dynamo's recompile limit; traced, it is one fused
            # reduction over W0
            return W0.float().square().sum(1)
        key = (W0.data_ptr(), W0._version, W0.dtype)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, W0.float().square().sum(1))
        return self._w0_sq[1]

    def row_norm(self, W0: Tensor) -> Tensor:
        """``||W0 + s·BA||`` per output row, without materialising the sum (no gradient): see
        :func:`row_norms`."""
        return row_norms([self], [W0])[0]

    def delta(self, W0: Tensor) -> Tensor:
        V = W0 + (self.B @ self.A) * self.scaling
        n = V.detach().norm(dim=1, keepdim=True)
        return (self.m.unsqueeze(1) / n) * V - W0

    def _norm(self, W0: Tensor) -> Tensor:
        with torch.autocast(W0.device.type, enabled=False):  # the norm in float32 even under autocast
            return self.row_norm(W0)

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        return dora_forward(base_out, x, self.A, self.B, self.m, self._norm(W0), self.scaling, W0)

    def group_terms(self, x: Tensor, W0: Tensor) -> GroupTerms:
        """LoRA's terms and the row scale, for sibling layers run as one node (:mod:`.lora_group`)."""
        return self._terms(self._norm(W0))

    def _terms(self, n: Tensor) -> GroupTerms:
        m = self.m
        return GroupTerms(self.A, self.B, self.scaling, lambda z: _RowScale.apply(z, m, n))

    @staticmethod
    def group_terms_batch(x: Tensor, items: list[tuple[DoRAAdapter, Tensor]]) -> list[GroupTerms]:
        """:meth:`group_terms` for several siblings, their row norms in one batch (:func:`row_norms`)."""
        W = items[0][1]
        with torch.autocast(W.device.type, enabled=False):
            norms = row_norms([a for a, _ in items], [W for _, W in items])
        return [a._terms(n) for (a, _), n in zip(items, norms, strict=True)]

    def merge(self, W0: Tensor) -> Tensor:
        V = W0 + (self.B @ self.A) * self.scaling
        n = V.norm(dim=1)
        self.merge_norm = n.detach().clone()
        return (self.m / n).unsqueeze(1) * V

    def _peft_views(self) -> dict[str, Tensor]:
        return {
            "lora_A.weight": self.A.data,
            "lora_B.weight": self.B.data,
            "lora_magnitude_vector": self.m.data,
        }

    def peft_state(self) -> dict[str, Tensor] | None:
        return {k: v.detach().float().contiguous() for k, v in self._peft_views().items()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        copy_peft(state, self._peft_views())

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if self.merge_norm.numel() != W_merged.shape[0]:
            raise RuntimeError("DoRA unmerge without a preceding merge")
        V = W_merged * (self.merge_norm / self.m).unsqueeze(1)
        return V - (self.B @ self.A) * self.scaling


@register_config("dora", kind="adapter")
class DoRA(AdapterConfig):
    """LoRA direction (rank, alpha, rslora as in LoRA) plus a trainable magnitude per output row."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=4, alpha=8.0)
    peft_type: ClassVar[str | None] = "LORA"

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    seed: int = 0

    @classmethod
    def peft_claims(cls, peft_config: Mapping[str, Any]) -> bool:
        return bool(peft_config.get("use_dora"))

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> DoRA:
        return cls(
            rank=int(peft_config["r"]),
            alpha=float(peft_config.get("lora_alpha", 8)),
            rslora=bool(peft_config.get("use_rslora")),
        )

    def to_peft(self) -> dict[str, Any]:
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "use_dora": True, "lora_dropout": 0.0, "init_lora_weights": True}  # fmt: skip

    def create(self, W0: Tensor, ctx: AdapterContext) -> DoRAAdapter:
        check_rank(self.rank, W0, ctx)
        A, B = lora_init(W0, self.rank, ctx)
        return DoRAAdapter(A, B, W0.norm(dim=1), lora_scaling(self.alpha, self.rank, self.rslora))
