"""RTN: round-to-nearest weight quantisation, the data-free baseline every other method is compared to.

Each group of ``group_size`` weights of a row is mapped to ``q = clamp(round(w / s + z), 0, 2^b − 1)`` on
its min-max grid and read back as ``ŵ = s (q − z)`` ("Quantizing deep convolutional networks for efficient
inference: A whitepaper", Krishnamoorthi, 2018, eq. 2-4); symmetric grids fix ``z = 2^(b−1)``. Every step is
per group, so a stack of same-shaped weights is quantised in one go (:meth:`RTN.batched_quantize`), and on
CUDA a run of same-shaped weights in one fused Triton kernel launch, in place (:meth:`RTN.fused_quantize`).
Those two keep no codes: they are recovered from the written ``Ŵ`` when saved (compress/_grid.py, "Codes
recovered from the written weight", and docs/compress-rtn-memory.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import InputStats
from ._core import CompressConfig
from ._grid import QuantizedWeight, quantize_rtn, rtn_with_dequant


@register_config("rtn", kind="compress")
class RTN(CompressConfig):
    """Round-to-nearest on the min-max grid (symmetric or asymmetric, per-channel or group-wise).
    ``kernel``: on CUDA, "auto" (the fused kernel where it pays its start-up, else the torch batches:
    compress/_rtn_choice.py), "triton" (the kernel) or "torch" (the batches); the results are the same bits
    either way. ``triton`` or ``torch`` here overrides ``$WEIGHTSMITH_RTN_KERNEL``."""

    kernel: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        from ._rtn_choice import MODES

        if self.kernel not in MODES:
            raise WeightsmithError(f"RTN option kernel={self.kernel!r}: use one of {', '.join(MODES)}")

    def quantize(self, W: Tensor, stats: InputStats | None) -> QuantizedWeight:
        return quantize_rtn(W, self.bits, self.group_size, self.symmetric)

    def batched_quantize(self, W: Tensor) -> tuple[list[QuantizedWeight], Tensor]:
        """A stack ``[L, out, in]`` of float32 weights at once: one result a weight (bit-identical to
        :meth:`quantize` on each) and the stacked ``Ŵ`` (the data-free path's batches,
        compress/_datafree.py). No uint8 codes are made: each result recovers its codes from its part of
        the float32 ``Ŵ`` until the caller writes it and points the result at the layer
        (:meth:`~._grid.QuantizedWeight.written_to`)."""
        qw, W_hat = rtn_with_dequant(W, self.bits, self.group_size, self.symmetric, keep_codes=False)
        assert W_hat is not None
        return qw.split(), W_hat

    def fused_quantize(self, Ws: Sequence[Tensor]) -> tuple[list[QuantizedWeight], Tensor]:
        """The layers' own weights ``Ws`` (one shape; each [out, in], float32, bfloat16 or float16,
        contiguous, on a CUDA device) in one Triton kernel launch that overwrites each with its ``Ŵ``
        (compress/_rtn_triton.py): one result each, with codes, scales, zeros and ``Ŵ`` bit-identical to
        :meth:`batched_quantize`, and their ``‖W − Ŵ‖_F / ‖W‖_F`` as a tensor [L] (the data-free path's
        choice on CUDA, compress/_datafree.py). The kernel writes no codes where they are recoverable from
        ``Ŵ`` in the weights' dtype (:func:`~._grid.exact_dtype`): the results then read them from ``Ws``."""
        from ._rtn_triton import rtn_fused  # imports Triton: only when used

        return rtn_fused(Ws, self.bits, self.group_size, self.symmetric)
