"""Sparse Spectral Training: weights kept as their SVD, every singular value trained, a sampled few singular
vectors trained at a time, the SVD recomputed between rounds.

"Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks", Zhao, Zhang, Li, Liu &
Cannistraci, 2024 (arXiv 2405.15481). Each targeted linear layer becomes

    W = U diag(s) V^T,   y = x V diag(s) U^T + b        (U: m x k, s: k, V^T: k x n, k = min(m, n))

initialised by the SVD of the layer's weight, so the model computes exactly what it did ("zero distortion").
Training runs in rounds of ``update_proj_gap`` steps. At the start of a round ``rank`` indices are drawn
without replacement by multinomial sampling with probabilities proportional to the singular values
``|s_i|``; during the round every ``s_i`` and the sampled columns ``u_i`` of U and rows ``v_i^T`` of V^T are
updated with Adam, the other vectors stay fixed. The singular vectors are updated with the gradient of W
projected on the partner vector, without the factor ``s_i`` that the chain rule puts in front
(``dL/du_i = s_i (dL/dW) v_i``; the paper's "enhanced gradient", Sec. 4.2, as we read it: without it the
directions of small singular values barely move). At the end of a round the layer is re-decomposed,
``U, s, V^T <- svd(U diag(s) V^T)`` (the periodic reinitialisation that keeps U and V orthonormal), and the
vectors' Adam moments start again. Optimizer state: ``2 (k + rank (m + n))`` numbers per layer, against
``2 m n`` for AdamW on W.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import WeightsmithError
from ..select import Selector
from .projection import name_seed


class SpectralLinear(nn.Module):
    """A linear layer stored as its SVD: parameters ``U`` [m, k], ``S`` [k], ``Vh`` [k, n] (and the bias)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        W = linear.weight.detach()
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        self.U = nn.Parameter(U.to(W.dtype))
        self.S = nn.Parameter(S.to(W.dtype))
        self.Vh = nn.Parameter(Vh.to(W.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.Vh) * self.S, self.U, self.bias)

    def weight_matrix(self) -> Tensor:
        """``U diag(s) V^T``."""
        return (self.U * self.S) @ self.Vh

    @torch.no_grad()
    def resvd(self) -> None:
        """Re-decompose the current weight (new orthonormal U, V^T; singular values in descending order)."""
        U, S, Vh = torch.linalg.svd(self.weight_matrix().float(), full_matrices=False)
        self.U.copy_(U)
        self.S.copy_(S)
        self.Vh.copy_(Vh)


def to_spectral(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Replace every ``nn.Linear`` whose weight name ``targets`` selects (globs or ``re:`` patterns) by a
    :class:`SpectralLinear` computing the same function; returns the names of the replaced modules."""
    sel = Selector.of(list(targets))
    hits = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and sel.matches(f"{n}.weight")
    ]
    if not hits:
        sel.require(
            [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)], "linear layers"
        )
    for name, module in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SpectralLinear(module))
    return [n for n, _ in hits]


def _adam(grad: Tensor, m: Tensor, v: Tensor, t: int, b1: float, b2: float, eps: float) -> Tensor:
    """Adam's step direction (Kingma & Ba, 2015) with bias correction; updates ``m`` and ``v`` in place."""
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    return (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt().add_(eps)


class SparseSpectralAdamW(torch.optim.Optimizer):
    """SST on the :class:`SpectralLinear` layers of ``model`` (see the module docstring), AdamW with
    decoupled weight decay on every other trainable parameter. State is tensors and plain values only
    (sampled indices, moments of the sampled vectors, step counters), so it checkpoints like AdamW's."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        rank: int = 64,
        update_proj_gap: int = 200,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise WeightsmithError(f"SST rank must be a positive integer (got {rank!r})")
        if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise WeightsmithError(
                f"SST update_proj_gap must be a positive integer (got {update_proj_gap!r})"
            )
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
        if not self.layers:
            raise WeightsmithError("SST needs SpectralLinear layers: call to_spectral(model, targets) first")
        spectral = [p for _, m in self.layers for p in (m.U, m.S, m.Vh)]
        ids = {id(p) for p in spectral}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": spectral, "spectral": True}]
        if others:
            groups.append({"params": others, "spectral": False})
        defaults = dict(lr=lr, rank=rank, update_proj_gap=update_proj_gap, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, seed=seed)  # fmt: skip
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["spectral"]:
                for name, layer in self.layers:
                    self._spectral_step(name, layer, group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st.update(
                    t=0,
                    m=torch.zeros_like(p, dtype=torch.float32),
                    v=torch.zeros_like(p, dtype=torch.float32),
                )
            st["t"] += 1
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(
                _adam(p.grad.float(), st["m"], st["v"], st["t"], b1, b2, group["eps"]).to(p.dtype),
                alpha=-group["lr"],
            )

    def _spectral_step(self, name: str, layer: SpectralLinear, group: dict[str, Any]) -> None:
        U, S, Vh = layer.U, layer.S, layer.Vh
        if U.grad is None or S.grad is None or Vh.grad is None:
            return
        st = self.state[U]
        k, r = S.numel(), min(group["rank"], S.numel())
        if not st or st["t"] >= group["update_proj_gap"]:
            if st:  # the end of a round: re-decompose, then sample anew
                layer.resvd()
            rounds = st.get("rounds", 0)
            g = torch.Generator().manual_seed((name_seed(name, group["seed"]) + 7919 * rounds) % (2**63))
            probs = S.detach().abs().float().cpu() + 1e-12
            idx = torch.multinomial(probs / probs.sum(), r, replacement=False, generator=g).sort().values
            st.update(rounds=rounds + 1, t=0, idx=idx.to(U.device))
            st.update(mS=torch.zeros(k, device=U.device), vS=torch.zeros(k, device=U.device))
            st.update(
                mU=torch.zeros(U.shape[0], r, device=U.device), vU=torch.zeros(U.shape[0], r, device=U.device)
            )
            st.update(
                mV=torch.zeros(r, Vh.shape[1], device=U.device),
                vV=torch.zeros(r, Vh.shape[1], device=U.device),
            )
        st["t"] += 1
        b1, b2 = group["betas"]
        lr, eps, t, idx = group["lr"], group["eps"], st["t"], st["idx"]
        sigma = S.detach().float()[idx]
        inv = torch.where(sigma.abs() > 1e-8, 1.0 / sigma, 0.0)  # the enhanced gradient: s_i divided out
        gU = U.grad.float()[:, idx] * inv
        gV = Vh.grad.float()[idx, :] * inv[:, None]
        U[:, idx] = U[:, idx] - lr * _adam(gU, st["mU"], st["vU"], t, b1, b2, eps).to(U.dtype)
        Vh[idx, :] = Vh[idx, :] - lr * _adam(gV, st["mV"], st["vV"], t, b1, b2, eps).to(Vh.dtype)
        S.add_(_adam(S.grad.float(), st["mS"], st["vS"], t, b1, b2, eps).to(S.dtype), alpha=-lr)


def sst_state_bytes(opt: SparseSpectralAdamW) -> int:
    """Bytes of optimizer state held for the spectral layers (sampled-vector and singular-value moments)."""
    from .transform import state_bytes

    return sum(state_bytes(opt.state[layer.U]) for _, layer in opt.layers if layer.U in opt.state)
