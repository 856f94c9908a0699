"""Gradient transforms and their torch.optim wrapper: composition, masks, AdamW equivalence, schedulers,
state_dict round trip through ``torch.load(weights_only=True)`` (bit-exact continuation, dtypes kept)."""

from __future__ import annotations

import io

import pytest
import torch

from weightsmith.optim import (
    TransformOptimizer,
    chain,
    galore_adam,
    identity,
    is_matrix,
    make_projector,
    masked,
    scale_by_adam,
    state_bytes,
)
from weightsmith.optim.transform import ClipByNorm

torch.set_num_threads(1)


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).to(dtype)


def _grads(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 12, generator=g).to(next(model.parameters()).dtype)
    model.zero_grad()
    model(x).square().mean().backward()


def test_adam_transform_matches_torch_adamw():
    a, b = _model(), _model()
    ours = TransformOptimizer(a.parameters(), scale_by_adam(eps=1e-12), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, eps=1e-12, weight_decay=0.1)
    for t in range(5):
        _grads(a, t)
        _grads(b, t)
        ours.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_chain_applies_in_order_and_identity_is_sgd():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = TransformOptimizer([p], chain(identity(), ClipByNorm(1.0)), lr=0.5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5 -> clipped to norm 1
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.3, -0.4, 0.0, 0.0]))
    st = opt.state[p]
    assert set(st) == {"0", "1"}


def test_masked_by_name_and_by_predicate():
    model = _model()
    by_name = masked(scale_by_adam(), "0.weight")
    opt = TransformOptimizer(model.named_parameters(), by_name, lr=1e-3)
    _grads(model, 0)
    opt.step()
    on = {opt.param_name(p): opt.state[p]["on"] for p in model.parameters()}
    assert on == {"0.weight": True, "0.bias": False, "2.weight": False, "2.bias": False}
    assert "mu" in opt.state[model[0].weight]["inner"] and opt.state[model[0].bias]["inner"] == {}

    opt2 = TransformOptimizer(model.named_parameters(), masked(scale_by_adam(), is_matrix, scale_by_adam()))
    _grads(model, 1)
    opt2.step()
    assert [opt2.state[p]["on"] for p in model.parameters()] == [True, False, True, False]


def test_lr_scheduler_drives_the_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = TransformOptimizer([p], identity(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), -(1 + 0.5 + 0.25)))


def _galore_opt(model: torch.nn.Module, projector: str) -> TransformOptimizer:
    proj = make_projector(projector.removeprefix("q4-"), quantized=projector.startswith("q4-"))
    t = masked(
        galore_adam(rank=3, update_proj_gap=2, scale=0.5, projector=proj),
        is_matrix,
        scale_by_adam(),
    )  # fmt: skip
    return TransformOptimizer(model.named_parameters(), t, lr=1e-2, weight_decay=0.01)


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("projector", ["svd", "rsvd", "dct", "random", "sparse", "q4-rsvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_exact(projector, dtype):
    whole = _model(1, dtype)
    opt = _galore_opt(whole, projector)
    for t in range(7):
        _grads(whole, t)
        opt.step()

    first = _model(1, dtype)
    opt1 = _galore_opt(first, projector)
    for t in range(3):
        _grads(first, t)
        opt1.step()
    saved_params = {k: v.clone() for k, v in first.state_dict().items()}
    saved = _roundtrip(opt1.state_dict())

    resumed = _model(5, dtype)
    resumed.load_state_dict(saved_params)
    opt2 = _galore_opt(resumed, projector)
    opt2.load_state_dict(saved)
    for t in range(3, 7):
        _grads(resumed, t)
        opt2.step()
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    # state tensors keep their dtypes (float32 projectors of a bf16 model; torch would cast them to bf16)
    assert _dtypes(opt2.state_dict()["state"]) == _dtypes(opt1.state_dict()["state"])


def _dtypes(state: object, prefix: str = "") -> dict[str, torch.dtype]:
    if isinstance(state, torch.Tensor):
        return {prefix: state.dtype}
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in _dtypes(sub, f"{prefix}/{key}").items()}
    return {}


def test_state_bytes_counts_projected_moments():
    model = torch.nn.Linear(64, 32, bias=False)
    opt = TransformOptimizer(model.named_parameters(), galore_adam(rank=4, update_proj_gap=10), lr=1e-3)
    model.weight.grad = torch.randn(32, 64)
    opt.step()
    # std projection of a 32x64 weight is left: moments 4x64 each, projector 32x4
    assert state_bytes(opt.state_dict()["state"]) == 4 * (2 * 4 * 64 + 32 * 4)


def test_foreach_updates_equal_one_at_a_time():
    """``update_many`` (multi-tensor kernels over several weights) computes what ``update`` computes, bit for
    bit: Adam alone, and GaLore's projected Adam through a refresh."""
    from weightsmith.optim.projection import galore_adam
    from weightsmith.optim.projectors import RandomizedSVD
    from weightsmith.optim.transform import ScaleByAdam

    g = torch.Generator().manual_seed(0)
    shapes = [(12, 8), (12, 8), (5, 9)]
    for t in (ScaleByAdam(), galore_adam(rank=3, update_proj_gap=2, projector=RandomizedSVD())):
        params = [torch.randn(s, generator=g) for s in shapes]
        one = [t.init(p, f"w{i}") for i, p in enumerate(params)]
        many = [t.init(p, f"w{i}") for i, p in enumerate(params)]
        for _ in range(3):
            grads = [torch.randn(s, generator=g) for s in shapes]
            expected = [t.update(gr, st, p)[0] for gr, st, p in zip(grads, one, params, strict=True)]
            got = t.update_many(list(zip(grads, many, params, strict=True)))
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), type(t).__name__
