"""OFT: orthogonal fine-tuning, a block-diagonal rotation of the layer's input space.

Qiu, Liu, Feng, Xue, Feng, Liu, Zhang, Weller & Schölkopf, "Controlling Text-to-Image Diffusion by
Orthogonal Finetuning", NeurIPS 2023, arXiv:2306.07280 (eqs. 3-5):

    W' = W0 Rᵀ,   R = diag(R_1, ..., R_k),   R_j = Cayley(Q_j),   Q_j = -Q_jᵀ  [b, b],   k · b = in

so the layer computes ``W0 (R x)``: every input is rotated, which keeps the angles between the
neurons of ``W0`` (the "hyperspherical energy"). Each ``Q_j`` is stored as its ``b(b-1)/2`` upper
entries (row-major, PEFT's ``oft_R.weight`` [k, b(b-1)/2]); ``Q = 0`` gives ``R = I`` at init.
Two Cayley maps, as in PEFT 0.21:

    exact:    R = (I - Q)(I + Q)⁻¹
    Neumann:  R = I + 2 Σ_{i=1..K} Qⁱ + Q^{K+1}   (K = max(2, n - 2) for n ≥ 3 terms; I + 2Q for n = 2)

the second a truncated series of ``(I + Q)(I - Q)⁻¹`` (Qiu et al., "Orthogonal Finetuning Made
Scalable", 2025, arXiv:2506.19847), cheap and nearly orthogonal for small ``Q``. ``block_share``
uses one ``Q`` for all blocks. ``coft`` (constrained OFT, the paper's eq. 6) keeps each block's
``‖Q_j‖_F ≤ ε / sqrt(k)`` by projecting the stored entries before every use, as PEFT does.
Merging multiplies ``W0`` by ``Rᵀ``; unmerging solves with it per block (exact for both maps).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
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
    check_dropouts,
    load_peft_tensors,
)


@functools.lru_cache(maxsize=16)
def _skew_index(b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For ``Q.flatten() = vec[idx] * sign``: entry (i, j) of a [b, b] skew matrix reads ``vec[p]`` with
    sign +1 above the diagonal (p its row-major upper index), -1 below, 0 on the diagonal; and the
    flat positions of the upper entries (the backward reads ``dQ - dQᵀ`` there)."""
    rows, cols = torch.triu_indices(b, b, 1)
    pos = torch.zeros(b, b, dtype=torch.long)
    pos[rows, cols] = pos[cols, rows] = torch.arange(rows.numel())
    sign = torch.zeros(b, b)
    sign[rows, cols], sign[cols, rows] = 1.0, -1.0
    return pos.flatten().to(device), sign.flatten().to(device), (rows * b + cols).to(device)


class _Skew(torch.autograd.Function):
    """``Q = M - Mᵀ`` with M's strict upper triangle ``vec``: one gather and one signed scaling forward,
    ``dvec = (dQ - dQᵀ)`` at the upper entries backward (two kernels each way, no host work)."""

    @staticmethod
    def forward(ctx: Any, vec: Tensor, b: int) -> Tensor:
        idx, sign, upper = _skew_index(b, vec.device)
        ctx.b, ctx.upper = b, upper
        return vec.index_select(1, idx).mul_(sign.to(vec.dtype)).view(vec.shape[0], b, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return (g - g.transpose(1, 2)).reshape(g.shape[0], -1).index_select(1, ctx.upper), None


def skew(vec: Tensor, b: int) -> Tensor:
    """Skew-symmetric [k, b, b] matrices with strict upper triangles (row-major) ``vec`` [k, b(b-1)/2]."""
    if torch.compiler.is_compiling():  # traced: the scatter form, with no host-side index cache
        rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
        M = vec.new_zeros(vec.shape[0], b, b)
        M[:, rows, cols] = vec
        return M - M.transpose(1, 2)
    return _Skew.apply(vec, b)  # type: ignore[no-any-return]


def cayley(Q: Tensor) -> Tensor:
    """``(I - Q)(I + Q)⁻¹`` for a batch of skew-symmetric [k, b, b] (orthogonal), computed in float32+."""
    dt = Q.dtype if Q.dtype in (torch.float32, torch.float64) else torch.float32
    Q = Q.to(dt)
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=dt).expand_as(Q)
    # solve_ex: I + Q is invertible for any skew-symmetric Q; `solve` checks on the host (breaks CUDA graphs)
    return torch.linalg.solve_ex(eye + Q, eye - Q, left=False).result


def cayley_neumann(Q: Tensor, terms: int) -> Tensor:
    """PEFT's truncated series ``I + 2 Σ_{i=1..K} Qⁱ + Q^{K+1}`` (K = max(2, terms - 2)); ``I + 2Q`` for
    two terms, ``I`` for one.

    Evaluated by Horner's rule, ``R = I + Q(2I + Q(2I + … Q(2I + Q)))`` (K nested factors): one
    addition then K fused ``baddbmm`` (``2I + Q P`` in one kernel) instead of K + 1 products, scalings and
    additions."""
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype).expand_as(Q)
    if terms <= 1:
        return eye.clone()
    if terms == 2:
        return torch.add(eye, Q, alpha=2)
    P = torch.add(Q, eye, alpha=2)  # 2I + Q
    for _ in range(max(2, terms - 2) - 1):
        P = torch.baddbmm(eye, Q, P, beta=2)  # 2I + Q P
    return torch.baddbmm(eye, Q, P)


