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
from ._tensorwise import Gen, OnBaseMethod, work_dtype


def model_stock(base: Tensor, thetas: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock interpolation of one tensor between the base and the mean of ``thetas``."""
    dt = work_dtype(base)
    shape = base.shape
    if filter_wise:
        w0 = base.to(dt) if base.dim() > 1 else base.to(dt).unsqueeze(0)
        ws = [t.to(dt).reshape(w0.shape) for t in thetas]
    else:
        w0 = base.to(dt).reshape(-1)
        ws = [t.to(dt).reshape(-1) for t in thetas]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    mean = torch.stack(ws).sum(dim=0) / n
    return (t * mean + (1 - t) * w0).reshape(shape)


@register_config("model_stock", kind="merge")
class ModelStock(OnBaseMethod):
    """Model Stock (Jang et al. 2024): at least two fine-tuned models and their pre-trained base."""

    filter_wise: bool = False

    min_models = 2

    def merge_on(self, base: Tensor, thetas: Sequence[Tensor], weights: list[float], gen: Gen) -> Tensor:
        return model_stock(base, thetas, self.filter_wise)
