"""The integer grid every weight quantiser here lands on: ``Ŵ = s · (q − z)`` per row and group.

``q`` are unsigned codes in ``[0, 2^b − 1]``; ``s`` (scale) and ``z`` (zero point) are per output row and
per group of ``group_size`` consecutive input columns (``group_size = 0``: one group per row, i.e.
per-channel). Symmetric grids fix ``z = 2^(b−1)`` and ``s = max|w| / ((2^b − 1) / 2)`` (the convention of
compressed-tensors' min-max observer); asymmetric grids take ``s = (max − min) / (2^b − 1)`` and
``z = round(−min / s)`` over the group range extended to include 0 ("Quantizing deep convolutional networks
for efficient inference", Krishnamoorthi, 2018, eq. 2-3).

**Codes recovered from the written weight instead of kept.** Once ``Ŵ`` is written into the model, its
codes are a function of it: a :class:`QuantizedWeight` may hold no codes, only where ``Ŵ`` lives
(:class:`WrittenAt`), and recompute ``q = clamp(round(fl32(Ŵ) / s) + z, 0, 2^b − 1)`` when they are read
(:func:`recover_codes`), as llm-compressor recomputes them when it saves. The rule that makes this exact
(:func:`exact_dtype`, :func:`exact_scales`): every path writes ``Ŵ = fl_d(fl32(s · k))`` with the integer
``k = q − z``, ``|k| ≤ K`` (asymmetric grids: ``K = 2^b − 1``; symmetric: ``K = 2^(b−1)``), ``fl32`` a
float32 rounding and ``fl_d`` the cast to the weight's dtype ``d`` (unit roundoff ``u``: ``2^-24`` float32,
``2^-11`` float16, ``2^-8`` bfloat16; a round to nearest errs by at most ``u / (1 + u)`` relative, "Accuracy
and Stability of Numerical Algorithms", Higham, 2002, §2.1). Reading it back divides in float32 once more::

    x = fl32(Ŵ / s) = k (1 + δ1)(1 + δ2)(1 + δ3),   |δ1|, |δ3| ≤ 2^-24,  |δ2| ≤ u / (1 + u)
    |x − k| ≤ K (u / (1 + u) + 2^-22) < 1/2   ⇒   round(x) = k

while ``s · k`` stays in ``d``'s normal range. Below it the cast errs by at most ``h`` absolute (half the
smallest subnormal: ``2^-25`` float16, ``2^-134`` bfloat16; none for float32, where ``Ŵ`` is the float32
product itself, exact when subnormal), so ``s ≥ 8h`` keeps that part under 1/8; above it ``fl_d`` overflows,
so ``s · K`` must stay below ``d``'s largest finite value. The bound holds for every width 2-8 in float32 and
float16 and in bfloat16 up to 7 bits asymmetric and 8 bits symmetric (``128 · (1/257 + 2^-22) < 1/2``);
bfloat16 at 8 bits asymmetric (``255 / 257``) is not exact (``tests/compress/test_rtn_codes.py`` finds the
counterexamples), and there the codes are kept. Every recovery is also verified: ``fl_d(s (q − z))`` must
equal the stored ``Ŵ`` bit for bit (up to the sign of a zero: the float32 path writes ``−0`` where
``round(w / s)`` is ``−0`` and ``z = 0``, the uint8 path ``+0``; both are the code ``z``), else the weight
changed after compression and a
:class:`~weightsmith.errors.WeightsmithError` names it. Within the rule two codes never give one ``Ŵ``, so
verified codes are the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import Tensor

from ..errors import WeightsmithError

Source = Tensor | Callable[[], Tensor]  # where a written Ŵ is: the tensor, or a function returning it now
C = TypeVar("C")
# Weights of Ŵ a recovery step works on at once, by device type: on the CPU few enough that its float32
# temporaries stay in cache (2.6x faster than 4M at a time on one thread: 0.16 against 0.06 G weights/s,
# 2816 x 1024 float32); elsewhere more (a step is about ten kernel launches) but few enough that the save's
# temporaries stay small (about 13 bytes a weight of a step: 50 MB on a GPU)
RECOVER_ELEMENTS = {"cpu": 1 << 17}
RECOVER_ELEMENTS_ELSEWHERE = 1 << 22


@dataclass(frozen=True)
class WrittenAt:
    """Where a quantised weight's ``Ŵ`` lives once its codes are dropped: ``source`` is the ``[..., out, in]``
    tensor or a function returning it now (a layer's :meth:`~weightsmith.layers.Layer.weight`, so that a
    replaced parameter is read, not a stale one), ``dtype`` the dtype ``Ŵ`` was written in, ``name`` the
    tensor's name for errors."""

    source: Source
    dtype: torch.dtype
    name: str

    def tensor(self) -> Tensor:
        return _tensor(self.source)

    def part(self, j: int) -> WrittenAt:
        """The ``j``-th weight of a stacked ``Ŵ`` ``[L, out, in]``."""
        return WrittenAt(lambda: self.tensor()[j], self.dtype, f"{self.name}[{j}]")