class _RotatedLinear(torch.autograd.Function):
    """``y = x' W0ᵀ`` with ``x'`` each token's blocks ``x_j R_j`` (R [k, b, b], PEFT's row-vector form).

    The block products are one ``bmm`` over the k blocks on the [N, k, b] view of ``x``, written into a
    [N, in] buffer through its block-major view (no copies of ``x`` or ``x'`` on CUDA, where the GEMM takes
    the strides); ``R`` is cast to the activations' dtype once. Backward: ``g' = g W0`` (one GEMM),
    ``dx_j = g'_j R_jᵀ`` (one ``bmm`` into ``dx``'s block view), ``dR_j = x_jᵀ g'_j`` (one ``bmm``).
    ``x'`` is not saved. Call it through :func:`amp_apply`.
    """

    @staticmethod
    def forward(ctx: Any, base_out: None, x: Tensor, W0: Tensor, R: Tensor) -> Tensor:
        dt, k, b = x.dtype, R.shape[0], R.shape[-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        R_c, W = R.to(dt), W0.to(dt)
        x_rot = torch.empty_like(x2)
        torch.bmm(x2.view(-1, k, b).transpose(0, 1), R_c, out=x_rot.view(-1, k, b).transpose(0, 1))
        ctx.save_for_backward(x2, R_c, W)
        ctx.x_shape, ctx.dtypes = x.shape, (W0.dtype, R.dtype)
        return torch.mm(x_rot, W.t()).view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, R_c, W = ctx.saved_tensors
        k, b = R_c.shape[0], R_c.shape[-1]
        need_x, need_W, need_R = ctx.needs_input_grad[1:4]
        g2 = g.reshape(-1, g.shape[-1])
        gr = torch.mm(g2, W)  # dL/dx' [N, in]
        grb = gr.view(-1, k, b).transpose(0, 1)  # [k, N, b]
        dx = dW = dR = None
        if need_x:
            dx = torch.empty_like(gr)
            torch.bmm(grb, R_c.transpose(1, 2), out=dx.view(-1, k, b).transpose(0, 1))
            dx = dx.view(ctx.x_shape)
        if need_W:  # a trainable base (not the adapter's case): dW = gᵀ x'
            x_rot = torch.bmm(x2.view(-1, k, b).transpose(0, 1), R_c).transpose(0, 1).reshape(x2.shape)
            dW = torch.mm(g2.t(), x_rot).to(ctx.dtypes[0])
        if need_R:
            dR = torch.bmm(x2.view(-1, k, b).permute(1, 2, 0), grb).to(ctx.dtypes[1])
        return None, dx, dW, dR


def adjust_divisor(size: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``size`` nearest ``value`` (the lower one on ties)."""
    if value >= size:
        return size
    higher = value
    while higher <= size and size % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and size % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_blocks(in_f: int, rank: int, block_size: int) -> tuple[int, int]:
    """``(k blocks, block size b)`` from one of them, each moved to the nearest divisor as PEFT does."""
    if (rank == 0) == (block_size == 0):
        raise WeightsmithError(f"OFT: set exactly one of rank ({rank}) and block_size ({block_size})")
    if rank == 0:
        b = block_size if in_f % block_size == 0 and block_size <= in_f else adjust_divisor(in_f, block_size)
        return in_f // b, b
    k = rank if in_f % rank == 0 and rank <= in_f else adjust_divisor(in_f, rank)
    return k, in_f // k


class OFTAdapter(Adapter):
    """Trainable ``oft_R`` [k or 1, b(b-1)/2]; ``R`` is block-diagonal with k blocks of size b."""

    needs_base_out: ClassVar[bool] = False  # rotates x, then applies W0

    def __init__(
        self,
        params: Tensor,
        blocks: int,
        block_size: int,
        neumann_terms: int,
        coft_eps: float | None,
    ) -> None:
        super().__init__()
        self.oft_R = nn.Parameter(params)
        self.blocks = blocks
        self.block_size = block_size
        self.neumann_terms = neumann_terms  # 0: the exact Cayley map
        self.coft_eps = coft_eps

    @torch.no_grad()
    def _project(self) -> None:
        """COFT: scale each block's Q into the Frobenius ball of radius ε / sqrt(rows of oft_R)."""
        assert self.coft_eps is not None
        radius = self.coft_eps / math.sqrt(self.oft_R.shape[0])
        norm = self.oft_R.float().norm(dim=1, keepdim=True) * math.sqrt(2.0)  # ‖Q‖_F = √2 ‖upper‖
        factor = torch.where(norm <= radius, torch.ones_like(norm), radius / norm)
        self.oft_R.mul_(factor.to(self.oft_R.dtype))

    def rotations(self) -> Tensor:
        """The k diagonal blocks R_j [k, b, b] (float32 or wider)."""
        if self.coft_eps is not None:
            self._project()
        v = self.oft_R if self.oft_R.dtype in (torch.float32, torch.float64) else self.oft_R.float()
        with torch.autocast(v.device.type, enabled=False):  # small products: float32 even under autocast
            Q = skew(v, self.block_size)
            R = cayley(Q) if self.neumann_terms == 0 else cayley_neumann(Q, self.neumann_terms)
        return R.expand(self.blocks, -1, -1) if R.shape[0] != self.blocks else R

    def _rotate_rows(self, M: Tensor, R: Tensor) -> Tensor:
        """``M Rᵀ`` for rows M [..., in]: block j of each row times ``R_jᵀ``."""
        Mb = M.reshape(*M.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...kc,kdc->...kd", Mb, R.to(M.dtype)).reshape(M.shape)

    def delta(self, W0: Tensor) -> Tensor:
        return self.merge(W0) - W0

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        # x' = R x per token (PEFT's x_blocks @ R_j on row vectors); then the frozen layer, in one node
        return amp_apply(_RotatedLinear, None, x, W0, self.rotations())

    def merge(self, W0: Tensor) -> Tensor:
        return self._rotate_rows(W0, self.rotations())

    def unmerge(self, W_merged: Tensor) -> Tensor:
        R = self.rotations().to(W_merged.dtype)  # W' = W0 Rᵀ per block: solve X R_jᵀ = W'_j
        Wb = W_merged.reshape(W_merged.shape[0], self.blocks, self.block_size).transpose(0, 1)
        X = torch.linalg.solve(R.transpose(1, 2), Wb, left=False)
        return X.transpose(0, 1).reshape(W_merged.shape)

    def peft_state(self) -> dict[str, Tensor]:
        return {"oft_R.weight": self.oft_R.detach()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, {"oft_R.weight": "oft_R"})


@register_config("oft", kind="adapter")
class OFT(AdapterConfig):
    """``block_size`` b (PEFT's ``oft_block_size``, default 32) or ``rank`` k (number of blocks): set one,
    the other 0. ``cayley_neumann`` with ``neumann_terms`` (else the exact Cayley map), ``block_share``,
    ``coft`` with ``eps``: as PEFT 0.21 (defaults included)."""

    peft_type: ClassVar[str | None] = "OFT"
    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(block_size=8)

    block_size: int = 32
    rank: int = 0
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5

    def __post_init__(self) -> None:
        if (self.rank == 0) == (self.block_size == 0) or self.rank < 0 or self.block_size < 0:
            raise WeightsmithError(
                f"OFT: set exactly one of rank ({self.rank}) and block_size ({self.block_size}) to a "
                "positive number, the other to 0"
            )
        if self.cayley_neumann and self.neumann_terms < 1:
            raise WeightsmithError(f"OFT neumann_terms must be at least 1, got {self.neumann_terms}")

    def create(self, W0: Tensor, ctx: AdapterContext) -> OFTAdapter:
        in_f = W0.shape[1]
        k, b = oft_blocks(in_f, self.rank, self.block_size)
        if b < 2:
            raise ctx.error(f"OFT block size {b} leaves no rotation (needs at least 2)", tuple(W0.shape))
        params = torch.zeros(1 if self.block_share else k, b * (b - 1) // 2, device=W0.device)
        terms = self.neumann_terms if self.cayley_neumann else 0
        return OFTAdapter(params, k, b, terms, self.eps if self.coft else None)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> OFT:
        check_dropouts(peft_config, ("module_dropout",), "OFT")
        bias = peft_config.get("bias", "none")
        if bias not in (None, "none"):
            raise WeightsmithError(f"{module}: PEFT OFT option bias={bias!r} is not supported (only 'none')")
        if "oft_block_size" not in peft_config:
            raise WeightsmithError(
                f"{module}: PEFT OFT config without 'oft_block_size' is the pre-0.14 format, not supported"
            )
        return cls(
            block_size=int(peft_config.get("oft_block_size", 0)),
            rank=int(peft_config.get("r", 0)),
            block_share=bool(peft_config.get("block_share", False)),
            cayley_neumann=bool(peft_config.get("use_cayley_neumann", True)),
            neumann_terms=int(peft_config.get("num_cayley_neumann_terms", 5)),
            coft=bool(peft_config.get("coft", False)),
            eps=float(peft_config.get("eps", 6e-5)),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "OFT",
            "r": self.rank,
            "oft_block_size": self.block_size,
            "module_dropout": 0.0,
            "block_share": self.block_share,
            "use_cayley_neumann": self.cayley_neumann,
            "num_cayley_neumann_terms": self.neumann_terms,
            "coft": self.coft,
            "eps": self.eps,
            "init_weights": True,
        }
