"""BOFT: orthogonal fine-tuning with a butterfly-factorised rotation and a per-output scale.

Liu, Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng, Wen, Black, Weller & Schölkopf,
"Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024, arXiv:2311.06243
(eqs. 6-8), as in PEFT 0.21:

    W' = diag(s) W0 Rᵀ,   R = B_m ⋯ B_2 B_1,   B_i = P_i diag(R_i1, ..., R_ik) P_iᵀ,   R_ij = Cayley(Q_ij)

with ``m`` butterfly factors (``n_butterfly_factor``), ``k`` blocks of size ``b`` per factor (k·b = in),
``Cayley(Q) = (I - Q)(I + Q)⁻¹`` of ``Q = (S - Sᵀ)/2`` for the stored ``boft_R`` [m, k, b, b], and
the trainable output scale ``boft_s`` [out, 1] (1 at init; it scales ``W0``, not the bias). ``P_1 = I``;
``P_i`` (i ≥ 2) splits the input into ``k / 2^(i-1)`` equal chunks and, inside each, lists the
half-blocks (size b/2) at even positions first, then those at odd positions, so that ``B_i`` mixes
coordinates ``2^(i-1)`` half-blocks apart: after m factors each output coordinate depends on
``b · 2^(m-1)`` inputs, the butterfly of the Cooley-Tukey FFT. ``m = 1`` is block-diagonal OFT.

PEFT note: without its CUDA extension PEFT silently trains with ``m = 1`` whatever the config says,
so such a file can say ``boft_n_butterfly_factor: 2`` next to a ``boft_R`` of shape [1, k, b, b];
reading it stops at that shape mismatch (set the factor to 1 in its adapter_config.json to read it).

Two exact paths, chosen per call from the shapes (``path="auto"``, :func:`boft_costs`): rotate the N
activations through the m sparse factors (``x R``: m N·in·G multiply-adds, G >= b the width of the
dense block groups, again for each gradient), then the frozen product; or rotate the rows of ``W0``
(``W0 Rᵀ``: m out·in·G, independent of N) and
run one product with ``W' = diag(s) W0 Rᵀ``, whose backward adds the weight gradient ``gᵀ x``
(N·out·in). ``R`` is never built densely (in·in·out): the m·k Cayley solves are one batched call
and each factor is one gather, one batched block product and one gather. The weight path is the
cheaper one only for outputs narrower than about ``3 m G`` (:func:`block_product`; large blocks, small
heads) or where the input needs no gradient. Its autograd
keeps ``W0 Rᵀ`` and ``W'`` (two [out, in] tensors in the compute dtype) per layer until backward; the
activation path keeps ``x R`` and ``x R W0ᵀ`` (N-sized).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ._core import (
    Adapter,
    AdapterConfig,
    AdapterContext,
    amp_dtype,
    cheaper_path,
    check_dropouts,
    check_path,
    load_peft_tensors,
)
from .oft import cayley


def butterfly_perm(n: int, chunks: int, half: int) -> Tensor:
    """Indices ``p`` [n] with ``(P x)_i = x[p_i]``: in each of ``chunks`` equal parts, the sub-blocks of
    size ``half`` at even positions, then those at odd positions."""
    size = n // chunks
    subs = size // half
    order = [*range(0, subs, 2), *range(1, subs, 2)]
    within = torch.cat([torch.arange(j * half, (j + 1) * half) for j in order])
    return torch.cat([c * size + within for c in range(chunks)])


def boft_layout(in_f: int, block_size: int, block_num: int, factors: int) -> tuple[int, int]:
    """``(k blocks, block size b)`` checked as PEFT checks them; raises WeightsmithError naming the option."""
    if (block_size == 0) == (block_num == 0) or block_size < 0 or block_num < 0:
        raise WeightsmithError(
            f"BOFT: set exactly one of block_size ({block_size}) and block_num ({block_num}), the other to 0"
        )
    if factors < 1:
        raise WeightsmithError(f"BOFT n_butterfly_factor must be at least 1, got {factors}")
    spread = 2 ** (factors - 1)
    if block_num:
        if in_f % block_num:
            raise WeightsmithError(f"BOFT: in_features {in_f} is not divisible by block_num {block_num}")
        if block_num % spread:
            raise WeightsmithError(
                f"BOFT: block_num {block_num} must be a multiple of 2^(n_butterfly_factor - 1) = {spread}"
            )
        k, b = block_num, in_f // block_num
    else:
        if in_f % (block_size * spread):
            raise WeightsmithError(
                f"BOFT: in_features {in_f} is not divisible by block_size {block_size} x "
                f"2^(n_butterfly_factor - 1) = {block_size * spread}"
            )
        k, b = in_f // block_size, block_size
    if factors > 1 and (k % 2 or b % 2):
        raise WeightsmithError(
            f"BOFT: with n_butterfly_factor > 1 block_num {k} and block_size {b} must be even"
        )
    return k, b


GROUP_WIDTH = 64  # blocks narrower than this are multiplied as dense diagonal groups of this width


def group_size(k: int, b: int) -> int:
    """How many of the k blocks of size b one dense group holds: the largest divisor g of k with
    ``g b <= max(b, GROUP_WIDTH)``."""
    top = max(1, GROUP_WIDTH // b)
    return max(g for g in range(1, min(k, top) + 1) if k % g == 0)


def block_product(z: Tensor, blocks: Tensor) -> Tensor:
    """``z diag(blocks)`` for rows z [..., k b] and blocks [k, b, b] (block j of each row times block j).

    A batched product of [rows, b] by [b, b] per block runs far below the machine's speed for small b
    (b = 4: one tiny product per block, on CPU and GPU alike), so g neighbouring blocks (``group_size``)
    are multiplied as one dense [g b, g b] block-diagonal matrix: g times the multiply-adds, one batched
    product of useful size over the k / g groups, the rows read in place (strided) and written once.
    """
    k, b, _ = blocks.shape
    g = group_size(k, b)
    if g > 1:
        eye = torch.eye(g, device=blocks.device, dtype=blocks.dtype)
        blocks = torch.einsum("qjcd,jl->qjcld", blocks.reshape(k // g, g, b, b), eye)
        blocks = blocks.reshape(k // g, g * b, g * b)
    rows = z.shape[:-1]
    out = torch.bmm(z.reshape(-1, k // g, g * b).transpose(0, 1), blocks)  # [k / g, rows, g b]
    return out.transpose(0, 1).reshape(*rows, z.shape[-1])


def boft_costs(
    tokens: int, out_f: int, in_f: int, b: int, m: int, train: bool, input_grad: bool
) -> tuple[int, int]:
    """Multiply-adds of one call (forward, and backward when ``train`` or ``input_grad``), the frozen product
    included, of the activation path and of the weight path: N = ``tokens`` rows, a [out_f, in_f] weight,
    m butterfly factors of b x b blocks. One factor on R rows of ``in_f`` costs ``R in_f G``, G = g b the
    width of the dense groups the blocks are multiplied in (:func:`block_product`).

    Activation: ``x R`` (m factors on N rows), ``x_rot W0ᵀ``; backward ``(g s) W0`` (needed by every
    gradient), each factor's block gradient (m) and, for earlier factors or the input, the gradient through
    it (m - 1, plus 1 with an input gradient). Weight: ``W0 Rᵀ`` (m factors on out rows), ``x W'ᵀ``;
    backward ``gᵀ x`` and the factors on out rows as above, ``g W'`` with an input gradient.
    """
    N, o, i = tokens, out_f, in_f
    b *= group_size(i // b, b)
    act, weight = N * o * i + m * N * i * b, m * o * i * b + N * o * i
    if train:
        act += (2 * m - 1) * N * i * b
        weight += N * o * i + (2 * m - 1) * o * i * b
    if train or input_grad:
        act += N * o * i
    if input_grad:
        act += N * i * b
        weight += N * o * i
    return act, weight


class BOFTAdapter(Adapter):
    """Trainable ``boft_R`` [m, k, b, b] and ``boft_s`` [out, 1]; permutations are non-saved buffers."""

    needs_base_out: ClassVar[bool] = False  # rotates x, then applies W0
    perms: Tensor
    inv_perms: Tensor

    def __init__(self, R: Tensor, s: Tensor, path: str = "auto") -> None:
        super().__init__()
        check_path(path, "BOFT")
        self.path = path
        self.boft_R = nn.Parameter(R)
        self.boft_s = nn.Parameter(s)
        m, k, b, _ = R.shape
        n = k * b
        perms = [torch.arange(n)] + [butterfly_perm(n, k >> i, b // 2) for i in range(1, m)]
        P = torch.stack(perms).to(R.device)
        self.hold(perms=P, inv_perms=torch.argsort(P, dim=1))

    def blocks(self) -> Tensor:
        """Cayley rotations [m, k, b, b] (float32 or wider)."""
        S = self.boft_R if self.boft_R.dtype in (torch.float32, torch.float64) else self.boft_R.float()
        m, k, b, _ = S.shape
        Q = 0.5 * (S - S.transpose(-1, -2))
        return cayley(Q.reshape(m * k, b, b)).reshape(m, k, b, b)

    def rotate_rows(self, M: Tensor, R: Tensor, transpose: bool) -> Tensor:
        """``M R`` (transpose=False) or ``M Rᵀ`` for rows M [..., in], ``R = B_m ⋯ B_1`` given its blocks.

        ``x B_i = ((x P_i) D_i) P_iᵀ`` with ``(x P)_j = x[p⁻¹_j]`` and ``(x Pᵀ)_j = x[p_j]``.
        """
        m = R.shape[0]
        R = R.to(M.dtype)
        order = range(m) if transpose else range(m - 1, -1, -1)
        for i in order:
            z = M if i == 0 else M[..., self.inv_perms[i]]  # P_1 = I
            z = block_product(z, R[i].transpose(-1, -2) if transpose else R[i])
            M = z if i == 0 else z[..., self.perms[i]]
        return M

    def delta(self, W0: Tensor) -> Tensor:
        return self.merge(W0) - W0

    def choose_path(self, x: Tensor, W0: Tensor) -> str:
        """This call's path (:func:`~._core.cheaper_path` over :func:`boft_costs`)."""
        m, k, b, _ = self.boft_R.shape
        trains = self.boft_R.requires_grad or self.boft_s.requires_grad
        out_f, in_f = W0.shape
        return cheaper_path(
            self.path, x, W0, None, trains, lambda n, t, g: boft_costs(n, out_f, in_f, b, m, t, g)
        )

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor | None) -> Tensor:
        if self.choose_path(x, W0) == "weight":  # x (diag(s) W0 Rᵀ)ᵀ; autograd keeps W0 Rᵀ and W'
            W_rot = self.rotate_rows(W0.to(amp_dtype(x)), self.blocks(), transpose=True)
            return F.linear(x, W_rot * self.boft_s.to(W_rot.dtype))
        x_rot = self.rotate_rows(x, self.blocks(), transpose=False)
        y = F.linear(x_rot, W0.to(x_rot.dtype))
        return y * self.boft_s.view(-1).to(y.dtype)  # y is bf16 under autocast, x may not be

    def merge(self, W0: Tensor) -> Tensor:
        return self.rotate_rows(W0, self.blocks(), transpose=True) * self.boft_s

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if bool((self.boft_s == 0).any()):
            raise WeightsmithError("BOFT unmerge: a scale in boft_s is exactly 0, the merge cannot be undone")
        # R is orthogonal: (W0 Rᵀ) R = W0
        return self.rotate_rows(W_merged / self.boft_s, self.blocks(), transpose=False)

    def peft_state(self) -> dict[str, Tensor]:
        return {"boft_R": self.boft_R.detach(), "boft_s": self.boft_s.detach()}

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        load_peft_tensors(self, state, {"boft_R": "boft_R", "boft_s": "boft_s"})


