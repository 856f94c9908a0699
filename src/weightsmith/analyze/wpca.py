"""W-PCA: a training-free, gradient-free score of an untrained architecture.

Wang et al., "W-PCA Based Gradient-Free Proxy for Efficient Search of Lightweight Language Models",
ICLR 2025 (arXiv:2504.15983). For each feed-forward (FFN) block ``FFN(X) = act(X W1 + b1) W2 + b2`` the
hidden states ``H = X W1 + b1`` of a minibatch (tokens as rows) are centred, their covariance
``C = H_c^T H_c / (rows - 1)`` is diagonalised, and

    PCA_dim(H, eta) = min { k : sum_{i<=k} lambda_i / sum_i lambda_i >= eta }        (lambda descending)

counts the principal components needed for a share ``eta`` of the variance. The proxy is

    W-PCA = #params * sum_{FFN blocks l} PCA_dim(H_l, eta),

one forward pass of a freshly initialised network, no gradient; architectures are ranked by it (the
paper reports the product ranking better than either factor alone). ``rank_correlation`` gives the
Spearman and Kendall (tau-b) rank correlations used to judge such a proxy against trained accuracy.

The FFN blocks of a ``zoo.MLP`` are its hidden Linear layers (each followed by ReLU); in a transformer,
the Linear layers named ``*.intermediate.dense``, ``*.mlp.fc1`` or ``*.mlp.up_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError

FFN_SUFFIXES = (".intermediate.dense", ".mlp.fc1", ".mlp.up_proj")
DEFAULT_ETA = 0.99


@dataclass(frozen=True)
class WPCAScore:
    params: int  # trainable parameters
    pca_dims: dict[str, int]  # PCA_dim of each FFN block's hidden states
    pca: int  # their sum
    score: float  # params * pca


def pca_dim(H: Tensor, eta: float = DEFAULT_ETA) -> int:
    """Principal components of the rows of ``H`` (rows x features) needed for a variance share ``eta``."""
    if not 0.0 < eta <= 1.0:
        raise WeightsmithError(f"eta {eta}: the variance share must be in (0, 1]")
    X = H.reshape(-1, H.shape[-1]).to(torch.float64)
    X = X - X.mean(0, keepdim=True)
    lam = torch.linalg.svdvals(X) ** 2  # eigenvalues of the covariance, up to 1 / (rows - 1)
    total = lam.sum()
    if float(total) <= 0:
        return 0
    share = torch.cumsum(lam, 0) / total
    return int((share < eta - 1e-12).sum()) + 1


def ffn_layers(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose outputs are FFN hidden states (``X W1 + b1``)."""
    from ..zoo import MLP

    if isinstance(model, MLP):
        return model.linear_names()[:-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(FFN_SUFFIXES)]


@torch.no_grad()
def wpca_score(
    model: nn.Module, x: Tensor | dict[str, Tensor], eta: float = DEFAULT_ETA, layers: list[str] | None = None
) -> WPCAScore:
    """W-PCA of ``model`` on the minibatch ``x`` (a tensor, or keyword inputs of a Hugging Face model)."""
    names = ffn_layers(model) if layers is None else layers
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing or not names:
        raise WeightsmithError(
            f"W-PCA needs FFN Linear layers; {'none found' if not names else f'not Linear layers: {missing}'}"
        )
    hidden: dict[str, Tensor] = {}
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: hidden.__setitem__(n, out.detach()))
        for n in names
    ]
    was_training = model.training
    model.eval()
    try:
        model(**x) if isinstance(x, dict) else model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    dims = {n: pca_dim(hidden[n], eta) for n in names}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pca = sum(dims.values())
    return WPCAScore(params=params, pca_dims=dims, pca=pca, score=float(params * pca))


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), from 1."""
    order = torch.argsort(v, stable=True)
    s = v[order]
    ranks = torch.empty_like(v)
    i, n = 0, len(v)
    while i < n:
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(a: list[float] | Tensor, b: list[float] | Tensor) -> dict[str, float]:
    """Spearman's rho (Pearson correlation of average ranks) and Kendall's tau-b of two sequences."""
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1 or len(x) < 2:
        raise WeightsmithError("rank_correlation needs two 1-D sequences of the same length >= 2")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    rho = float((rx * ry).sum() / torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    iu = torch.triu_indices(len(x), len(x), 1)
    sx, sy = dx[iu[0], iu[1]], dy[iu[0], iu[1]]
    tau = float((sx * sy).sum() / torch.sqrt((sx != 0).sum() * (sy != 0).sum()))
    return {"spearman": rho, "kendall": tau}
