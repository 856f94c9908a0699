"""Spherical interpolation merges: SLERP, NuSLERP and Multi-SLERP (mergekit's ``slerp``, ``nuslerp``,
``multislerp``).

- Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985: for unit directions at angle
  Omega = arccos(<u0, u1>), slerp(t) = sin((1-t) Omega)/sin(Omega) * v0 + sin(t Omega)/sin(Omega) * v1.
  ``slerp`` takes Omega from the normalised whole tensors and applies the coefficients to the raw
  tensors; nearly collinear pairs (|cos Omega| > ``dot_threshold``) interpolate linearly.
- ``nuslerp`` applies the same formula per row (or per column, or over the flattened tensor), with t
  from the two models' weights (t = w_1 / (w_0 + w_1)); with a base it interpolates the task vectors
  theta_i - theta_0 and adds the result back to the base.
- ``multislerp`` (Goddard, "Multi-SLERP", 2024, barycentric interpolation on the hypersphere, cf. Buss &
  Fillmore, "Spherical averages and applications to spherical splines and interpolation", ACM TOG
  2001): project the unit inputs to the tangent space at their normalised weighted mean m,
  average there, map back with exp_m(v) = cos|v| m + sin|v| v/|v|, and scale by the weighted mean norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import register_config
from ..errors import WeightsmithError
from ._tensorwise import (
    CheckedMethod,
    Gen,
    PiecewiseOnBaseMethod,
    as_work,
    blocks,
    inputs_owned,
    scratch,
    work_dtype,
    writable_into,
    write_piece_size,
)


def _dots(a: Tensor, b: Tensor, dt: torch.dtype) -> tuple[float, float, float]:
    """|a|^2, |b|^2 and <a, b> of two [1, n] views, each piece's ``dt`` dot products added in float64 (its
    scratch is freed on return, before the output of the second pass is allocated)."""
    buf = scratch(a, dt, 2)
    half = buf.numel() // 2
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for piece in blocks(1, a.shape[1], a.device):
        x, y = as_work(a[piece], buf[:half]).reshape(-1), as_work(b[piece], buf[half:]).reshape(-1)
        sums += torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)])
    aa, bb, ab = sums.tolist()  # one device sync per tensor
    return aa, bb, ab


def slerp(
    v0: Tensor,
    v1: Tensor,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
    into_v0: bool = False,
) -> Tensor:
    """SLERP of two whole tensors from ``v0`` (t = 0) to ``v1`` (t = 1), computed in float32 (float64
    for float64 inputs) and returned in that dtype, or rounded to ``out_dtype`` piece by piece (the same
    values as ``.to(out_dtype)``). Norms at or below ``eps`` count as 1 when normalising for the angle.
    ``into_v0``: write the result into ``v0``'s buffer when it is contiguous, has the result's dtype and
    shares no storage with ``v1`` (each piece of ``v0`` is read before it is overwritten), so the peak is
    the two inputs.

    Two passes over pieces (:func:`~._tensorwise.blocks`): the first sums |v0|^2, |v1|^2 and <v0, v1>
    (each piece's float32 dot products added in float64), giving cos Omega = <v0, v1> / (|v0| |v1|); the
    second writes c0 v0 + c1 v1 (elementwise: on a GPU in smaller pieces, see
    :func:`~._tensorwise.write_piece_size`). Only the result is as large as the tensor."""
    dt = work_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    aa, bb, ab = _dots(a, b, dt)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    cos = min(1.0, max(-1.0, ab / na / nb))
    if abs(cos) > dot_threshold or a.numel() == 0:
        c0, c1 = 1 - t, t
    else:
        omega = math.acos(cos)
        s = math.sin(omega)
        c0, c1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    target = out_dtype or dt
    reuse = into_v0 and writable_into(v0, target, [v1])
    out = a if reuse else torch.empty(a.shape, dtype=target, device=a.device)
    step = write_piece_size(a.device)
    spare = out.dtype != dt and a.dtype == dt  # a float32 result piece needs a slot of its own
    buf = scratch(a, dt, 3 if spare else 2, step)
    n = buf.numel() // (3 if spare else 2)
    for piece in blocks(1, a.shape[1], a.device, step):
        x, y = as_work(a[piece], buf[:n]), as_work(b[piece], buf[n : 2 * n])
        if out.dtype == dt:
            torch.mul(x, c0, out=out[piece]).add_(y, alpha=c1)
            continue
        tmp = buf[2 * n : 2 * n + x.numel()].view(x.shape) if spare else x  # x is then a copy in buf
        out[piece].copy_(torch.mul(x, c0, out=tmp).add_(y, alpha=c1))
    return out.reshape(v0.shape)


def check_t(t: float, what: str = "slerp option t") -> None:
    if not 0.0 <= t <= 1.0:
        raise WeightsmithError(f"{what}={t}: the interpolation factor must be in [0, 1]")


@register_config("slerp", kind="merge")
class SLERP(PiecewiseOnBaseMethod):
    """SLERP from the base (t = 0) to the one other model (t = 1), Shoemake 1985."""

    t: float = 0.5
    dot_threshold: float = 0.9995
    eps: float = 1e-8

    min_models = 1
    max_models = 1

    def __post_init__(self) -> None:
        check_t(self.t)

    def merge_on_as(
        self,
        base: Tensor,
        thetas: Sequence[Tensor],
        weights: list[float],
        gen: Gen,
        dtype: torch.dtype | None,
    ) -> Tensor:
        # the base is read once: in the executor (fresh buffers), the result is written into it
        return slerp(
            base, thetas[0], self.t, self.dot_threshold, self.eps, out_dtype=dtype, into_v0=inputs_owned()
        )


def nuslerp(
    v0: Tensor, v1: Tensor, t: float, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8
) -> Tensor:
    """SLERP along the last axis (``row_wise``: along the first), or over the flattened tensor. Each
    slice interpolates linearly where 1 - cos^2 <= eps^2 (collinear or antipodal directions)."""
    dt = work_dtype(v0)
    shape = v0.shape
    a, b = v0.to(dt), v1.to(dt)
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    out = torch.where(collinear, (1 - t) * a + t * b, curved)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register_config("nuslerp", kind="merge")
class NuSLERP(CheckedMethod):
    """SLERP of two models with t = w_1 / (w_0 + w_1) (0.5 when the weights sum to ~0); of their task
    vectors when a base is given. ``flatten`` (default) treats the tensor as one vector; otherwise each
    row (``row_wise``: each column) is interpolated on its own."""

    row_wise: bool = False
    flatten: bool = True
    eps: float = 1e-8

    base_policy = "optional"
    min_models = 2
    max_models = 2

    def merge_checked(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: list[float], gen: Gen
    ) -> Tensor:
        total = weights[0] + weights[1]
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        rw, fl, eps = self.row_wise, self.flatten, self.eps
        if base is None:
            return nuslerp(thetas[0], thetas[1], t, row_wise=rw, flatten=fl, eps=eps)
        b = base.to(work_dtype(base))
        return b + nuslerp(
            thetas[0].to(b.dtype) - b, thetas[1].to(b.dtype) - b, t, row_wise=rw, flatten=fl, eps=eps
        )


def multislerp(
    thetas: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Barycentric spherical interpolation of any number of tensors (of their task vectors when ``base``
    is given). Two exactly opposed inputs whose weighted mean vanishes interpolate linearly; more than
    two such inputs are an error."""
    dt = work_dtype(thetas[0])
    if len(thetas) == 1:
        return thetas[0].to(dt)
    shape = thetas[0].shape
    x = torch.stack([t.to(dt) for t in thetas])
    if base is not None:
        x = x - base.to(dt)
    flat = x.reshape(len(thetas), -1)
    w = torch.tensor(list(weights), dtype=dt, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(thetas) != 2:
            raise WeightsmithError(
                "multislerp: the weighted mean direction of the inputs is zero (opposed inputs whose "
                "weights cancel); change the weights"
            )
        out = (x[0] * w[0] + x[1] * w[1]).reshape(shape)
        return out + base.to(dt) if base is not None else out
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    v = (tangent * w[:, None]).sum(0)
    vn = torch.linalg.vector_norm(v) + eps
    on_sphere = mean * torch.cos(vn) + v * (torch.sin(vn) / vn)
    out = (on_sphere * (norms.squeeze(-1) * w).sum()).reshape(shape)
    return out + base.to(dt) if base is not None else out


@register_config("multislerp", kind="merge")
class MultiSLERP(CheckedMethod):
    """Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (of their task
    vectors when a base is given), weights normalised to sum 1 unless ``normalize_weights`` is false."""

    normalize_weights: bool = True
    eps: float = 1e-8

    base_policy = "optional"
    min_models = 1

    def merge_checked(
        self, base: Tensor | None, thetas: Sequence[Tensor], weights: list[float], gen: Gen
    ) -> Tensor:
        return multislerp(thetas, weights, base, normalize_weights=self.normalize_weights, eps=self.eps)
