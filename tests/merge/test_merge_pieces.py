"""The piecewise kernels (SLERP, Model Stock, the generalised task-arithmetic combine, DELLA's MagPrune):
the same result whatever the piece size, and the papers' formulas worked in float64 on whole tensors."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.merge import _tensorwise
from weightsmith.merge import della as della_module
from weightsmith.merge.della import della
from weightsmith.merge.model_stock import model_stock
from weightsmith.merge.slerp import slerp

torch.set_num_threads(1)
SHAPES = [(37, 29), (5, 300), (1000,), (3, 4, 5), (1,)]


@pytest.fixture(params=[7, 64, 1 << 16], ids=["piece7", "piece64", "piece64k"])
def piece(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_tensorwise, "CPU_PIECE", request.param)
    return int(request.param)


def _pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), (a + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _shoemake(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake 1985 on the flattened tensors, in float64: sin((1-t) W)/sin W v0 + sin(t W)/sin W v1."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    omega = math.acos(float(a @ b / a.norm() / b.norm()))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b).reshape(v0.shape)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_in_pieces_is_shoemakes_formula(piece: int, shape: tuple[int, ...], dtype: torch.dtype):
    v0, v1 = _pair(shape, dtype)
    got = slerp(v0, v1, 0.3)
    assert got.dtype == torch.float32 and got.shape == v0.shape
    torch.testing.assert_close(got.double(), _shoemake(v0, v1, 0.3), rtol=1e-6, atol=1e-6)


def test_slerp_of_nearly_collinear_pieces_is_linear(piece: int):
    v0 = torch.linspace(-1, 1, 501)
    torch.testing.assert_close(slerp(v0, v0 * 1.0001, 0.25), 0.75 * v0 + 0.25 * (v0 * 1.0001))


def _model_stock_by_hand(base: torch.Tensor, thetas: list[torch.Tensor], rows: bool) -> torch.Tensor:
    """Jang et al. 2024, Eq. 5-6 in float64: t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine
    of the offsets (over each row with ``rows``), w_H = t mean(w_i) + (1 - t) w_0."""
    cols = base.shape[-1] if rows else base.numel()
    w0 = base.double().reshape(-1, cols)
    ws = [t.double().reshape(-1, cols) for t in thetas]
    offs = [w - w0 for w in ws]
    n = len(ws)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(
        (offs[i] * offs[j]).sum(1) / (offs[i].norm(dim=1) * offs[j].norm(dim=1)) for i, j in pairs
    ) / len(pairs)
    t = (n * cos / (1 + (n - 1) * cos)).unsqueeze(1)
    return (t * sum(ws) / n + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_pieces_is_the_papers_formula(piece: int, shape: tuple[int, ...], filter_wise: bool):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    thetas = [
        (base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).bfloat16() for _ in range(3)
    ]
    base = base.bfloat16()
    got = model_stock(base, thetas, filter_wise)
    assert got.dtype == torch.float32 and got.shape == base.shape
    torch.testing.assert_close(
        got.double(), _model_stock_by_hand(base, thetas, filter_wise), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("elect,normalize", [(True, True), (False, True), (False, False)])
def test_combine_and_della_do_not_depend_on_the_piece_size(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], elect: bool, normalize: bool
):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g).bfloat16()
    thetas = [(base.float() + 0.1 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    w = [1.0, -0.5, 2.0]
    b, deltas = _tensorwise.stack_deltas(base, thetas)
    torch.testing.assert_close(
        deltas, torch.stack([t.float() - base.float() for t in thetas]), rtol=0, atol=0
    )

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        mixed = _tensorwise.combine(b, deltas, w, elect=elect, normalize=normalize, scaling=0.7)
        gen = torch.Generator().manual_seed(3)
        dens, eps = [0.5] * 3, [0.1] * 3
        pruned = della(
            base,
            thetas,
            w,
            dens,
            eps,
            elect=elect,
            normalize=normalize,
            rescale=True,
            scaling=0.7,
            generator=gen,
        )
        return mixed, pruned

    whole = run()
    monkeypatch.setattr(_tensorwise, "CPU_PIECE", 5)
    monkeypatch.setattr(della_module, "PRUNE_BLOCK", 7)  # MagPrune a few rows at a time
    for x, y in zip(run(), whole, strict=True):
        assert torch.equal(x, y)
    # the combine's definition, by hand, on the whole tensor
    wt = torch.tensor(w).reshape(-1, *([1] * len(shape)))
    weighted = deltas * wt
    if elect:
        m = (weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0)).float()
        mixed, div = (weighted * m).sum(0), (wt * m).sum(0)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed, div = weighted.sum(0), wt.sum(0)
    expect = b + (mixed / div if normalize else mixed) * 0.7
    torch.testing.assert_close(whole[0], expect, rtol=1e-6, atol=1e-6)
