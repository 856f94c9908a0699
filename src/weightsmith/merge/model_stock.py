"""Model Stock (mergekit's ``model_stock``).

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
arXiv:2403.19522, Eq. 5-6: with N fine-tuned weights w_i around the pre-trained w_0 and cos(theta) the
mean pairwise cosine of their offsets w_i - w_0, the merged weight is

    w_H = t * (1/N) sum_i w_i + (1 - t) * w_0,    t = N cos(theta) / (1 + (N - 1) cos(theta)).

The angle is taken over the whole tensor, or per output row with ``filter_wise``. Where the denominator
vanishes (|1 + (N-1) cos| < 1e-6) the base is kept; norms are clamped at 1e-6 in the cosines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import register_config
from ._tensorwise import (
    Gen,
    PiecewiseOnBaseMethod,
    as_work,
    blocks,
    inputs_owned,
    scratch,
    tensor_scratch,
    work_dtype,
    writable_into,
    write_piece_size,
)


def _gram(w0: Tensor, ws: Sequence[Tensor], dt: torch.dtype, total: Tensor) -> Tensor:
    """Per row of ``w0`` ([rows, cols]), the float64 Gram matrix of the ``dt`` offsets w_i - w_0, each
    piece's product added in float64; ``total`` ([rows, cols], ``dt``) receives the sum of the offsets, so
    the write pass reads the fine-tunes no second time (the piece scratch is freed on return)."""
    n = len(ws)
    buf = scratch(w0, dt, n + 1)
    size = buf.numel() // (n + 1)
    gram = torch.zeros(w0.shape[0], n, n, dtype=torch.float64, device=w0.device)
    for rows, cs in blocks(w0.shape[0], w0.shape[1], w0.device):
        b = as_work(w0[rows, cs], buf[:size])
        offsets = buf[size : size * (1 + n)].view(n, -1)[:, : b.numel()].view(n, *b.shape)
        for i, w in enumerate(ws):
            if w.dtype == dt:
                torch.sub(w[rows, cs], b, out=offsets[i])
            else:  # widened exactly by a vectorised copy, then subtracted in float32 (a mixed-dtype
                offsets[i].copy_(w[rows, cs]).sub_(b)  # subtraction takes a slower path: same values)
        if offsets.shape[1] == 1:  # one row: a plain matrix product (the same sgemm, less dispatch)
            gram[rows] += torch.mm(offsets[:, 0], offsets[:, 0].t()).double()
        else:
            gram[rows] += torch.einsum("nrc,mrc->rnm", offsets, offsets).double()
        torch.sum(offsets, dim=0, out=total[rows, cs])
    return gram


def model_stock(
    base: Tensor,
    thetas: Sequence[Tensor],
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
    into_base: bool = False,
) -> Tensor:
    """Model Stock interpolation of one tensor between the base and the mean of ``thetas``, in float32
    (float64 for float64 inputs), or rounded to ``out_dtype`` piece by piece (the same values as
    ``.to(out_dtype)``).

    Two passes over pieces (:func:`~._tensorwise.blocks`) of the tensor as rows (one row, or with
    ``filter_wise`` one per output row): the first folds the Gram matrix of the float32 offsets
    w_i - w_0 of each row (each piece's product added in float64) and keeps their sum, the second
    (elementwise: on a GPU in smaller pieces, see :func:`~._tensorwise.write_piece_size`) writes
    w_0 + (t / n) sum_i (w_i - w_0), reading only the base: each fine-tune is read once. Tensor-sized: the
    result, and for an output dtype other than the work dtype a work-dtype sum of the offsets (a
    :func:`~._tensorwise.tensor_scratch`, kept from one weight to the next within a merge run).
    ``into_base``: write the result into ``base``'s buffer when it is contiguous, has the result's dtype
    and shares no storage with a fine-tune (each piece of the base is read before it is overwritten)."""
    dt = work_dtype(base)
    n = len(thetas)
    cols = base.shape[-1] if filter_wise and base.dim() > 0 else max(base.numel(), 1)
    w0 = base.reshape(-1, cols)
    ws = [t.reshape(w0.shape) for t in thetas]
    target = out_dtype or dt
    reuse = into_base and writable_into(base, target, thetas)
    out = w0 if reuse else torch.empty(w0.shape, dtype=target, device=w0.device)
    # Σ_i (w_i - w_0) in the work dtype: in the output itself when it has that dtype and is not the base
    in_out = out.dtype == dt and not reuse
    total = out if in_out else tensor_scratch("model_stock.total", w0.shape, dt, w0.device)
    gram = _gram(w0, ws, dt, total)
    norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()
    i, j = torch.triu_indices(n, n, 1, device=w0.device)
    cosines = (gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
    cos = cosines.mean(dim=1, keepdim=True).to(dt)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    # w_H = t mean_i(w_i) + (1 - t) w_0 = w_0 + (t / n) Σ_i (w_i - w_0)
    step = write_piece_size(w0.device)
    for rows, cs in blocks(w0.shape[0], cols, w0.device, step):
        b = w0[rows, cs]  # added as it is: a bf16 base is widened exactly inside the addition
        tr = t[rows] / n
        if in_out:
            out[rows, cs].mul_(tr).add_(b)
        else:
            out[rows, cs].copy_(torch.mul(total[rows, cs], tr, out=total[rows, cs]).add_(b))
    return out.reshape(base.shape)


@register_config("model_stock", kind="merge")
class ModelStock(PiecewiseOnBaseMethod):
    """Model Stock (Jang et al. 2024): at least two fine-tuned models and their pre-trained base."""

    filter_wise: bool = False

    min_models = 2

    def merge_on_as(
        self,
        base: Tensor,
        thetas: Sequence[Tensor],
        weights: list[float],
        gen: Gen,
        dtype: torch.dtype | None,
    ) -> Tensor:
        return model_stock(base, thetas, self.filter_wise, out_dtype=dtype, into_base=inputs_owned())
