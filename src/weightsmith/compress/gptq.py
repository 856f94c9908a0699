"""GPTQ: column-by-column quantisation with second-order error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023. For a layer with inputs ``X`` the loss ``‖WX − ŴX‖²`` has Hessian
``H = 2XXᵀ`` (per row of ``W``). Quantising column ``q`` and updating the not-yet-quantised columns ``F``
optimally (Optimal Brain Surgeon) gives

    δ_F = − (w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}                 (eq. 3)

GPTQ quantises the columns in one fixed order for every row, reads the rows of ``H⁻¹`` it needs from the
upper Cholesky factor of the damped inverse, ``chol((H + λI)⁻¹)ᵀ`` with ``λ = damp · mean diag H``
(Step 3), and applies the updates lazily: within a block of ``block_size`` (128) columns immediately, to the
columns after the block once per block (Step 2). ``act_order`` quantises columns by decreasing ``diag H``;
its group scales are then fixed up front from the unquantised weights ("static groups"), so each group
keeps one scale in storage order and the stored format needs no permutation index.

Speed. Everything above depends on ``W`` only row by row, and on ``H`` alone otherwise (the order, ``U``,
the static grids' columns), so (1) layers with the same Hessian (q/k/v, gate/up: the layer walker gives
layers that read one input tensor one statistics object, one Gram accumulation for the set) are quantised
in one pass over their stacked rows, with the same codes; (2) on CUDA each block's column steps run as one
Triton kernel (:mod:`._gptq_kernel`) instead of about ten small kernels per column, with the eager loop's
arithmetic; the lazy update of the later columns stays a matrix product. A dynamic group's grid is computed
when its first column comes up, so a block runs in segments that start at group starts.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats, Layer, StatsSpec
from ..linalg import on_device
from ..progress import log
from ._core import CompressConfig, Compressed
from ._grid import QuantizedWeight, grouped, minmax_params, qmax
from ._warmup import WarmUp


def inverse_hessian_factor(H: Tensor, damp: float, reversed_factor: bool | None = None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), ``λ = damp · mean diag H``.

    Two ways to the same ``U``: the reference's (GPTQ's code and llm-compressor's) factors ``H``, inverts
    from the factor and factors the inverse again (three O(n³) steps); ``reversed_factor`` (the default on
    CUDA, where these steps dominate GPTQ's solve) factors ``H`` with its rows and columns reversed,
    ``J H J = L Lᵀ`` (``J`` the reversal), and takes ``U = J L⁻¹ J``: then ``Uᵀ U = J L⁻ᵀ L⁻¹ J = H⁻¹``
    and ``U`` is upper triangular with a positive diagonal, so it is the Cholesky factor (unique). One
    factorisation and one triangular solve; equal to the reference's up to float32 rounding. On the CPU
    the reference's steps stay the default (LAPACK inverts a triangle in a third of a general solve's
    work, and the CPU results stay what they were, bit for bit)."""
    H = H.clone()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    flip = H.is_cuda if reversed_factor is None else reversed_factor
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1) if flip else H)
    if int(info) != 0:
        raise WeightsmithError(
            "GPTQ: the damped Hessian is not positive definite; raise the 'damp' option (e.g. --opt damp=0.1)"
        )
    if flip:
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@dataclass(frozen=True)
class _Block:
    """One block of columns ``i1:i2`` (in quantisation order): its working copy ``W1`` of the weights, the
    factor ``U1 = U[i1:i2, i1:i2]``, the grids, where codes and scaled errors go, and each column's group
    (``gidx`` on the device, ``groups`` on the host)."""

    W1: Tensor
    U1: Tensor
    scale: Tensor
    zero: Tensor
    Q1: Tensor
    Err1: Tensor
    gidx: Tensor
    groups: list[int]


Steps = Callable[[_Block, int, int, int], None]


def _eager_steps(blk: _Block, a: int, b: int, bits: int) -> None:
    """Columns ``a`` to ``b`` of a block, one after another (Algorithm 1, lines 5-8): the reference.

    The loop runs on a transposed copy of the block's columns ``a:`` (each weight column a contiguous row)
    and copies back at the end: the same elementwise operations in the same order, so the same bits, at
    about half the time of strided columns on a CPU."""
    W1T = blk.W1[:, a:].T.contiguous()
    scale, zero = blk.scale.T.contiguous(), blk.zero.T.contiguous()  # [groups, rows]: a group's row
    QT, ET = torch.empty_like(W1T[: b - a]), torch.empty_like(W1T[: b - a])
    U1, top = blk.U1, qmax(bits)
    for j in range(b - a):
        i, grp = a + j, blk.groups[a + j]
        w, s, z = W1T[j], scale[grp], zero[grp]
        q = torch.div(w, s, out=QT[j]).add_(z).round_().clamp_(0, top)
        err = torch.sub(w, (q - z).mul_(s), out=ET[j]).div_(U1[i, i])
        W1T[j:].sub_(U1[i, i:].unsqueeze(1) * err.unsqueeze(0))
    blk.W1[:, a:] = W1T.T
    blk.Q1[:, a:b] = QT.T
    blk.Err1[:, a:b] = ET.T


