"""Convolution kernels as WeightWatcher analyses them: per-kernel-position matrices, one pooled ESD.

Martin & Mahoney, "Implicit self-regularization in deep neural networks: evidence from random matrix
theory and implications for learning", JMLR 22, 2021 (arXiv:1810.01075), section 4: a Conv2d kernel of
shape ``(c_out, c_in, k_h, k_w)`` is read as ``rf = k_h * k_w`` matrices ``W_ij = K[:, :, i, j]`` of
shape ``c_out x c_in``, and the layer's ESD is the union of their eigenvalues (``M * rf`` of them for
``N x M`` slices, ``N >= M``). WeightWatcher 0.7.x scales each slice by ``sqrt(1/2)`` (its default
``conv2d_norm``), so every pooled eigenvalue is halved: ``lambda = sigma_i(W_ij)^2 / 2``. A kernel whose
last two sides are the larger (``k_h + k_w > c_out + c_in``, channels-first storage) is sliced over its
first two axes instead.

A Conv1d kernel ``(c_out, c_in, k)`` is one 3-D array to WeightWatcher: its SVD runs over the
``c_in x k`` matrix of each output channel and only the ``M = min(c_out, c_in, k)`` largest squared
singular values of all of them are kept (``N = max(c_out, c_in, k)``). It is read the same way here so
the numbers agree; with WeightWatcher's ``min_evals = 8`` a Conv1d with ``k < 8`` is not analysed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .spectrum import esd

CONV2D_NORM = 0.5  # WeightWatcher scales each Conv2d slice by sqrt(1/2): eigenvalues by 1/2


@dataclass(frozen=True)
class LayerShape:
    """How WeightWatcher sees a weight: matrix sides ``N >= M``, receptive field and ESD length."""

    layer_type: str  # "dense", "conv1d" or "conv2d"
    N: int
    M: int
    rf: int

    @property
    def num_evals(self) -> int:
        return self.M * self.rf

    @property
    def Q(self) -> float:
        return self.N / self.M


def layer_shape(shape: tuple[int, ...] | list[int] | torch.Size) -> LayerShape | None:
    """The WeightWatcher view of a 2-D, 3-D (Conv1d) or 4-D (Conv2d) weight; None for other ranks."""
    s = tuple(int(d) for d in shape)
    if len(s) == 2:
        return LayerShape("dense", max(s), min(s), 1)
    if len(s) == 3:
        return LayerShape("conv1d", max(s), min(s), 1)
    if len(s) == 4:
        a, b, i, j = s if s[0] + s[1] >= s[2] + s[3] else (s[2], s[3], s[0], s[1])
        return LayerShape("conv2d", max(a, b), min(a, b), i * j)
    return None


def conv_slices(K: Tensor) -> Tensor:
    """The ``(rf, a, b)`` per-kernel-position matrices of a Conv2d kernel (views, no copy)."""
    s = K.shape
    if s[0] + s[1] >= s[2] + s[3]:  # (c_out, c_in, k_h, k_w): PyTorch's layout
        return K.permute(2, 3, 0, 1).reshape(s[2] * s[3], s[0], s[1])
    return K.reshape(s[0] * s[1], s[2], s[3])  # (k_h, k_w, c_in, c_out): channels first


def layer_esd(W: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """WeightWatcher's ESD of a dense, Conv1d or Conv2d weight, descending, as ``dtype``.

    Dense: the eigenvalues of ``W^T W``. Conv2d: the pooled, halved eigenvalues of every kernel-position
    slice. Conv1d: the ``min(shape)`` largest squared singular values of the per-output-channel slices.
    """
    if W.dim() == 2:
        return esd(W, dtype)
    if W.dim() == 4:
        ev = esd(conv_slices(W), dtype).flatten() * CONV2D_NORM
        return torch.sort(ev, descending=True).values
    if W.dim() == 3:
        ev = esd(W, dtype).flatten()
        return torch.sort(ev, descending=True).values[: min(W.shape)]
    raise ValueError(f"expected a 2-D, 3-D or 4-D weight, got shape {list(W.shape)}")
