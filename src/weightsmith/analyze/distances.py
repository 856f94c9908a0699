"""Layer-by-layer distances between two models, as WeightWatcher 0.7.x's ``distances()`` reports them.

For every layer both models share (the layers ``analyze`` reads: 2-D weights, Conv1d and Conv2d
kernels with at least 8 eigenvalues), ``method`` is one of

- ``raw``: ``delta_W = ||W_1 - W_2||_F`` over the whole tensor, and ``delta_b = ||b_1 - b_2||_2`` for the
  bias of a 2-D layer (WeightWatcher reads no bias for convolutions; 0 where there is none);
- ``euclidean``: the mean of ``||W_1,i - W_2,i||_F`` over the layer's matrices (Conv2d: its kernel-position
  slices, ``conv.conv_slices``);
- ``cka``: the mean over the layer's matrices of the uncentred linear CKA-style overlap
  ``||W_1^T W_2||_F / sqrt(||W_1^T W_1||_F ||W_2 W_2^T||_F)`` (Kornblith et al., "Similarity of neural
  network representations revisited", ICML 2019, eq. for linear CKA, here applied to the weights
  themselves and without centring, as WeightWatcher does).

``M`` and ``N`` are the smallest and largest sides of the tensor (raw) or of its first matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..select import Selector
from ..store import WeightStore
from .batches import candidate_matrices
from .conv import conv_slices
from .frame import layer_name

METHODS = ("raw", "euclidean", "cka")
CKA_EPS = 1e-6  # added to a near-zero CKA denominator, as WeightWatcher does


def _matrices(W: Tensor) -> list[Tensor]:
    if W.dim() == 4:
        s = W.shape
        last = s[0] + s[1] >= s[2] + s[3]
        return [w.T if (w.shape[0] < w.shape[1] if last else w.shape[1] < w.shape[0]) else w
                for w in conv_slices(W)]  # fmt: skip
    return [W]


def matrix_distance(W1: Tensor, W2: Tensor, method: str) -> float:
    """``||W1 - W2||_F`` (``raw``/``euclidean``) or the uncentred CKA overlap (``cka``), in float64."""
    a, b = W1.double(), W2.double()
    if method in ("raw", "euclidean"):
        return float(torch.linalg.vector_norm(a - b))
    if a.dim() != 2:
        raise WeightsmithError(
            f"cka distance needs matrices, got a {a.dim()}-D tensor of shape {list(a.shape)}"
        )
    num = float(torch.linalg.matrix_norm(a.T @ b))
    norm = math.sqrt(float(torch.linalg.matrix_norm(a.T @ a)) * float(torch.linalg.matrix_norm(b @ b.T)))
    return num / (norm + CKA_EPS if norm < CKA_EPS else norm)


def distances(
    model_1: WeightStore, model_2: WeightStore, method: str = "raw", select: Selector | str | None = None
) -> tuple[float, float, Any]:
    """``(mean delta_W, mean delta_b, per-layer DataFrame)`` as WeightWatcher's ``distances``.

    The DataFrame has WeightWatcher's columns ``method, name, delta_W, delta_b, M, N, b_shape, longname``
    indexed by ``layer_id`` (from 1). A layer of ``model_1`` missing from ``model_2`` or shaped
    differently raises ``WeightsmithError`` naming the tensor.
    """
    import pandas as pd

    method = (method or "raw").lower()
    if method not in METHODS:
        raise WeightsmithError(f"distance method must be one of {METHODS}, got {method!r}")
    names, _ = candidate_matrices(model_1, select, kernels=True)
    rows = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n not in model_2:
                raise WeightsmithError(f"tensor {n!r} of {model_1.source} is missing from {model_2.source}")
            W1, W2 = model_1[n], model_2[n]
            if W1.shape != W2.shape:
                raise WeightsmithError(f"tensor {n!r} differs in shape: {list(W1.shape)} vs {list(W2.shape)}")
            row: dict[str, Any] = {"layer_id": i + 1, "method": method, "name": layer_name(n)}
            bias = layer_name(n) + ".bias"
            if method == "raw":
                row["delta_W"] = matrix_distance(W1, W2, method)
                row["delta_b"], row["b_shape"] = 0.0, "unknown"
                if W1.dim() == 2 and bias in model_1 and bias in model_2:
                    b1, b2 = model_1[bias], model_2[bias]
                    if b1.shape == b2.shape:
                        row["delta_b"], row["b_shape"] = matrix_distance(b1, b2, method), tuple(b1.shape)
                row["M"], row["N"] = min(W1.shape), max(W1.shape)
            else:
                m1, m2 = _matrices(W1), _matrices(W2)
                d = sum(matrix_distance(a, b, method) for a, b in zip(m1, m2, strict=True))
                row["delta_W"], row["delta_b"], row["b_shape"] = d / len(m1), 0.0, "unknown"
                row["M"], row["N"] = min(m1[0].shape), max(m1[0].shape)
            row["longname"] = layer_name(n)
            rows.append(row)
    cols = ["layer_id", "method", "name", "delta_W", "delta_b", "M", "N", "b_shape", "longname"]
    frame = pd.DataFrame(rows, columns=cols).set_index("layer_id")
    mean = lambda c: float(frame[c].mean()) if len(frame) else math.nan  # noqa: E731
    return mean("delta_W"), mean("delta_b"), frame