def _fused_steps(blk: _Block, a: int, b: int, bits: int) -> None:
    """The same columns in one Triton launch (:func:`._gptq_kernel.run_block`)."""
    from ._gptq_kernel import run_block

    with on_device(blk.W1):
        run_block(blk.W1, blk.U1.contiguous(), blk.scale, blk.zero, blk.gidx, blk.Q1, blk.Err1, (a, b), bits)


def triton_available() -> bool:
    """Whether the fused block kernel can be imported (Triton installed)."""
    try:
        from . import _gptq_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(W: Tensor, fused: bool | None, method: str, available: Callable[[], bool]) -> bool:
    """Whether ``method``'s block runs as its Triton kernel: ``fused`` None means where it can (CUDA and
    ``available()``); True where it cannot is refused, naming the option."""
    if fused is None:
        return W.is_cuda and available()
    if fused and not available():
        raise WeightsmithError(f"{method} option fused=true needs Triton (pip install triton)")
    if fused and not W.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise WeightsmithError(
            f"{method} option fused=true: the kernel runs on CUDA (or with TRITON_INTERPRET=1)"
        )
    return fused


def _block_steps(W: Tensor, fused: bool | None) -> Steps:
    return _fused_steps if use_fused(W, fused, "gptq", triton_available) else _eager_steps


