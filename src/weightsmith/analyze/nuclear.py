"""Matrix Nuclear-Norm (MNN) of a language model's last hidden states on a text.

Li, Wei, Zhang, Chen, Liu, Huang, ... & Chang, "Large Language Model Evaluation via Matrix Nuclear-Norm",
arXiv:2410.10672 (2024; Findings of EMNLP 2025). For the L x d matrix R of last hidden states of a
sequence: centre the columns (subtract the mean token representation), scale every row to unit L2 norm,
and replace the nuclear norm ``||R||_* = sum sigma_i`` by the sum of the D = min(L, d) largest column
L2 norms (an SVD-free surrogate). The authors' script reports that sum divided by the sequence length L;
so do we. A long text is cut into consecutive windows of ``max_tokens`` tokens; the score is the mean
over windows (each window is one forward pass, as each response is in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def normalize_rows(R: Tensor) -> Tensor:
    """Centre the columns of ``R`` (L, d) and scale each row to unit L2 norm (zero rows stay zero)."""
    R = R.to(torch.float64)
    R = R - R.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(R, dim=1, keepdim=True)
    return R / norms.clamp_min(torch.finfo(R.dtype).tiny)


def matrix_nuclear_norm(R: Tensor, D: int | None = None) -> float:
    """Sum of the ``D`` (default min(L, d)) largest column L2 norms of the row-normalised ``R``."""
    X = normalize_rows(R)
    if D is None:
        D = min(X.shape)
    col = torch.linalg.vector_norm(X, dim=0)
    return float(torch.sort(col, descending=True).values[:D].sum())


def last_hidden_states(model: Any, input_ids: Tensor) -> Tensor:
    """The (L, d) last hidden states of the base transformer (after its final norm) for one sequence."""
    base = getattr(model, "base_model", model)
    with torch.no_grad():
        out = base(input_ids=input_ids)
    return out[0][0]


def text_mnn(
    model: Any, tokenizer: Any, text: str, max_tokens: int = 512, max_windows: int | None = 8
) -> dict[str, Any]:
    """MNN / L of the model's last hidden states on ``text``, averaged over token windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("the text has no tokens")
    windows = [ids[i : i + max_tokens] for i in range(0, ids.numel(), max_tokens)]
    if len(windows) > 1 and windows[-1].numel() < max_tokens // 2:
        windows = windows[:-1]  # a short tail window would weigh as much as a full one
    if max_windows is not None:
        windows = windows[:max_windows]
    device = next(model.parameters()).device
    scores = []
    for w in windows:
        R = last_hidden_states(model, w[None, :].to(device))
        scores.append(matrix_nuclear_norm(R) / w.numel())
    return {
        "mnn": sum(scores) / len(scores),
        "windows": len(scores),
        "tokens": int(sum(w.numel() for w in windows)),
        "per_window": scores,
    }
