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
(:class:`_Butterfly`, with a hand-written gradient) and each factor becomes dense [G, G] diagonal groups
with its permutation folded in where a chunk of it fits in a group (:func:`butterfly_plan`; else the
rows are copied into block order and back), applied by one batched product that reads the rows in
place. The weight path is the cheaper one only for outputs narrower than about ``3 m G``
(:func:`block_product`; large blocks, small heads) or where the input needs no gradient. Its autograd
keeps ``W0 Rᵀ`` and ``W'`` (two [out, in] tensors in the compute dtype) per layer until backward; the
activation path (:class:`_ButterflyLinear`, one node) keeps x, each later factor's input and
``x R W0ᵀ`` (N-sized).
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
    amp_apply,
    amp_dtype,
    autocast_off,
    cheaper_path,
    check_dropouts,
    check_path,
    load_peft_tensors,
)


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


def factor_shape(i: int, b: int) -> tuple[int, int, int]:
    """Factor i (0-based; ``B_{i+1}``) as a view: each chunk of ``b 2^i`` inputs is ``[P, r, h]`` and block
    j of the chunk holds the runs ``(p, j, :)``, p < P, of h inputs: two half-blocks ``2^i`` half-blocks
    apart (``(P, r, h) = (2, 2^i, b/2)``); ``(1, 1, b)`` for ``B_1 = P_1 D_1 P_1ᵀ = D_1``. This is
    ``x P_i`` of :func:`butterfly_perm` (``(x P_i)_j = x[p⁻¹_j]``) as a reshape and a transpose."""
    return (1, 1, b) if i == 0 else (2, 2**i, b // 2)


Plan = tuple[tuple[bool, tuple[int, int, int]], ...]


def butterfly_plan(m: int, k: int, b: int) -> Plan:
    """Per factor ``(folded, (P, r, h))``: folded when a chunk (``P r h`` inputs) lies inside one dense
    group (``g b``, :func:`group_size`): the permutation then goes into the group's dense matrix and the
    factor multiplies the inputs in place; else the inputs are transposed into block order and back."""
    G = group_size(k, b) * b
    shapes = [factor_shape(i, b) for i in range(m)]
    return tuple((G % (P * r * h) == 0, (P, r, h)) for P, r, h in shapes)


def to_blocks(z: Tensor, shape: tuple[int, int, int], inverse: bool = False) -> Tensor:
    """Rows z [rows, n] in a factor's block order (``[.., P, r, h]`` chunks read as ``[.., r, P, h]``), or
    back with ``inverse``: one copy."""
    P, r, h = shape
    a, c = (r, P) if inverse else (P, r)
    return z.view(z.shape[0], -1, a, c, h).transpose(2, 3).reshape(z.shape)


def group_product(z: Tensor, E: Tensor, out: Tensor | None = None) -> Tensor:
    """Rows z [rows, n] times the block-diagonal matrix of dense groups E [n / G, G, G]: one batched
    product that reads z in place (strided) and writes into ``out`` [rows, n] through its group view
    (no copy where the GEMM takes the strides, as on CUDA); not differentiable with ``out``."""
    q, G = E.shape[0], E.shape[-1]
    zb = z.view(z.shape[0], q, G).transpose(0, 1)
    if out is None:
        return torch.bmm(zb, E).transpose(0, 1).reshape(z.shape)
    torch.bmm(zb, E, out=out.view(z.shape[0], q, G).transpose(0, 1))
    return out


def _dense_view(t: Tensor, g: int, shape: tuple[int, int, int]) -> Tensor:
    """Dense groups t [k / g, G, G] as ``[q, γ, P, r, h, γ', P', r', h']`` (γ: chunk of the group)."""
    P, r, h = shape
    c = g // r
    return t.view(t.shape[0], c, P, r, h, c, P, r, h)


def dense_factor(R: Tensor, eye_g: Tensor, shape: tuple[int, int, int], out: Tensor) -> Tensor:
    """The blocks R [k, b, b] of one factor as dense groups ``out`` [k / g, G, G] (any dtype: one kernel
    writes and casts): entry ``((γ, p, j, e), (γ', p', j', e')) = δ_γγ' δ_jj' R_γj[(p, e), (p', e')]`` in
    the factor's input order (:func:`factor_shape`), so ``group_product(x, out) = x P D Pᵀ``."""
    P, r, h = shape
    g = eye_g.shape[0]
    c = g // r
    Rv = R.view(-1, c, r, P, h, P, h).permute(0, 1, 3, 2, 4, 5, 6)[:, :, :, :, :, None, :, None]
    mask = eye_g.view(c, r, c, r)[None, :, None, :, None, :, None, :, None]
    target = _dense_view(out, g, shape)
    if torch.compiler.is_compiling():  # traced: no out= into a view of another layout (functionalisation)
        target.copy_(Rv * mask)
    else:
        torch.mul(Rv, mask, out=target)
    return out


def block_product(z: Tensor, blocks: Tensor) -> Tensor:
    """``z diag(blocks)`` for rows z [..., k b] and blocks [k, b, b] (block j of each row times block j).

    A batched product of [rows, b] by [b, b] per block runs far below the machine's speed for small b
    (b = 4: one tiny product per block, on CPU and GPU alike), so g neighbouring blocks (``group_size``)
    are multiplied as one dense [g b, g b] block-diagonal matrix: g times the multiply-adds, one batched
    product of useful size over the k / g groups, the rows read in place (strided) and written once.
    """
    k, b, _ = blocks.shape
    g = group_size(k, b)
    eye = torch.eye(g, device=blocks.device, dtype=blocks.dtype)
    E = dense_factor(blocks, eye, (1, 1, b), blocks.new_empty(k // g, g * b, g * b))
    return group_product(z.reshape(-1, z.shape[-1]), E).view(z.shape)


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


def column_dots(a: Tensor, b: Tensor, batched: bool) -> Tensor:
    """``Σ_n a[n, o] b[n, o]`` [out] in float32 (or wider). ``batched``: the diagonals of the c x c blocks
    of ``aᵀ b`` (c <= 64 divides out), one batched product that reads a and b once, strided, and
    accumulates in float32 (on a GPU a product of N-long columns costs a read, not the out·N product
    written then summed; on a CPU the c-fold multiply-adds cost more than that pass)."""
    rows, out = a.shape
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    c = max(d for d in range(1, min(out, 64) + 1) if out % d == 0)
    if not batched or c < 8:
        return torch.mul(a, b).sum(0, dtype=dt)
    ab = a.view(rows, out // c, c).permute(1, 2, 0)  # [out / c, c, rows]
    bb = b.view(rows, out // c, c).transpose(0, 1)  # [out / c, rows, c]
    return torch.bmm(ab, bb).diagonal(dim1=1, dim2=2).to(dt).reshape(out)


class _Butterfly(torch.autograd.Function):
    """Stored ``S`` [m, k, b, b] -> every factor's dense groups E [m, k / g, G, G] in ``dtype``.

    Forward: ``Q = (S - Sᵀ)/2``, ``R = (I - Q)(I + Q)⁻¹`` (one batched solve for all m k blocks, in
    float32 or wider), then one kernel per factor writes R into its groups and casts. Backward, from
    ``R = 2 (I + Q)⁻¹ - I``: with ``H = (I + Q)⁻¹ = (R + I)/2`` and ``Γ = dL/dR`` (the E gradient's
    diagonal blocks), ``dL/dQ = -2 Hᵀ Γ Hᵀ`` and ``dL/dS = (dQ - dQᵀ)/2 = Mᵀ - M``, ``M = Hᵀ Γ Hᵀ``: two
    batched products and one subtraction instead of autograd through the LU solve.
    """

    @staticmethod
    def forward(ctx: Any, S: Tensor, eye_b: Tensor, eye_g: Tensor, plan: Plan, dtype: torch.dtype) -> Tensor:
        dt = S.dtype if S.dtype in (torch.float32, torch.float64) else torch.float32
        m, k, b, _ = S.shape
        S3 = S.reshape(m * k, b, b).to(dt)
        eye = eye_b.to(dt)
        D = S3 - S3.transpose(1, 2)
        A, B = torch.add(eye, D, alpha=0.5), torch.add(eye, D, alpha=-0.5)  # I + Q, I - Q
        # solve_ex: I + Q is invertible for any skew-symmetric Q; `solve` checks on the host (no CUDA graph)
        R = torch.linalg.solve_ex(A, B, left=False).result
        g = eye_g.shape[0]
        E = torch.empty(m, k // g, g * b, g * b, dtype=dtype, device=S.device)
        mask = eye_g.to(dt)
        for i, (folded, shape) in enumerate(plan):
            dense_factor(R.view(m, k, b, b)[i], mask, shape if folded else (1, 1, b), E[i])
        ctx.save_for_backward(R, eye)
        ctx.plan, ctx.g, ctx.S_dtype = plan, g, S.dtype
        return E

    @staticmethod
    @autocast_off
    def backward(ctx: Any, dE: Tensor) -> tuple[Tensor | None, ...]:
        R, eye = ctx.saved_tensors
        m = len(ctx.plan)
        k, b = R.shape[0] // m, R.shape[-1]
        gam = torch.empty(m, k, b, b, dtype=R.dtype, device=R.device)
        for i, (folded, shape) in enumerate(ctx.plan):
            P, r, h = shape if folded else (1, 1, b)
            blocks = _dense_view(dE[i], ctx.g, (P, r, h)).diagonal(dim1=1, dim2=5).diagonal(dim1=2, dim2=5)
            gam[i].view(-1, ctx.g // r, r, P, h, P, h).copy_(blocks.permute(0, 5, 6, 1, 2, 3, 4))
        H = torch.lerp(R, eye, 0.5)  # (R + I) / 2 = (I + Q)⁻¹
        M = torch.bmm(torch.bmm(H.transpose(1, 2), gam.view(m * k, b, b)), H.transpose(1, 2))
        dS = (M.transpose(1, 2) - M).view(m, k, b, b).to(ctx.S_dtype)
        return dS, None, None, None, None


class _ButterflyLinear(torch.autograd.Function):
    """``y = (x R W0ᵀ) diag(s)`` with R the butterfly of dense groups E [m, k / g, G, G] (``x R`` applies
    ``B_m`` first), for :func:`~._core.amp_apply` (x in the compute dtype, E already in it).

    Each factor is one batched product of the rows read in place and written into a [N, in] buffer
    through its group view (a factor not folded into its groups is copied into block order and back);
    then one GEMM and the scaling ``y = y0 s`` (s in float32, one pass). Saved: each factor's input, and
    ``y0`` when s trains (as autograd kept them). Backward: ``ds = Σ_n g y0`` (:func:`column_dots`),
    ``g' = g diag(s) W0`` scaling whichever of g [N, out] and W0 [out, in] is smaller, then per factor
    ``dE = zᵀ g'`` and ``g' ← g' Eᵀ`` (one batched product each).
    """

    @staticmethod
    def forward(ctx: Any, base_out: None, x: Tensor, W0: Tensor, s: Tensor, E: Tensor, plan: Plan) -> Tensor:
        dt, n = x.dtype, x.shape[-1]
        z = x.reshape(-1, n).contiguous()
        inputs = []
        for i in range(len(plan) - 1, -1, -1):  # x R = x B_m ⋯ B_1
            folded, shape = plan[i]
            u = z if folded else to_blocks(z, shape)
            inputs.append(u)
            z = group_product(u, E[i], torch.empty_like(u))
            z = z if folded else to_blocks(z, shape, inverse=True)
        W = W0.to(dt)
        y0 = torch.mm(z, W.t())
        y = torch.mul(y0, s.view(-1), out=torch.empty_like(y0))  # in float32, rounded once
        need_W, need_s = ctx.needs_input_grad[2:4]
        ctx.save_for_backward(W, s, E, y0 if need_s else None, z if need_W else None, *inputs[::-1])
        ctx.plan, ctx.x_shape, ctx.W_dtype = plan, x.shape, W0.dtype
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        W, s, E, y0, x_rot, *inputs = ctx.saved_tensors
        need_x, need_W, need_s, need_E = ctx.needs_input_grad[1:5]
        g2 = g.reshape(-1, W.shape[0]).contiguous()
        dx = dW = ds = dE = None
        if need_s:
            ds = column_dots(g2, y0, g2.is_cuda).view_as(s).to(s.dtype)
        if need_x or need_E or need_W:
            sv = s.view(-1)
            gs = None
            if need_W or g2.shape[0] <= W.shape[1]:  # scale g [N, out], else W0 [out, in]
                gs = torch.mul(g2, sv, out=torch.empty_like(g2))
                gr = torch.mm(gs, W)
            else:
                gr = torch.mm(g2, torch.mul(W, s, out=torch.empty_like(W)))
            if gs is not None and need_W:
                dW = torch.mm(gs.t(), x_rot).to(ctx.W_dtype)
            dE = torch.empty_like(E) if need_E else None
            m = len(ctx.plan)
            for i in range(m):  # B_1 was applied last
                folded, shape = ctx.plan[i]
                gv = gr if folded else to_blocks(gr, shape)
                if dE is not None:
                    q, G = E.shape[1], E.shape[-1]
                    u = inputs[i].view(-1, q, G).transpose(0, 1)
                    torch.bmm(u.transpose(1, 2), gv.view(-1, q, G).transpose(0, 1), out=dE[i])
                if i < m - 1 or need_x:
                    gr = group_product(gv, E[i].transpose(1, 2), torch.empty_like(gv))
                    gr = gr if folded else to_blocks(gr, shape, inverse=True)
            dx = gr.view(ctx.x_shape) if need_x else None
        return None, dx, dW, ds, dE, None


class BOFTAdapter(Adapter):
    """Trainable ``boft_R`` [m, k, b, b] and ``boft_s`` [out, 1]; ``perms`` (the permutations ``P_i`` as
    indices, for reference) and two identities are non-saved buffers."""

    needs_base_out: ClassVar[bool] = False  # rotates x, then applies W0
    perms: Tensor
    eye_b: Tensor
    eye_g: Tensor

    def __init__(self, R: Tensor, s: Tensor, path: str = "auto") -> None:
        super().__init__()
        check_path(path, "BOFT")
        self.path = path
        self.boft_R = nn.Parameter(R)
        self.boft_s = nn.Parameter(s)
        m, k, b, _ = R.shape
        n = k * b
        perms = [torch.arange(n)] + [butterfly_perm(n, k >> i, b // 2) for i in range(1, m)]
        self.plan = butterfly_plan(m, k, b)
        self.hold(
            perms=torch.stack(perms).to(R.device),
            eye_b=torch.eye(b, device=R.device),
            eye_g=torch.eye(group_size(k, b), device=R.device),
        )

    def factors(self, dtype: torch.dtype) -> Tensor:
        """Every factor's dense groups E [m, k / g, G, G] in ``dtype`` (:class:`_Butterfly`)."""
        with torch.autocast(self.boft_R.device.type, enabled=False):
            E: Tensor = _Butterfly.apply(self.boft_R, self.eye_b, self.eye_g, self.plan, dtype)
        return E

    def rotate_rows(self, M: Tensor, E: Tensor, transpose: bool) -> Tensor:
        """``M R`` (transpose=False) or ``M Rᵀ`` for rows M [..., in], ``R = B_m ⋯ B_1`` given its dense
        groups E (:meth:`factors`); differentiable."""
        m = E.shape[0]
        z = M.reshape(-1, M.shape[-1])
        for i in range(m) if transpose else range(m - 1, -1, -1):
            folded, shape = self.plan[i]
            u = z if folded else to_blocks(z, shape)
            u = group_product(u, E[i].transpose(1, 2) if transpose else E[i])
            z = u if folded else to_blocks(u, shape, inverse=True)
        return z.view(M.shape)

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
        E = self.factors(amp_dtype(x))
        if self.choose_path(x, W0) == "weight":  # x (diag(s) W0 Rᵀ)ᵀ; autograd keeps W0 Rᵀ and W'
            W_rot = self.rotate_rows(W0.to(E.dtype), E, transpose=True)
            return F.linear(x, W_rot * self.boft_s.to(W_rot.dtype))
        return amp_apply(_ButterflyLinear, None, x, W0, self.boft_s, E, self.plan)

    def merge(self, W0: Tensor) -> Tensor:
        return self.rotate_rows(W0, self.factors(W0.dtype), transpose=True) * self.boft_s

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if bool((self.boft_s == 0).any()):
            raise WeightsmithError("BOFT unmerge: a scale in boft_s is exactly 0, the merge cannot be undone")
        # R is orthogonal: (W0 Rᵀ) R = W0
        return self.rotate_rows(W_merged / self.boft_s, self.factors(W_merged.dtype), transpose=False)

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
