"""RandLoRA's and BOFT's two exact paths (activation space, weight space), chosen per call from the shapes.

Each path is checked against its paper's equation built densely and differentiated by plain autograd:
RandLoRA ``ΔW = s Σ_i B_i Λ_i A Γ_i``; BOFT ``y = s ⊙ (x R W0ᵀ)``, ``R = B_m ⋯ B_1``,
``B_i = P_i diag(Cayley(Q_ij)) P_iᵀ``. Through the core (which passes ``base_out=None``) the weight path
equals the activation path and the merged model, also under CPU bf16 autocast up to bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters import AdapterContext, SharedBases
from weightsmith.adapters.boft import BOFT, block_product, boft_costs, group_size
from weightsmith.adapters.randlora import RandLoRA, _RandLoRAWeight, randlora_costs
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def run(a, W0, x, fn):
    """Output and the gradients of ``x`` and of every adapter parameter after one backward."""
    for p in (*a.parameters(), x):
        p.grad = None
    y = fn(a, W0, x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view(y.shape))
    return (y.detach(), x.grad.clone(), *(p.grad.clone() for p in a.parameters()))


# ---------------------------------------------------------------- RandLoRA


def make_randlora(shape, path="auto", rank=3, dtype=torch.float64):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=(shape,))
    a = RandLoRA(rank=rank, alpha=6.0, path=path).create(W0.float(), ctx).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return a, W0


def randlora_reference(a, W0, x):
    """The paper's equation, term by term, with autograd's own gradients (no code of the adapter)."""
    d, D = min(W0.shape), max(W0.shape)
    A = a.randlora_A[: a.rank, :d]
    terms = [
        a.randlora_B[:D, i, : a.rank] @ torch.diag(a.randlora_lambda[i]) @ A @ torch.diag(a.randlora_gamma[i])
        for i in range(a.n)
    ]
    M = a.scaling * sum(terms)
    dW = M if W0.shape[0] >= W0.shape[1] else M.T
    return x @ (W0 + dW).T


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16), (7, 5)])
def test_randlora_paths_equal_the_equation_and_its_gradients(shape):
    x = torch.randn(2, 11, shape[1], dtype=torch.float64, requires_grad=True)
    results = {}
    for path in ("activation", "weight"):
        a, W0 = make_randlora(shape, path)
        assert a.choose_path(x, W0, None) == path
        results[path] = run(a, W0, x, lambda a, W0, x: a(x, W0, None))
    a, W0 = make_randlora(shape)
    ref = run(a, W0, x, randlora_reference)
    for path, got in results.items():
        for g, r in zip(got, ref, strict=True):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-10), (path, shape)


def test_randlora_weight_path_gradcheck():
    a, W0 = make_randlora((6, 4), rank=2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    lam = a.randlora_lambda.detach().clone().requires_grad_()
    gam = a.randlora_gamma.detach().clone().requires_grad_()
    Bf = a.randlora_B[:6, : a.n, :2].reshape(6, a.n * 2)
    A = a.randlora_A[:2, :4]

    def f(x_, l_, g_):
        return _RandLoRAWeight.apply(x_, W0, l_, g_, A, Bf, a.scaling)

    assert torch.autograd.gradcheck(f, (x, lam, gam))
    W0t = W0.T.contiguous()  # tall: out < in (ΔW = Afᵀ Bfᵀ)
    assert torch.autograd.gradcheck(lambda x_, l_, g_: _RandLoRAWeight.apply(x_, W0t, l_, g_, A, Bf, 2.0), (
        torch.randn(3, 6, dtype=torch.float64, requires_grad=True), lam, gam))  # fmt: skip


def test_randlora_costs_by_hand_and_the_choice():
    # N=2 tokens, W0 [3, 2], k=2: activation x W0ᵀ 12 + x Afᵀ 8 + · Bfᵀ 12 = 32; weight Bf Af 12 + x Wᵀ 12
    assert randlora_costs(2, 3, 2, 2, train=False, input_grad=False) == (32, 24)
    # backward: activation + g Bf 12 + ∂Af 8 (+ g W0 12, · Af 8); weight + ∂Af in the cheaper order:
    # (g Bf)ᵀ x 12 + 8 = 20, not ∂W 12 + Bfᵀ ∂W 12 = 24 (+ W 12, g W 12)
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=False) == (52, 44)
    assert randlora_costs(2, 3, 2, 2, train=True, input_grad=True) == (72, 68)
    # the benchmark's shapes (1.1B Llama, rank 32, 4096 tokens): the weight path, 2 to 3x fewer products
    for out_f, in_f in ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)):
        k = 32 * -(-min(out_f, in_f) // 32)
        act, weight = randlora_costs(4096, out_f, in_f, k, train=True, input_grad=True)
        assert weight < act
    act, weight = randlora_costs(1, 2048, 2048, 2048, train=False, input_grad=False)  # generation
    assert act < weight


def test_randlora_auto_choice_and_fallbacks():
    a, W0 = make_randlora((8, 8), rank=4)  # k = 8 = d: with grads the weight path wins from N > ~2
    big = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    assert a.choose_path(big, W0, None) == "weight"
    with torch.no_grad():
        assert a.choose_path(big[:1], W0, None) == "activation"  # one token, forward only
    assert a.choose_path(big, W0, big @ W0.T) == "activation"  # base_out given: several adapters
    assert a.choose_path(big, W0.clone().requires_grad_(), None) == "activation"  # W0 trained too


def test_randlora_bad_path_names_the_option():
    with pytest.raises(WeightsmithError, match="RandLoRA path must be one of auto, activation, weight"):
        RandLoRA(path="dense")


# ---------------------------------------------------------------- BOFT


def make_boft(shape, block_size, m, path="auto"):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ctx = AdapterContext("w", 0, 0, "linear", SharedBases(0), shapes=(shape,))
    a = BOFT(block_size=block_size, n_butterfly_factor=m, path=path).create(W0.float(), ctx).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a.boft_R.copy_(0.5 * torch.randn(a.boft_R.shape, generator=g, dtype=torch.float64))
        a.boft_s.copy_(1 + 0.3 * torch.randn(a.boft_s.shape, generator=g, dtype=torch.float64))
    return a, W0


def boft_reference(a, W0, x):
    """Dense ``R`` from the docstring's equation: permutation matrices, block diagonals, an explicit
    inverse for Cayley; autograd differentiates it (no code of the adapter)."""
    m, k, b, _ = a.boft_R.shape
    n = k * b
    eye = torch.eye(b, dtype=x.dtype)
    R = torch.eye(n, dtype=x.dtype)
    for i in range(m):  # R = B_m ⋯ B_1: B_1 rightmost
        Q = 0.5 * (a.boft_R[i] - a.boft_R[i].transpose(-1, -2))
        blocks = [(eye - q) @ torch.linalg.inv(eye + q) for q in Q]
        P = torch.zeros(n, n, dtype=x.dtype)
        P[torch.arange(n), a.perms[i]] = 1.0  # (P v)_j = v[p_j]
        R = P @ torch.block_diag(*blocks) @ P.T @ R
    return (x @ R @ W0.T) * a.boft_s.view(-1)


@pytest.mark.parametrize(("shape", "size", "m"), [((24, 16), 2, 3), ((5, 16), 4, 2), ((9, 12), 4, 1)])
def test_boft_paths_equal_the_equation_and_its_gradients(shape, size, m):
    x = torch.randn(3, 7, shape[1], dtype=torch.float64, requires_grad=True)
    results = {}
    for path in ("activation", "weight"):
        a, W0 = make_boft(shape, size, m, path)
        assert a.choose_path(x, W0) == path
        results[path] = run(a, W0, x, lambda a, W0, x: a(x, W0, None))
    a, W0 = make_boft(shape, size, m)
    ref = run(a, W0, x, boft_reference)
    for path, got in results.items():
        for g, r in zip(got, ref, strict=True):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-10), (path, shape, m)


def test_boft_costs_by_hand_and_the_choice():
    # N=2, W0 [3, 4], b=2, m=1: both blocks in one dense 4x4 group, so a rotation of R rows costs R 4 4.
    # activation x W0ᵀ 24 + x R 32 = 56; weight W0 Rᵀ 48 + x W'ᵀ 24 = 72
    assert boft_costs(2, 3, 4, 2, 1, train=False, input_grad=False) == (56, 72)
    # training: activation + (g s) W0 24 + block gradient 32; weight + gᵀ x 24 + block gradient 48
    assert boft_costs(2, 3, 4, 2, 1, train=True, input_grad=False) == (112, 144)
    # input gradient: activation + · Rᵀ 32; weight + g W' 24
    assert boft_costs(2, 3, 4, 2, 1, train=True, input_grad=True) == (144, 168)
    # the benchmark (b=4, m=1, 4096 tokens): the activation path on every Llama-1.1B shape ...
    for out_f, in_f in ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)):
        act, weight = boft_costs(4096, out_f, in_f, 4, 1, train=True, input_grad=True)
        assert act < weight
    # ... the weight path for large blocks on a narrow output (k/v heads with b=256)
    act, weight = boft_costs(4096, 256, 2048, 256, 1, train=True, input_grad=True)
    assert weight < act


def test_grouped_block_product_is_the_block_diagonal_product():
    assert [group_size(k, b) for k, b in ((512, 4), (1408, 4), (6, 4), (8, 256), (7, 4))] == [16, 16, 6, 1, 7]
    blocks = torch.randn(12, 4, 4, dtype=torch.float64)
    z = torch.randn(2, 5, 48, dtype=torch.float64)
    want = z @ torch.block_diag(*blocks)  # dense [48, 48], z as row vectors
    assert torch.allclose(block_product(z, blocks), want, rtol=1e-12, atol=1e-12)


def test_boft_auto_choice():
    a, W0 = make_boft((4, 16), 16, 1)  # out 4 < 3 m b = 48: the weight path
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    assert a.choose_path(x, W0) == "weight"
    a, W0 = make_boft((64, 16), 2, 1)  # out 64 > 6: the activation path
    assert a.choose_path(x, W0) == "activation"
    a, W0 = make_boft((4, 16), 16, 1, path="weight")
    assert a.choose_path(x, W0.clone().requires_grad_()) == "activation"  # W0 trained too


def test_boft_bad_path_names_the_option():
    with pytest.raises(WeightsmithError, match="BOFT path must be one of auto, activation, weight"):
        BOFT(path="dense")


# ---------------------------------------------------------------- both, through the core

CONFIGS = {
    "randlora": lambda path: RandLoRA(rank=4, alpha=8.0, path=path),
    "boft": lambda path: BOFT(block_size=2, n_butterfly_factor=2, path=path),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_weight_path_through_the_core_and_under_bf16_autocast(method):
    grads, outs = {}, {}
    for path in ("activation", "weight"):
        m = Net()
        adapters.adapt(m, CONFIGS[method](path), targets="up,down")
        with torch.no_grad():
            for p in adapters.adapter_parameters(m):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
        outs[path] = m(x).detach()
        adapters.merge_adapters(m)
        assert torch.allclose(outs[path], m(x), rtol=1e-5, atol=1e-5)
        adapters.unmerge_adapters(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        grads[path] = torch.cat([p.grad.flatten() for p in adapters.adapter_parameters(m)])
    assert torch.allclose(outs["activation"], outs["weight"], rtol=1e-5, atol=1e-5)
    assert (grads["weight"] - grads["activation"]).norm() <= 0.05 * grads["activation"].norm()