WARM_UP = WarmUp("gptq")
WARM_ROWS = 16  # rows of the warm-up's weight: a launch of the real kernel variant, nothing more


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 0,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    fused: bool | None = None,
) -> QuantizedWeight:
    """GPTQ on one ``[out, in]`` weight with Hessian ``H`` [in, in]; returns codes on a group-wise grid.

    ``fused``: run each block's column steps as one Triton kernel (:mod:`._gptq_kernel`, same codes) instead
    of the eager loop; None picks it for a CUDA weight when Triton is installed."""
    WARM_UP.wait()  # never beside a warm-up still compiling the same kernel
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    g = group_size or in_f
    dead = H.diagonal() == 0  # masked fills, not boolean indexing: no host sync on a GPU
    H.diagonal().masked_fill_(dead, 1.0)
    W.masked_fill_(dead, 0.0)
    n_groups = in_f // g
    scale = torch.empty(out_f, n_groups, device=W.device)
    zero = torch.empty_like(scale)
    static = act_order or group_size == 0
    if static:  # every group's grid from the unquantised weights
        scale, zero = minmax_params(grouped(W, group_size), bits, symmetric)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    Q = torch.empty_like(W)
    cols = perm.tolist()  # host-side once: reading perm[i] in the loop would sync the GPU every column
    steps = _block_steps(W, fused)
    gidx = (perm // g).to(torch.int32)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        # a dynamic group's grid comes from the current (updated) weights at its first column: the block's
        # columns run in segments that start there
        starts = [] if static else [i for i in range(i2 - i1) if cols[i1 + i] % g == 0]
        bounds = sorted({0, *starts, i2 - i1})
        groups = [c // g for c in cols[i1:i2]]
        blk = _Block(W1, U1, scale, zero, Q[:, i1:i2], Err1, gidx[i1:i2], groups)
        for a, b in pairwise(bounds):
            if a in starts:
                window = (
                    W1[:, a : a + g] if a + g <= i2 - i1 else torch.cat([W1[:, a:], W[:, i2 : i1 + a + g]], 1)
                )
                s, z = minmax_params(window.unsqueeze(1), bits, symmetric)
                grp = cols[i1 + a] // g
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            steps(blk, a, b, bits)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(Q.to(torch.uint8), scale, zero, bits, group_size, symmetric)


@register_config("gptq", kind="compress")
class GPTQ(CompressConfig):
    """GPTQ (``damp``: Hessian dampening as a fraction of mean diag H; ``block_size``; ``act_order``;
    ``fused``: on CUDA with Triton installed, each block's column steps in one kernel; false: the eager loop).

    The layers of a block that read the same input (q/k/v, gate/up) have the same Hessian; GPTQ treats every
    row alike given ``H`` (the column order of ``act_order`` and ``U`` depend on ``H`` alone), so their rows
    are stacked and quantised in one pass: the same codes as layer by layer, with a third fewer passes on a
    Llama block."""

    calibrated = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    fused: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise WeightsmithError(f"gptq option damp={self.damp}: must be > 0")
        if self.block_size < 1:
            raise WeightsmithError(f"gptq option block_size={self.block_size}: must be >= 1")

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(gram=True, channels=False)

    def warm_up(self, device: torch.device) -> threading.Thread | None:
        """On CUDA, run GPTQ once on a tiny weight in a side thread (:mod:`._warmup`): Triton's import, its
        cache key and the block kernel's load, and cuSOLVER's Cholesky, paid while the model loads instead
        of in the first layer. Elsewhere nothing (None)."""
        if device.type != "cuda":
            return None
        width = math.lcm(self.group_size or self.block_size, self.block_size)
        fused = None if self.fused else False

        def once() -> None:
            gen = torch.Generator(device=device).manual_seed(0)  # the caller's random state is untouched
            X = torch.randn(4 * width, width, generator=gen, device=device)
            W = torch.randn(WARM_ROWS, width, generator=gen, device=device)
            grid = (self.bits, self.group_size, self.symmetric, self.damp, self.block_size, self.act_order)
            gptq_quantize(W, X.T @ X, *grid, fused=fused)
            torch.cuda.synchronize(device)

        return WARM_UP.start(once)

    def quantize(self, W: Tensor, stats: InputStats | None) -> QuantizedWeight:
        if stats is None:
            raise WeightsmithError("gptq needs calibration statistics")
        H = stats.hessian().to(W.device)
        return gptq_quantize(
            W, H, self.bits, self.group_size, self.symmetric, self.damp, self.block_size, self.act_order,
            fused=None if self.fused else False,
        )  # fmt: skip

    def compress_block(
        self, block: nn.Module | None, layers: Sequence[Layer], stats: dict[str, InputStats] | None
    ) -> dict[str, Compressed]:
        """Quantise each set of layers with one Hessian in one pass over their stacked rows."""
        if stats is None:
            raise WeightsmithError("gptq needs calibration statistics")
        return stacked_passes(
            "gptq", layers, stats, lambda W, st, sizes: split_rows(self.quantize(W, st), sizes)
        )


StackedRun = Callable[[Tensor, InputStats, list[int]], Sequence[Compressed]]


def stacked_passes(
    method: str, layers: Sequence[Layer], stats: dict[str, InputStats], run: StackedRun
) -> dict[str, Compressed]:
    """Run ``run(W, stats, sizes)`` once per set of layers with one Hessian (:func:`shared_hessian_groups`)
    on their float32 rows stacked into ``W``, ``sizes`` rows each; ``run`` returns one compressed weight
    per layer, which is written back into its layer. GPTQ and SparseGPT's block step."""
    out: dict[str, Compressed] = {}
    groups = shared_hessian_groups(layers, stats)
    log(f"  {method}: {len(layers)} layer(s) in {len(groups)} pass(es) (layers with one Hessian stacked)")
    for group in groups:
        Ws = [ly.weight().detach().float() for ly in group]
        parts = run(torch.cat(Ws), stats[group[0].name], [W.shape[0] for W in Ws])
        for ly, part in zip(group, parts, strict=True):
            ly.write(part.dequantize())
            out[ly.name] = part
    return out


def shared_hessian_groups(layers: Sequence[Layer], stats: dict[str, InputStats]) -> list[list[Layer]]:
    """The layers in sets with one Hessian, in the order of their first member: the layer walker gives the
    layers that read one input tensor (q/k/v reading one normalised hidden state, gate/up) one
    :class:`~weightsmith.layers.InputStats` object, so a set is the layers that share that object."""
    groups: dict[InputStats, list[Layer]] = {}
    for ly in layers:
        groups.setdefault(stats[ly.name], []).append(ly)
    return list(groups.values())


def split_rows(qw: QuantizedWeight, sizes: Sequence[int]) -> list[QuantizedWeight]:
    """A quantised weight of stacked rows back into one per layer (rows ``sizes[0]``, ``sizes[1]``, ...)."""
    parts = zip(qw.q.split(list(sizes)), qw.scale.split(list(sizes)), qw.zero.split(list(sizes)), strict=True)
    return [
        QuantizedWeight(q.clone(), s.clone(), z.clone(), qw.bits, qw.group_size, qw.symmetric)
        for q, s, z in parts
    ]
