"""Passthrough (mergekit's ``passthrough``): copy one model's tensor, optionally times ``scale``.

With ``slices:`` this is how frankenmerges stack layer ranges of several models into a deeper model
(e.g. Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models", EMNLP 2024
Industry, arXiv:2403.13257, Sec. 3): the layer plan is :mod:`weightsmith.merge.slices`; per tensor the
method is the identity times a per-input ``scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import Gen, TensorwiseMethod, Weights, work_dtype


@register_config("passthrough", kind="merge")
class Passthrough(TensorwiseMethod):
    """The single input tensor times ``scale`` (``None``: unchanged, in the input's dtype)."""

    scale: float | None = None

    base_policy = "none"
    min_models = 1
    max_models = 1

    def __post_init__(self) -> None:
        if self.scale is not None and (
            isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
        ):
            raise WeightsmithError(f"passthrough option scale={self.scale!r:.80}: must be a number")

    def merge(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: Weights = None, generator: Gen = None
    ) -> Tensor:
        if base is not None:
            thetas = [base, *thetas]
        if len(thetas) != 1:
            raise WeightsmithError(f"merge method 'passthrough' takes exactly one model (got {len(thetas)})")
        x = thetas[0]
        return x if self.scale is None else x.to(work_dtype(x)) * self.scale