@register_config("boft", kind="adapter")
class BOFT(AdapterConfig):
    """``block_size`` b or ``block_num`` k (one of them 0; PEFT default b=4), ``n_butterfly_factor`` m
    (PEFT default 1). ``path``: "auto" (per call, the cheaper exact computation by multiply-adds),
    "activation" (rotate x) or "weight" (rotate the rows of W0, one product)."""

    peft_type: ClassVar[str | None] = "BOFT"
    default_lr: ClassVar[float] = 1e-3
    example_opts: ClassVar[dict[str, Any]] = dict(block_size=4, n_butterfly_factor=2)

    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    path: str = "auto"

    def __post_init__(self) -> None:
        check_path(self.path, "BOFT")
        if (self.block_size == 0) == (self.block_num == 0) or min(self.block_size, self.block_num) < 0:
            raise WeightsmithError(
                f"BOFT: set exactly one of block_size ({self.block_size}) and block_num ({self.block_num}) "
                "to a positive number, the other to 0"
            )
        if self.n_butterfly_factor < 1:
            raise WeightsmithError(
                f"BOFT n_butterfly_factor must be at least 1, got {self.n_butterfly_factor}"
            )

    def create(self, W0: Tensor, ctx: AdapterContext) -> BOFTAdapter:
        out_f, in_f = W0.shape
        try:
            k, b = boft_layout(in_f, self.block_size, self.block_num, self.n_butterfly_factor)
        except WeightsmithError as exc:
            raise ctx.error(str(exc), tuple(W0.shape)) from None
        R = torch.zeros(self.n_butterfly_factor, k, b, b, device=W0.device)
        return BOFTAdapter(R, torch.ones(out_f, 1, device=W0.device), self.path)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> BOFT:
        check_dropouts(peft_config, ("boft_dropout",), "BOFT")
        bias = peft_config.get("bias", "none")
        if bias not in (None, "none"):
            raise WeightsmithError(f"{module}: PEFT BOFT option bias={bias!r} is not supported (only 'none')")
        return cls(
            block_size=int(peft_config.get("boft_block_size", 4)),
            block_num=int(peft_config.get("boft_block_num", 0)),
            n_butterfly_factor=int(peft_config.get("boft_n_butterfly_factor", 1)),
        )

    def to_peft(self) -> dict[str, Any]:
        return {
            "peft_type": "BOFT",
            "boft_block_size": self.block_size,
            "boft_block_num": self.block_num,
            "boft_n_butterfly_factor": self.n_butterfly_factor,
            "boft_dropout": 0.0,
            "bias": "none",
            "init_weights": True,
        }
