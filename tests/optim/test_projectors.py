"""Projectors: orthonormal bases, rSVD close to SVD, DCT indices only, random projections unbiased, INT4
storage, Q-GaLore's lazy refresh, and the APOLLO update worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.optim import TransformOptimizer
from weightsmith.optim.apollo import ChannelScale
from weightsmith.optim.projection import LowRank, subspace_similarity
from weightsmith.optim.projectors import (
    DCT,
    SVD,
    Quantized,
    RandomizedSVD,
    RandomProjection,
    dct_basis,
    dequantize_int4,
    orthonormal,
    quantize_int4,
)
from weightsmith.optim.transform import ScaleByAdam

torch.set_num_threads(1)


def _low_rank_plus_noise(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor([10.0 * 0.7**i for i in range(r)])
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    return U @ torch.diag(spectrum) @ V.T + 0.01 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rsvd_finds_the_svd_subspace(side):
    G = _low_rank_plus_noise(48, 40, 6)
    exact, approx = {}, {}
    SVD().refresh(G, side, 4, exact, 0)
    RandomizedSVD().refresh(G, side, 4, approx, 0)
    P, Q = exact["P"], approx["P"]
    assert P.shape == Q.shape == ((48, 4) if side == "left" else (4, 40))
    eye = torch.eye(4)
    torch.testing.assert_close(Q.mT @ Q if side == "left" else Q @ Q.mT, eye, atol=1e-5, rtol=0)
    assert subspace_similarity(P, Q, side) > 0.999
    again: dict = {}
    RandomizedSVD().refresh(G, side, 4, again, 0)
    assert torch.equal(again["P"], Q)  # seeded


@pytest.mark.parametrize("side", ["left", "right"])
def test_rsvd_batched_refresh_equals_one_at_a_time(side):
    Gs = [_low_rank_plus_noise(36, 28, 5, seed) for seed in range(3)]
    one = [{} for _ in Gs]
    for G, st, seed in zip(Gs, one, range(3), strict=True):
        RandomizedSVD().refresh(G, side, 4, st, seed)
    many: list[dict] = [{} for _ in Gs]
    RandomizedSVD().refresh_batch(Gs, side, 4, many, list(range(3)))
    for a, b, G in zip(one, many, Gs, strict=True):
        torch.testing.assert_close(a["P"], b["P"], atol=1e-5, rtol=0)
        exact: dict = {}
        SVD().refresh(G, side, 4, exact, 0)
        assert subspace_similarity(exact["P"], b["P"], side) > 0.999


def test_optimizer_refreshes_same_shaped_weights_in_one_batch(monkeypatch):
    calls = []
    original = RandomizedSVD.refresh_batch

    def spy(self, Gs, *args):
        calls.append(len(Gs))
        return original(self, Gs, *args)

    monkeypatch.setattr(RandomizedSVD, "refresh_batch", spy)
    from weightsmith.optim import GaLoreAdamW

    params = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(3)] + [
        torch.nn.Parameter(torch.randn(6, 8))
    ]
    opt = GaLoreAdamW([{"params": params, "rank": 2, "update_proj_gap": 2, "projector": "rsvd"}], lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == [3, 1, 3, 1]  # refreshes at steps 0 and 2: the three 12 x 8 weights together


def test_dct_keeps_indices_of_the_most_energetic_basis_vectors():
    D = dct_basis(32)
    torch.testing.assert_close(D.T @ D, torch.eye(32), atol=1e-5, rtol=0)
    G = D[:, [3, 17, 5]] @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ torch.randn(3, 20)
    st: dict = {}
    DCT().refresh(G, "left", 3, st, 0)
    assert sorted(st) == ["dim", "idx"] and st["idx"].dtype == torch.int64
    assert set(st["idx"].tolist()) == {3, 5, 17}
    P = DCT().matrix(st, "left")
    torch.testing.assert_close(P @ (P.T @ G), G, atol=1e-4, rtol=0)  # the projection loses nothing here


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_random_projections_are_unbiased(kind):
    acc = torch.zeros(16, 16)
    trials = 400
    for seed in range(trials):
        st: dict = {}
        RandomProjection(kind).refresh(torch.zeros(16, 5), "left", 8, st, seed)
        acc += st["P"] @ st["P"].T
    torch.testing.assert_close(acc / trials, torch.eye(16), atol=0.2, rtol=0)
    if kind == "sparse":
        assert float((st["P"] == 0).float().mean()) > 0.5  # 1 - 1/sqrt(16) = 75 % zeros expected


def test_int4_projection_storage():
    P = torch.linalg.qr(torch.randn(64, 8))[0]
    packed, scale = quantize_int4(P, 64)
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 8 // 2 and scale.numel() == 8
    back = dequantize_int4(packed, scale, [64, 8], 64)
    step = float(scale.max())  # one quantisation step; rounding error is at most half of it
    assert float((back - P).abs().max()) <= step / 2 + 1e-6
    st: dict = {}
    q = Quantized(SVD())
    q.refresh(_low_rank_plus_noise(64, 30, 4), "left", 8, st, 0)
    assert "P" not in st and st["q"].dtype == torch.uint8 and st["qshape"] == [64, 8]


def test_lazy_refresh_grows_the_gap_when_the_subspace_stops_moving():
    G = _low_rank_plus_noise(20, 30, 3)
    t = LowRank(ScaleByAdam(), SVD(), rank=3, update_proj_gap=2, scale=1.0, lazy_threshold=0.9, lazy_window=2)
    w = torch.zeros(20, 30)
    st = t.init(w, "w")
    refreshed_at = []
    for step in range(24):
        before = st["refreshes"]
        _, st = t.update(G, st, w)  # the same gradient: the subspace never moves
        if st["refreshes"] > before:
            refreshed_at.append(step)
    # gap 2 at steps 0, 2, 4; each two similar refreshes double it: 4 (steps 8, 12), then 8 (step 20)
    assert refreshed_at == [0, 2, 4, 8, 12, 20]
    assert st["gap"] == 8

    eager = LowRank(ScaleByAdam(), SVD(), rank=3, update_proj_gap=2, scale=1.0)
    st2 = eager.init(w, "w")
    for _ in range(24):
        _, st2 = eager.update(G, st2, w)
    assert st2["refreshes"] == 12 and st2["gap"] == 2


def test_apollo_channel_update_by_hand():
    torch.manual_seed(0)
    G = torch.randn(10, 6)  # m >= n: right projection, channels are the 10 rows
    t = ChannelScale(rank=3, update_proj_gap=100, scale=2.0, growth_limit=None)
    w = torch.zeros(10, 6)
    st = t.init(w, "w")
    u, st = t.update(G, st, w)
    P = st["low"]["proj"]["right"]["P"]  # 3 x 6
    R = G @ P.T
    b1, b2 = 0.9, 0.999  # Adam's first step: m = (1-b1) R, v = (1-b2) R^2, bias-corrected
    N = (1 - b1) * R / (math.sqrt(1 - b2) * R.abs() + 1e-6) * math.sqrt(1 - b2) / (1 - b1)
    s = N.norm(dim=1) / (R.norm(dim=1) + 1e-8)
    torch.testing.assert_close(u, 2.0 * G * s[:, None], rtol=1e-5, atol=1e-6)


def test_apollo_norm_growth_limiter():
    p = torch.nn.Parameter(torch.zeros(8, 4))
    t = ChannelScale(rank=2, update_proj_gap=100, scale_type="tensor", growth_limit=1.01)
    opt = TransformOptimizer([p], t, lr=1.0)
    norms = []
    for k in range(3):
        p.grad = torch.randn(8, 4) * (1 + 10 * k)  # gradients that grow fast
        before = p.detach().clone()
        opt.step()
        norms.append(float((p.detach() - before).norm()))
    assert norms[1] <= 1.01 * norms[0] * (1 + 1e-5) and norms[2] <= 1.01 * norms[1] * (1 + 1e-5)


def test_gradnormlorp_splits_magnitude_and_direction():
    from weightsmith.optim.gradnorm import WeightNormalized

    torch.manual_seed(0)
    W = torch.randn(6, 5)
    v = W / W.norm(dim=1, keepdim=True)
    # full rank with the exact SVD projector: the projection loses nothing, so the direction update is Adam's
    # (its eps 1e-3 keeps the rounding-level direction gradient of the first case from being blown up to +-1)
    adam = ScaleByAdam(eps=1e-3)
    t = WeightNormalized(LowRank(adam, SVD(), rank=5, update_proj_gap=10, scale=1.0), adam)
    st = t.init(W, "w")
    G = 3.0 * v  # a gradient along the rows: only the magnitudes should move
    u, st = t.update(G, st, W)
    assert float((u - (u * v).sum(1, keepdim=True) * v).abs().max()) < 1e-3  # u is along v, row by row
    first = 3 * math.sqrt(1e-3) / (3 * math.sqrt(1e-3) + 1e-3)  # Adam's first step on grad_m = 3, eps 1e-3
    torch.testing.assert_close((u * v).sum(1), torch.full((6,), first), rtol=1e-4, atol=1e-4)
    G2 = torch.randn(6, 5)
    G2 = G2 - (G2 * v).sum(1, keepdim=True) * v  # orthogonal to every row: only directions move
    st2 = t.init(W, "w")
    u2, st2 = t.update(G2, st2, W)
    assert float((u2 * v).sum(1).abs().max()) < 1e-3
    assert float(u2.abs().max()) > 0.1


def test_gradnormlorp_optimizer_trains():
    from weightsmith.optim import configs

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 8)
    target = torch.randn(8, 12)
    x = torch.randn(64, 12)
    named = [("mlp.fc.weight", layer.weight), ("mlp.fc.bias", layer.bias)]
    opt = configs.GradNormLoRP(rank=4, update_proj_gap=5, scale=1.0, targets=("mlp",)).create(named, 5e-2)
    losses = []
    for _ in range(60):
        loss = (layer(x) - x @ target.T).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_rsvd_warm_refresh_tracks_a_drifting_gradient(side):
    G = _low_rank_plus_noise(48, 40, 6)
    state: dict = {}
    RandomizedSVD().refresh(G, side, 4, state, 0)
    drifted = G + 0.05 * _low_rank_plus_noise(48, 40, 6, seed=7)  # the next refresh's gradient
    RandomizedSVD().refresh(drifted, side, 4, state, 1)  # warm: one power iteration
    exact: dict = {}
    SVD().refresh(drifted, side, 4, exact, 0)
    assert subspace_similarity(exact["P"], state["P"], side) > 0.999


def test_cholesky_qr2_is_orthonormal_and_spans_the_columns():
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(3, 200, 12, generator=g) @ torch.diag(torch.logspace(0, -3, 12))  # cond 1e3
    Q = orthonormal(Y)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(12).expand(3, 12, 12), atol=1e-5, rtol=0)
    Qh, _ = torch.linalg.qr(Y)
    torch.testing.assert_close(Q @ (Q.mT @ Qh), Qh, atol=1e-4, rtol=0)  # same column space
    singular = torch.zeros(50, 3)
    singular[:, 0] = 1.0  # rank 1: Cholesky fails, Householder QR takes over
    assert orthonormal(singular).shape == (50, 3)