@dataclass(eq=False, repr=False)
class _Fields:
    """The fields of :class:`QuantizedWeight` (a base class, so that ``q`` can be a property there)."""

    q: Tensor | None
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int  # 0: per-channel
    symmetric: bool
    written: WrittenAt | None = None


class QuantizedWeight(_Fields):
    """Codes ``q`` [out, in] (uint8), ``scale`` and ``zero`` [out, groups] (float32), ``Ŵ = s (q − z)``.

    Any leading dims are carried through (a stack ``[L, out, in]`` of same-shaped weights, see
    :func:`quantize_rtn`); :meth:`split` cuts such a stack into one result a weight. A result built with
    ``q=None`` and ``written`` holds no codes: reading ``q`` recovers them from ``Ŵ`` where it was written
    (module docstring, :func:`recover_codes`), verified, each time it is read."""

    @property  # type: ignore[override]  # a stored field in _Fields, read through here
    def q(self) -> Tensor:
        if self._codes is not None:
            return self._codes
        if self.written is None:
            raise WeightsmithError("a quantised weight with neither codes nor a written Ŵ to recover them")
        at = self.written
        return recover_codes(at.tensor(), self, at.dtype, at.name)

    @q.setter
    def q(self, value: Tensor | None) -> None:
        self._codes = value

    @property
    def holds_codes(self) -> bool:
        """Whether the codes are stored (else they are recovered from the written ``Ŵ`` when read)."""
        return self._codes is not None

    @property
    def shape(self) -> torch.Size:
        """The weight's shape, without recovering any codes."""
        if self._codes is not None:
            return self._codes.shape
        assert self.written is not None
        return self.written.tensor().shape

    def __repr__(self) -> str:
        how = "codes" if self.holds_codes else f"codes from {self.written.name if self.written else '?'}"
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"QuantizedWeight({tuple(self.shape)}, {self.bits} bits, group {self.group_size}, {grid}, {how})"
        )

    def dequantize(self) -> Tensor:
        *lead, out_f, in_f = self.shape
        g = self.group_size or in_f
        q = self.q.to(torch.float32, copy=True).view(*lead, out_f, in_f // g, g)  # new: in place below
        return q.sub_(self.zero.unsqueeze(-1)).mul_(self.scale.unsqueeze(-1)).view(*lead, out_f, in_f)

    def split(self) -> list[QuantizedWeight]:
        """One result per weight of a stacked ``q`` [L, out, in]: the codes are views of the stack (every
        format packs them anew; without codes, each reads its part of the stacked ``Ŵ``), the scales and
        zeros are copied so that each owns its storage (a checkpoint writer refuses tensors that share
        memory)."""
        keep = (self.bits, self.group_size, self.symmetric)
        if self._codes is None:
            assert self.written is not None
            at = self.written
            parts = zip(self.scale, self.zero, strict=True)
            return [
                QuantizedWeight(None, s.clone(), z.clone(), *keep, at.part(j))
                for j, (s, z) in enumerate(parts)
            ]
        trio = zip(self._codes, self.scale, self.zero, strict=True)
        return [QuantizedWeight(q, s.clone(), z.clone(), *keep) for q, s, z in trio]

    def to(self, device: torch.device) -> QuantizedWeight:
        """This result with its grid (and codes, where it holds them) on ``device``; a codes-free result
        keeps reading its codes from where its ``Ŵ`` was written."""
        codes = self._codes.to(device) if self._codes is not None else None
        keep = (self.bits, self.group_size, self.symmetric, self.written)
        return QuantizedWeight(codes, self.scale.to(device), self.zero.to(device), *keep)

    @property
    def integer_zero(self) -> bool:
        return bool(torch.equal(self.zero, self.zero.round()))

    def written_to(self, source: Source, name: str, scales_ok: bool | None = None) -> QuantizedWeight:
        """This result once its ``Ŵ`` is written at ``source`` (tensor ``name``): without codes where the
        rule makes them recoverable (:func:`exact_dtype` for the written dtype; :func:`exact_scales`,
        computed here, a device sync, unless ``scales_ok`` is given: ``True`` leaves the check to the first
        read), else with them (recovered now from where ``Ŵ`` is if this result holds none: a float32
        stack)."""
        dtype = _tensor(source).dtype
        keep = not exact_dtype(self.bits, self.symmetric, dtype)
        if not keep:
            keep = not (bool(exact_scales(self, dtype)) if scales_ok is None else scales_ok)
        grid = (self.scale, self.zero, self.bits, self.group_size, self.symmetric)
        if keep:
            return self if self.holds_codes else QuantizedWeight(self.q, *grid)
        return QuantizedWeight(None, *grid, WrittenAt(source, dtype, name))


def written(results: Sequence[C], places: Sequence[tuple[Source, str]], check: bool = True) -> list[C]:
    """``results`` once each one's ``Ŵ`` is written at its place (``(source, name)``): every
    :class:`QuantizedWeight` through :meth:`~QuantizedWeight.written_to` (others as they are), the scales of
    all checked with one host sync (``check=False``: each at its first read instead, no sync here)."""
    quantized = {j: r for j, r in enumerate(results) if isinstance(r, QuantizedWeight)}
    ok: dict[int, bool | None] = dict.fromkeys(quantized, None if check else True)
    if check and quantized:
        flags = [exact_scales(qw, _tensor(places[j][0]).dtype) for j, qw in quantized.items()]
        ok = {j: bool(v) for j, v in zip(quantized, torch.stack(flags).tolist(), strict=True)}
    out = list(results)
    for j, qw in quantized.items():
        out[j] = cast(C, qw.written_to(*places[j], scales_ok=ok[j]))
    return out


def _tensor(source: Source) -> Tensor:
    return source() if callable(source) else source


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def reach(bits: int, symmetric: bool) -> int:
    """``K``, the largest ``|q − z|`` on the grid: ``2^(b−1)`` symmetric, ``2^b − 1`` asymmetric."""
    return 1 << (bits - 1) if symmetric else qmax(bits)


def exact_dtype(bits: int, symmetric: bool, dtype: torch.dtype) -> bool:
    """Whether codes are recoverable from ``Ŵ`` written in ``dtype`` whatever the data (normal range):
    ``K (u / (1 + u) + 2^-22) < 1/2`` (module docstring)."""
    if not dtype.is_floating_point:
        return False
    u = torch.finfo(dtype).eps / 2
    return reach(bits, symmetric) * (u / (1 + u) + 2**-22) < 0.5


def exact_scales(qw: _Fields, dtype: torch.dtype) -> Tensor:
    """Whether every group of ``qw`` keeps ``s · k`` where the rule holds for ``dtype`` (a 0-d bool tensor on
    the scales' device, no host sync): ``s ≥ 8h`` (``h``: half ``dtype``'s smallest subnormal; 0 for a dtype
    that holds every float32), ``s · K`` below the largest finite value of ``dtype`` and of float32, and
    integer zero points in ``[0, 2^b − 1]``. ``s = 0``, NaN or infinite fails."""
    fi = torch.finfo(dtype)
    floor = 0.0 if fi.bits >= 32 else 4 * fi.smallest_normal * fi.eps  # 8h, h = smallest subnormal / 2
    top = min(fi.max, torch.finfo(torch.float32).max)
    s = qw.scale.double()  # exact, no overflow of s · K
    ok = ((s >= floor) & (s > 0) & (s * reach(qw.bits, qw.symmetric) < top)).all()
    z = qw.zero
    return ok & ((z == z.round()) & (z >= 0) & (z <= qmax(qw.bits))).all()


def recover_codes(W_hat: Tensor, grid: _Fields, dtype: torch.dtype, name: str) -> Tensor:
    """The codes [..., out, in] (uint8) of ``grid``'s scales and zeros whose ``Ŵ`` is ``W_hat`` (written in
    ``dtype``; read in another it must hold the same values): ``q = clamp(round(fl32(Ŵ) / s) + z, 0,
    2^b − 1)`` per group, :data:`RECOVER_ELEMENTS` weights at a time, verified: ``fl_dtype((q − z) s)``
    must equal ``Ŵ`` (bit for bit but for the sign of zero). Raises :class:`WeightsmithError` naming
    ``name`` where the rule does not make the codes exact or ``Ŵ`` is not the grid's (changed after
    compression)."""
    bits, sym = grid.bits, grid.symmetric
    why = None
    if not exact_dtype(bits, sym, dtype):
        why = f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes are not exact in {dtype}"
    elif not bool(exact_scales(grid, dtype)):
        why = f"its scales leave the range where {dtype} keeps every code exact (underflow or overflow)"
    if why is not None:
        raise WeightsmithError(f"'{name}': cannot recover the quantisation codes from the weight: {why}")
    Wd = W_hat.detach().to(dtype)
    wider = torch.promote_types(W_hat.dtype, dtype) == W_hat.dtype  # holds every value of dtype
    if W_hat.dtype != dtype and not (wider and torch.equal(Wd.to(W_hat.dtype), W_hat)):
        raise WeightsmithError(
            f"'{name}': the weight is now {W_hat.dtype} and no longer holds the {dtype} values it was "
            "quantised to; its codes cannot be recovered (save before changing the model's dtype)"
        )
    *lead, out_f, in_f = Wd.shape
    g = grid.group_size or in_f
    rows = Wd.reshape(-1, in_f)
    # the grid may live elsewhere than Ŵ (a host model quantised on a GPU): recovered where Ŵ is
    scale = grid.scale.to(Wd.device).reshape(-1, in_f // g, 1)
    zero = grid.zero.to(Wd.device).reshape(-1, in_f // g, 1)
    if scale.shape[0] != rows.shape[0]:
        raise WeightsmithError(f"'{name}': the weight {tuple(Wd.shape)} does not match its scales")
    q = torch.empty(rows.shape, dtype=torch.uint8, device=Wd.device)
    bad = torch.zeros((), dtype=torch.bool, device=Wd.device)
    step = max(1, RECOVER_ELEMENTS.get(Wd.device.type, RECOVER_ELEMENTS_ELSEWHERE) // in_f)
    for r in range(0, rows.shape[0], step):
        w = rows[r : r + step]
        s, z = scale[r : r + step], zero[r : r + step]
        c = w.float().reshape(-1, in_f // g, g).div(s).round_().add_(z).clamp_(0, qmax(bits))
        back = (c - z).mul_(s).view(-1, in_f).to(dtype)
        bad |= (back != w).any()  # as numbers: NaN never matches; ±0 do (module docstring)
        q[r : r + step] = c.view(-1, in_f)
    if bool(bad):
        raise WeightsmithError(
            f"'{name}': the weight no longer holds the quantised values it was written with (changed after "
            "compression?); its codes cannot be recovered. Save the compressed model before changing it"
        )
    return q.view(*lead, out_f, in_f)


def check_bits(bits: int, option: str = "--bits") -> None:
    if not 2 <= int(bits) <= 8:
        raise WeightsmithError(f"{option} {bits}: weight quantisation supports 2 to 8 bits")


def grouped(W: Tensor, group_size: int) -> Tensor:
    """``W`` [..., out, in] as [..., out, groups, group_size] (``group_size = 0``: one group of ``in``)."""
    *lead, out_f, in_f = W.shape
    g = group_size or in_f
    if in_f % g:
        raise WeightsmithError(f"group size {g} does not divide the input size {in_f}")
    return W.reshape(*lead, out_f, in_f // g, g)


def minmax_params(Wg: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [..., groups] from the range of each group of ``Wg`` [..., groups, g]."""
    # min and max are exact, so both ways give the same values: one pass on CUDA; on the CPU, where aminmax
    # is not vectorised (about 7 times slower than amax + amin on one thread), two
    lo, hi = torch.aminmax(Wg, dim=-1) if Wg.is_cuda else (Wg.amin(-1), Wg.amax(-1))
    hi, lo = hi.clamp_min(0), lo.clamp_max(0)
    if symmetric:
        scale = torch.maximum(hi, -lo) / (qmax(bits) / 2)
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero group: any scale; 1 (NaN too)
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    scale = (hi - lo) / qmax(bits)
    scale = torch.where(scale > 0, scale, 1.0)
    zero = (-lo / scale).round().clamp(0, qmax(bits))
    return scale, zero


def codes(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / s + z), 0, 2^b − 1) for ``Wg`` [..., groups, g] (float; ``z`` may be real)."""
    c = Wg / scale.unsqueeze(-1)
    return c.add_(zero.unsqueeze(-1)).round_().clamp_(0, qmax(bits))  # in place: the same roundings


def fake_quant(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """s (q − z): the grid value nearest to each weight of ``Wg`` [..., groups, g]."""
    return codes(Wg, scale, zero, bits).sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))


def quantize_rtn(W: Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of every group of ``W`` [..., out, in]."""
    return rtn_with_dequant(W, bits, group_size, symmetric, dequant=False)[0]


def rtn_with_dequant(
    W: Tensor, bits: int, group_size: int, symmetric: bool, dequant: bool = True, keep_codes: bool = True
) -> tuple[QuantizedWeight, Tensor | None]:
    """:func:`quantize_rtn` and, if ``dequant``, ``Ŵ = s (q − z)`` [..., out, in] in float32 taken from the
    float codes before they become uint8 (bit-identical to :meth:`QuantizedWeight.dequantize`: the codes are
    small integers, exact in both types; it saves a uint8 → float32 pass). ``keep_codes=False`` (with
    ``dequant``): no uint8 codes at all; the result recovers them from the returned float32 ``Ŵ`` (exact
    for every width, module docstring) until :meth:`QuantizedWeight.written_to` points it at the model."""
    Wg = grouped(W.float(), group_size)
    scale, zero = minmax_params(Wg, bits, symmetric)
    c = codes(Wg, scale, zero, bits)
    q = c.to(torch.uint8).reshape(W.shape) if keep_codes or not dequant else None
    if not dequant:
        return QuantizedWeight(q, scale, zero, bits, group_size, symmetric), None
    W_hat = c.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).reshape(W.shape)
    at = None if keep_codes else WrittenAt(W_hat, torch.float32, "the float32 Ŵ")
    return QuantizedWeight(q, scale, zero, bits, group_size, symmetric, at), W_hat
