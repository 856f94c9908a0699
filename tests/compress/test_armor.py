"""ARMOR: each block-coordinate step checked against a least-squares solver or brute force, the descent as a
whole against Wanda and SparseGPT, the factored tensors, and bad options."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress._sparse import bitmask_tensors, dense_from_bitmask, nm_mask, pruned, select_mask
from weightsmith.compress.armor import (
    ARMOR,
    armor_fit,
    armor_tensors,
    block_left,
    block_right,
    densify_armor,
    proxy_loss,
    update_a,
    update_b,
    update_groups,
)
from weightsmith.compress.sparsegpt import sparsegpt_prune
from weightsmith.compress.wanda import wanda_score
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def _blocks(nb: int, b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(b) + 0.3 * torch.randn(nb, b, b, generator=g)


def test_block_products_match_torch_block_diag():
    A, B = _blocks(3, 4, 0), _blocks(2, 4, 1)
    X = torch.randn(12, 8)
    torch.testing.assert_close(block_left(A, X), torch.block_diag(*A) @ X)
    torch.testing.assert_close(block_right(X, B), X @ torch.block_diag(*B))


def test_a_and_b_steps_are_the_least_squares_solutions():
    torch.manual_seed(0)
    W, S = torch.randn(8, 12), torch.randn(8, 12)
    A, B = _blocks(2, 4, 2), _blocks(3, 4, 3)
    h = torch.rand(12) + 0.1
    D = h.sqrt()
    P = block_right(S, B)
    newA = update_a(W, S, B, h, 4)
    for i in range(2):  # min over A_i of ||(W_i - A_i P_i) D||: a weighted least-squares problem
        r = slice(4 * i, 4 * i + 4)
        ref = torch.linalg.lstsq((P[r] * D).T.double(), (W[r] * D).T.double()).solution.T
        torch.testing.assert_close(newA[i].double(), ref, atol=1e-4, rtol=1e-4)
    newB = update_b(W, A, S, 4)
    Q = block_left(A, S)
    for k in range(3):  # the column weights h drop out: each column of B_k is its own problem
        c = slice(4 * k, 4 * k + 4)
        ref = torch.linalg.lstsq(Q[:, c].double(), W[:, c].double()).solution
        torch.testing.assert_close(newB[k].double(), ref, atol=1e-4, rtol=1e-4)
    base = proxy_loss(W, A, S, B, h)
    assert proxy_loss(W, newA, S, B, h) <= base and proxy_loss(W, A, S, newB, h) <= base


def test_group_step_finds_the_best_pattern_by_brute_force():
    # one tile (b = 4): the step re-chooses one group of 4; brute force over the 6 patterns of 2 with
    # least-squares values (everything else fixed) must reach the same loss.
    torch.manual_seed(1)
    W = torch.randn(4, 4)
    A, B = _blocks(1, 4, 4), _blocks(1, 4, 5)
    h = torch.rand(4) + 0.2
    keep = nm_mask(torch.rand(4, 4), 2, 4)
    S = torch.randn(4, 4) * keep
    S2, keep2 = update_groups(W, A, S, B, keep, h, 2, 4)
    changed = [r for r in range(4) if not torch.equal(S2[r], S[r])]
    assert len(changed) <= 1 and keep2.sum(1).eq(2).all()
    r = changed[0] if changed else None
    assert r is not None
    best = float("inf")
    for pat in itertools.combinations(range(4), 2):
        cols = list(pat)
        Sx = S.clone()
        Sx[r] = 0
        base = W - block_left(A, block_right(Sx, B))  # what row r's group must explain
        a = A[0][:, r]
        M = torch.stack([torch.outer(a, B[0][c]).flatten() * h.sqrt().repeat(4) for c in cols], 1)
        sol = torch.linalg.lstsq(M.double(), (base * h.sqrt()).flatten().double()).solution.float()
        Sx[r, cols] = sol
        best = min(best, proxy_loss(W, A, Sx, B, h))
    assert proxy_loss(W, A, S2, B, h) == pytest.approx(best, rel=1e-4)


def test_armor_descends_below_wanda_and_sparsegpt_on_the_layer_output():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = torch.randn(2048, 128) * (torch.rand(128) * 3)  # independent channels of very different scales
    h = X.square().mean(0)
    init = pruned(W, select_mask(wanda_score(W, X.norm(dim=0)), 0.0, 2, 4), 2, 4)
    aw = armor_fit(W, init, h, block_size=16, iters=15)
    assert all(b <= a * (1 + 1e-5) for a, b in zip(aw.losses, aw.losses[1:], strict=False))
    assert aw.losses[-1] < 0.5 * aw.losses[0]
    assert aw.core.mask.view(64, 32, 4).sum(-1).eq(2).all()
    assert bool((aw.core.W != 0).view(64, 32, 4).sum(-1).le(2).all())
    err = lambda Wh: float(((W - Wh) @ X.T).norm())  # noqa: E731
    sg = sparsegpt_prune(W, 2 * X.T @ X / X.shape[0], 0.5, 2, 4)
    assert err(aw.dequantize()) < 0.8 * err(init.W) and err(aw.dequantize()) < err(sg.W)


def test_armor_through_compress_and_its_factored_tensors(tmp_path):
    m = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in calib(n=8, length=32, seed=5)])
    with torch.no_grad():
        ref = m(ids).logits
        q, report = compress(copy.deepcopy(m), ARMOR(block_size=32, iters=3), calib=calib(n=8, length=32))
        assert len(report.layers) == 14
        w = report.weights["model.layers.0.mlp.down_proj.weight"]
        torch.testing.assert_close(q.model.layers[0].mlp.down_proj.weight, w.dequantize())
        assert w.params == int(w.mask.sum()) + 2 * 32 * 32 + 4 * 32 * 32
        assert "correctors add" in report.config.describe(report)
        err = float((q(ids).logits - ref).norm() / ref.norm())
    assert err < 1.0
    # the weightsmith-format tensors (core as a bitmask, corrector blocks) rebuild A S B
    name, path = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"
    t = armor_tensors(name, path, w, torch.float32)
    assert set(t) == set(bitmask_tensors(name, w.core, torch.float32)) | {
        f"{path}.armor_a",
        f"{path}.armor_b",
    }
    state = {name: dense_from_bitmask(t[f"{name}.compressed"], t[f"{name}.bitmask"], t[f"{name}.shape"])}
    state.update({k: v for k, v in t.items() if "armor" in k})
    densify_armor(state)
    assert set(state) == {name}
    torch.testing.assert_close(state[name], w.dequantize(), atol=1e-5, rtol=1e-5)
    # the writers: dense, and weightsmith (core as a bitmask plus corrector blocks) reloading A S B
    save_compressed(q, report, tmp_path / "d", format="dense")
    W = load_compressed(tmp_path / "d").model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(W, w.dequantize())
    save_compressed(q, report, tmp_path / "w", format="weightsmith")
    W = load_compressed(tmp_path / "w").model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(W, w.dequantize(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["wanda", "sparsegpt"])
def test_armor_starts_from_the_wanda_or_sparsegpt_core(init):
    from weightsmith.layers import InputStats

    torch.manual_seed(0)
    W, X = torch.randn(16, 32), torch.randn(200, 32) * (torch.rand(32) * 3)
    cfg = ARMOR(block_size=8, init=init, damp=0.05)
    stats = InputStats("x", cfg.stats_spec())
    stats.add(X)
    core = cfg.base().prune(W, stats)
    if init == "wanda":  # keep the 2 largest |W_ij| * ||X_j|| of every 4 inputs of a row
        ref = pruned(W, nm_mask(W.abs() * X.norm(dim=0), 2, 4), 2, 4)
    else:
        ref = sparsegpt_prune(W, stats.hessian(), 0.5, 2, 4, damp=0.05)
    assert torch.equal(core.mask, ref.mask) and (core.n, core.m) == (2, 4)
    torch.testing.assert_close(core.W, ref.W)


def test_bad_armor_options():
    with pytest.raises(WeightsmithError, match="armor options n=0, m=0"):
        ARMOR(n=0, m=0)
    with pytest.raises(WeightsmithError, match="n=4, m=4"):
        ARMOR(n=4, m=4)
    with pytest.raises(WeightsmithError, match="sparsity"):
        ARMOR(sparsity=1.0)
    with pytest.raises(WeightsmithError, match="block_size=6"):
        ARMOR(block_size=6)
    with pytest.raises(WeightsmithError, match="init"):
        ARMOR(init="magnitude")
    with pytest.raises(WeightsmithError, match="iters"):
        ARMOR(iters=-1)
    with pytest.raises(WeightsmithError, match="block_size=48 does not divide"):
        compress(tiny_llama(), ARMOR(block_size=48), calib=calib())
    with pytest.raises(WeightsmithError, match="M=8 does not divide the input size 12"):
        ARMOR(m=8, n=2, block_size=8).check_layers([_FakeLayer((16, 12))])
    with pytest.raises(WeightsmithError, match="calibration"):
        ARMOR().prune(torch.randn(64, 64), None)


class _FakeLayer:
    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape, self.name = shape, "fake.weight"
