"""SalUn: machine unlearning that updates only the weights salient for the data to forget.

Fan, Liu, Zhang, Wei, Wong & Liu, "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency", ICLR 2024, arXiv:2310.12508, Sec. 4:

    m_S = 1( |∇_θ ℓ_f(θ; D_f)|_{θ=θ_o} ≥ γ )                      (weight saliency map)
    θ_u = m_S ⊙ (θ_o + Δθ) + (1 − m_S) ⊙ θ_o                      (only salient weights move)
    min_Δθ  E_{(x,y)∈D_f, y'≠y} ℓ_CE(θ_u; x, y') + α E_{(x,y)∈D_r} ℓ_CE(θ_u; x, y)
                                                                  (random labelling, RL)

``ℓ_f`` is the cross-entropy on the forget set ``D_f`` (the paper's gradient-ascent forgetting loss is
its negation: same magnitude). ``γ`` is the hard threshold that keeps the top ``fraction`` of all
entries by |gradient| over the whole model (the paper's default: the median, ``fraction = 0.5``).

Implementation choice: the unlearning step is a plain masked update of the full weights, not an
adapter. The gradient of every parameter is multiplied by its mask before an SGD step (no weight
decay), so momentum never reaches a masked entry and weights outside the mask stay bit-identical;
this is exactly ``θ_u`` above with ``Δθ`` living on the support of ``m_S``. ``masks=None`` is
full-weight random labelling (Golatkar et al., 2020), the paper's baseline. The routine is the paper's
specific procedure (RL on ``D_f ∪ D_r``), not a general training loop: each step pairs one forget
batch, relabelled uniformly among the *other* classes, with one retain batch.

This module registers no adapter config (it is an editing routine, not a reparameterisation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsmithError

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise WeightsmithError(f"SalUn fraction must be in (0, 1], got {fraction}")


def saliency_masks(
    model: nn.Module,
    forget_batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn = F.cross_entropy,
    fraction: float = 0.5,
) -> dict[str, Tensor]:
    """Boolean masks (by parameter name) of the top ``fraction`` of all trainable entries by
    |∇ ℓ_f|, the gradient of the mean forget loss over every example in ``forget_batches``.

    Exactly ``round(fraction · N)`` entries are selected (at least one), N the number of trainable
    entries; ties at the threshold are broken by ``torch.topk``. The model is evaluated in eval mode
    (BatchNorm statistics untouched) and its ``.grad`` fields are not written.
    """
    _check_fraction(fraction)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise WeightsmithError("SalUn saliency: the model has no trainable parameters")
    batches = list(forget_batches)
    total = sum(len(y) for _, y in batches)
    if total == 0:
        raise WeightsmithError("SalUn saliency: forget_batches holds no examples")
    was_training = model.training
    model.eval()
    grads = [torch.zeros_like(p) for _, p in named]
    try:
        for x, y in batches:
            loss = loss_fn(model(x), y) * (len(y) / total)  # batch means -> the mean over D_f
            parts = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for g, gi in zip(grads, parts, strict=True):
                if gi is not None:  # a weight the loss never reads (e.g. an unused pooler) is never salient
                    g += gi
    finally:
        model.train(was_training)
    flat = torch.cat([g.abs().flatten() for g in grads])
    k = max(1, round(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name, p in named:
        masks[name] = chosen[start : start + p.numel()].view_as(p)
        start += p.numel()
    return masks


def random_labels(y: Tensor, n_classes: int, generator: torch.Generator) -> Tensor:
    """A label drawn uniformly from the ``n_classes - 1`` classes other than ``y``, per example."""
    shift = torch.randint(1, n_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % n_classes


def unlearn(
    model: nn.Module,
    forget: tuple[Tensor, Tensor],
    retain: tuple[Tensor, Tensor],
    masks: dict[str, Tensor] | None = None,
    epochs: int = 5,
    lr: float = 0.01,
    alpha: float = 1.0,
    batch_size: int = 64,
    momentum: float = 0.9,
    seed: int = 0,
) -> nn.Module:
    """Random-labelling unlearning in place; with ``masks`` (from :func:`saliency_masks`) only the
    masked entries change (SalUn), without it every weight does (the RL baseline).

    ``forget`` / ``retain`` are ``(x, y)`` tensors. An epoch is one pass over the larger of the two
    sets, the smaller one cycled; each step minimises ``CE(f(x_f), y') + alpha · CE(f(x_r), y_r)``
    with SGD (``lr``, ``momentum``, no weight decay). A trainable parameter missing from ``masks`` is
    left unchanged. Returns ``model`` in eval mode.
    """
    for opt_name, value, bad in (
        ("epochs", epochs, epochs < 1),
        ("lr", lr, not lr > 0),
        ("alpha", alpha, alpha < 0),
        ("batch_size", batch_size, batch_size < 1),
        ("momentum", momentum, not 0 <= momentum < 1),
    ):
        if bad:
            raise WeightsmithError(f"SalUn unlearn: invalid {opt_name} = {value}")
    (xf, yf), (xr, yr) = forget, retain
    if len(yf) == 0 or len(yr) == 0:
        raise WeightsmithError("SalUn unlearn: the forget and retain sets must both be non-empty")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if masks is not None:
        unknown = sorted(set(masks) - {n for n, _ in named})
        if unknown:
            raise WeightsmithError(f"SalUn unlearn: masks name unknown parameter(s) {unknown[:3]}")
        for n, p in named:
            if n in masks and masks[n].shape != p.shape:
                raise WeightsmithError(
                    f"SalUn unlearn: mask '{n}' has shape {tuple(masks[n].shape)}, expected {tuple(p.shape)}"
                )
        named = [(n, p) for n, p in named if n in masks]
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n_classes = int(model.eval()(xf[:1]).shape[-1])
    if n_classes < 2:
        raise WeightsmithError(
            f"SalUn unlearn: random labelling needs >= 2 classes, the model has {n_classes}"
        )
    steps = -(-max(len(yf), len(yr)) // batch_size)
    model.train()
    for _ in range(epochs):
        of, orr = torch.randperm(len(yf), generator=g), torch.randperm(len(yr), generator=g)
        for s in range(steps):
            i_f = of[torch.arange(s * batch_size, (s + 1) * batch_size) % len(yf)]
            i_r = orr[torch.arange(s * batch_size, (s + 1) * batch_size) % len(yr)]
            loss = F.cross_entropy(model(xf[i_f]), random_labels(yf[i_f], n_classes, g))
            loss = loss + alpha * F.cross_entropy(model(xr[i_r]), yr[i_r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:
                for n, p in named:
                    if p.grad is not None:
                        p.grad.mul_(masks[n].to(p.grad.dtype))
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
