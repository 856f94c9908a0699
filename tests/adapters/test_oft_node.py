"""OFT's fused path (weightsmith.adapters.oft, issue 14) against the paper's equations written out.

Reference: Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", 2023 (eqs. 3-5)
with PEFT 0.21's Neumann series: Q built by scattering the upper entries, ``R`` by summing the powers of
``Q`` term by term, every token's blocks rotated by an einsum, then the frozen layer; all through
autograd. The fused path (gather-built Q, Horner's rule with ``baddbmm``, one autograd node for
rotation + layer) must give the same output and gradients: float32 tight, bfloat16 loose.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_lora_group import _Count
from torch import Tensor, nn

from weightsmith import adapters
from weightsmith.adapters.oft import OFT, _RotatedLinear, cayley_neumann, skew

torch.set_num_threads(1)


def ref_skew(vec: Tensor, b: int) -> Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    M = vec.new_zeros(vec.shape[0], b, b)
    M[:, rows, cols] = vec
    return M - M.transpose(1, 2)


def ref_neumann(Q: Tensor, terms: int) -> Tensor:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype).expand_as(Q)
    if terms <= 1:
        return eye.clone()
    if terms == 2:
        return eye + 2 * Q
    K = max(2, terms - 2)
    powers = [Q]
    for _ in range(K):
        powers.append(powers[-1] @ Q)
    return eye + 2 * sum(powers[:K]) + powers[K]


def ref_forward(layer: Any, x: Tensor) -> Tensor:
    a = layer.adapters["default"]
    v = a.oft_R.float()
    Q = ref_skew(v, a.block_size)
    if a.neumann_terms == 0:
        eye = torch.eye(a.block_size).expand_as(Q)
        R = (eye - Q) @ torch.linalg.inv(eye + Q)
    else:
        R = ref_neumann(Q, a.neumann_terms)
    R = R.expand(a.blocks, -1, -1)
    xb = x.reshape(*x.shape[:-1], a.blocks, a.block_size)
    x_rot = torch.einsum("...kc,kcd->...kd", xb, R.to(x.dtype)).reshape(x.shape)
    return F.linear(x_rot, layer.weight().to(x.dtype))


def adapted(config: OFT, dtype: torch.dtype = torch.float32, d: int = 24, out: int = 10) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, out, bias=False)).to(dtype)
    adapters.adapt(model, config, targets=["0"])
    with torch.no_grad():
        p = model[0].adapters["default"].oft_R
        p.copy_(torch.randn(p.shape) * 0.1)
    return model[0]


def step(fn: Any, layer: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    p = layer.adapters["default"].oft_R
    p.grad = None
    xi = x.detach().clone().requires_grad_(True)
    y = fn(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y.detach().float(), xi.grad.float(), p.grad.float()


def rel(u: Tensor, v: Tensor) -> float:
    return float((u - v).norm() / v.norm().clamp_min(1e-30))


CONFIGS = {
    "neumann5": OFT(block_size=4),
    "neumann3": OFT(block_size=6, neumann_terms=3),
    "neumann8": OFT(block_size=4, neumann_terms=8),
    "neumann2": OFT(block_size=4, neumann_terms=2),
    "exact": OFT(block_size=4, cayley_neumann=False),
    "shared": OFT(block_size=8, block_share=True),
    "rank": OFT(block_size=0, rank=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fused_oft_equals_reference(name: str, dtype: torch.dtype, tol: float) -> None:
    layer = adapted(CONFIGS[name], dtype)
    x = torch.randn(2, 5, 24).to(dtype)
    got, ref = step(layer, layer, x), step(lambda t: ref_forward(layer, t), layer, x)
    for u, v, what in zip(got, ref, ("output", "dx", "d oft_R"), strict=True):
        assert rel(u, v) <= tol, (what, rel(u, v))
    assert ref[2].norm() > 0


def test_fused_oft_under_autocast_and_non_contiguous_input() -> None:
    layer = adapted(OFT(block_size=4))
    x = torch.randn(5, 2, 24).transpose(0, 1)  # not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(layer, layer, x)
        ref = step(lambda t: ref_forward(layer, t.to(torch.bfloat16)), layer, x)
    assert got[0].dtype == torch.float32 and layer.adapters["default"].oft_R.grad.dtype == torch.float32
    for u, v in zip(got, ref, strict=True):
        assert rel(u, v) <= 2e-2


def test_skew_horner_and_node_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.equal(skew(v, 4), ref_skew(v, 4))
    assert torch.autograd.gradcheck(lambda t: skew(t, 4), (v,))
    Q = ref_skew(v.detach(), 4) * 0.3
    for terms in (1, 2, 3, 4, 5, 9):
        assert torch.allclose(cayley_neumann(Q, terms), ref_neumann(Q, terms), rtol=1e-12, atol=1e-13)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    R = torch.randn(2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W, R: _RotatedLinear.apply(None, x, W, R), (x, W, R))


def test_fused_oft_step_has_no_copies() -> None:
    layer = adapted(OFT(block_size=4, neumann_terms=5))
    x = torch.randn(6, 24, requires_grad=True)
    with _Count() as c:
        layer(x).sum().backward()
    assert c.ops["clone"] == c.ops["copy_"] == c.ops["index_put_"] == 0, c.ops
    # forward 1 add + 3 baddbmm + 1 bmm + 1 mm; backward 6 bmm (Horner) + 2 bmm + 1 mm (the node)
    assert (c.ops["bmm"], c.ops["baddbmm"], c.ops["mm"]) == (9, 3, 2), c.ops
