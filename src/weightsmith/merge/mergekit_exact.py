"""mergekit's own arithmetic, for users who need files identical to mergekit's (``weightsmith merge
--exact-dtype``).

Our kernels compute in float32 and round once. mergekit 0.1.5 reads the inputs in the YAML's ``dtype``
(else as stored, promoted to a common dtype) and then:

- ``linear`` (Wortsman et al., "Model soups", ICML 2022: theta = sum_i w_i theta_i / sum_i w_i) and
  ``slerp`` (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985) upcast to float32,
  accumulate in a fixed order (SLERP's norms and dot product over chunks of 2^20 entries) and round to
  the input dtype;
- the generalised task-arithmetic rows ``task_arithmetic``, ``ties``, ``breadcrumbs``,
  ``breadcrumbs_ties`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023; Yadav et al.,
  "TIES-Merging", NeurIPS 2023; Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024:
  theta = theta_0 + lambda sum_i w_i m_i delta_i / D) compute every step in the input dtype (bf16
  deltas, bf16 weights, bf16 sums), ranking magnitudes in float32;
- ``passthrough`` multiplies by ``scale`` in the input dtype.

The kernels here repeat those steps in that order and precision, so on bf16 or fp16 inputs the output
is bit-identical to mergekit's (tested). Methods that draw random masks (DARE, DELLA, Arcee Fusion)
cannot match mergekit's global-RNG draws, and the others are not reproduced: ``--exact-dtype`` refuses
them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsmithError
from .mergekit_methods import Kernel, Params, weights

CHUNK = 1 << 20  # mergekit's SLERP works over chunks of this many entries


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(thetas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """sum_i w_i theta_i (/ sum_i w_i): float32 accumulation in input order, rounded to the input dtype."""
    first = thetas[0]
    dt = _acc_dtype(first)
    w = torch.tensor([list(weights)], dtype=dt, device=first.device)
    out = torch.zeros((1, *first.shape), dtype=dt, device=first.device)
    ones = (1,) * first.dim()
    for x, c in zip(thetas, w.unbind(1), strict=True):
        out.addcmul_(x.unsqueeze(0), c.reshape(1, *ones))
    if normalize:
        out.div_(w.sum(dim=1).reshape(1, *ones))
    return out[0].to(first.dtype)


def slerp(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """SLERP from ``v0`` (t = 0) to ``v1``, float32 statistics over 2^20-entry chunks, each chunk's result
    rounded to the input dtype."""
    dot_threshold, eps = 0.9995, 1e-8
    dt = _acc_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=dt, device=a.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = [slice(i, i + CHUNK) for i in range(0, a.shape[1], CHUNK)]

    def norm(x: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(x[:, sp].to(dt), dim=1, keepdim=True) for sp in spans]),
            dim=0,
        )
        return torch.where(n > eps, n, 1)

    na, nb = norm(a), norm(b)
    dot = torch.stack(
        [((a[:, sp].to(dt) / na) * (b[:, sp].to(dt) / nb)).sum(dim=1, keepdim=True) for sp in spans]
    )
    cos = dot.sum(dim=0).clamp(-1, 1)
    flat = cos.abs() > dot_threshold
    theta = torch.acos(torch.where(flat, 0, cos))
    sin = torch.sin(theta)
    ca = torch.where(flat, 1 - tt, torch.sin((1 - tt) * theta) / sin)
    cb = torch.where(flat, tt, torch.sin(tt * theta) / sin)
    out = torch.empty_like(a)
    for sp in spans:
        out[:, sp] = ca * a[:, sp].to(dt) + cb * b[:, sp].to(dt)
    return out.reshape(v0.shape)


def _masked(delta: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _magnitudes(delta: Tensor) -> Tensor:
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def _top(delta: Tensor, density: float, rescale: bool) -> Tensor:
    """TIES trim: keep the k = max(1, floor(density n)) largest |delta| (ranked in float32 on CPU)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(_magnitudes(delta), descending=True)[:k]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale)


def _crumbs(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Breadcrumbs: drop the ``gamma`` largest and enough of the smallest |delta| to keep ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(_magnitudes(delta), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom : bottom + keep]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale)


def _gta(elect: bool, how: str | None) -> Kernel:
    """A generalised task-arithmetic row: ``how`` sparsifies each delta (``magnitude``, ``breadcrumbs`` or
    None), ``elect`` applies the TIES sign election."""

    def run(
        base: Tensor | None,
        thetas: list[Tensor],
        s: Params,
        per: Sequence[Params],
        gen: Any,
    ) -> Tensor:
        assert base is not None
        if not thetas:
            return base
        deltas = base.new_empty((len(thetas), *base.shape))
        for i, (x, p) in enumerate(zip(thetas, per, strict=True)):
            d = x - base
            if how == "breadcrumbs":
                d = _crumbs(d, float(p["density"]), float(p["gamma"]), s["rescale"])
            elif how == "magnitude":
                d = _top(d, float(p["density"]), s["rescale"])
            deltas[i] = d
        w = torch.tensor([float(p["weight"]) for p in per], dtype=deltas.dtype, device=deltas.device)
        w = w.reshape(-1, *([1] * base.dim()))
        deltas.mul_(w)
        if elect:
            mask_dtype = torch.int8 if s["int8_mask"] else base.dtype
            sign = deltas.sign().to(mask_dtype)
            majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
            mask = sign == majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if s["normalize"]:
            mixed /= divisor
        if s["lambda"] != 1:
            mixed *= s["lambda"]
        return (base + mixed).to(base.dtype)

    return run


def _scaled(x: Tensor, scale: float | None) -> Tensor:
    return x if scale is None else x * scale


KERNELS: dict[str, Kernel] = {
    "linear": lambda b, x, s, p, g: linear(x, weights(p), s["normalize"]),
    "slerp": lambda b, x, s, p, g: slerp(b, x[0], s["t"]) if b is not None else x[0],
    "task_arithmetic": _gta(False, None),
    "ties": _gta(True, "magnitude"),
    "breadcrumbs": _gta(False, "breadcrumbs"),
    "breadcrumbs_ties": _gta(True, "breadcrumbs"),
    "passthrough": lambda b, x, s, p, g: _scaled(x[0], p[0]["scale"]),
}


def kernel(name: str) -> Kernel:
    """mergekit's arithmetic for method ``name``; a message naming ``--exact-dtype`` for the others."""
    if name not in KERNELS:
        raise WeightsmithError(
            f"--exact-dtype reproduces mergekit's arithmetic for {', '.join(sorted(KERNELS))}; "
            f"'{name[:80]}' is not one of them (random methods cannot match mergekit's RNG draws); "
            "run it without --exact-dtype (float32 arithmetic)"
        )
    return KERNELS[name]


def align(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The inputs in their promoted floating dtype, as mergekit aligns one weight's group."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]
