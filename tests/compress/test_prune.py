"""Pruners checked against their papers' formulas worked by hand on tiny matrices, and against each other."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import compress
from weightsmith.compress._sparse import nm_mask, pruned, select_mask, unstructured_mask
from weightsmith.compress.dsnot import DSnoT, dsnot
from weightsmith.compress.magnitude import Magnitude
from weightsmith.compress.sparsegpt import SparseGPT, sparsegpt_prune
from weightsmith.compress.wanda import Wanda, wanda_score
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_masks_by_hand():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    assert nm_mask(s, 2, 4).int().tolist() == [[1, 0, 1, 0, 0, 0, 1, 1]]
    assert unstructured_mask(s, 0.5, "row").int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    two = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert unstructured_mask(two, 0.5, "layer").int().tolist() == [[0, 0], [1, 1]]  # whole matrix
    assert unstructured_mask(two, 0.5, "row").int().tolist() == [[0, 1], [0, 1]]  # each row


def test_wanda_score_by_hand_differs_from_magnitude():
    # S_ij = |W_ij| ||X_j||: the small weight on the loud channel 1 beats the big one on the quiet channel 0
    W = torch.tensor([[2.0, -0.5, 1.0, 0.1]])
    norms = torch.tensor([0.1, 10.0, 1.0, 1.0])
    assert wanda_score(W, norms).tolist() == [[pytest.approx(0.2), 5.0, 1.0, pytest.approx(0.1)]]
    assert select_mask(wanda_score(W, norms), 0.5, 0, 0).int().tolist() == [[0, 1, 1, 0]]
    assert select_mask(W.abs(), 0.5, 0, 0).int().tolist() == [[1, 0, 1, 0]]


def test_wanda_beats_magnitude_on_outlier_channels():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 64)
    X[:, ::8] *= 30  # a few loud input features, as in LLMs
    norms = X.norm(dim=0)
    err = lambda keep: float(((W - W * keep) @ X.T).norm())  # noqa: E731
    for nm in ((0, 0), (2, 4)):
        assert err(select_mask(wanda_score(W, norms), 0.5, *nm)) < 0.8 * err(select_mask(W.abs(), 0.5, *nm))


def test_sparsegpt_obs_update_by_hand():
    # H^-1 = [[4/3, -2/3, 0], [-2/3, 4/3, 0], [0, 0, 1]]; scores w^2 / U_cc^2 = [0.0075, 1, 4]: column 0 goes,
    # and OBS moves w1 by -w0 * Hinv01 / Hinv00 = +0.05 (column 2 is uncorrelated and stays).
    W = torch.tensor([[0.1, 1.0, 2.0]])
    H = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = sparsegpt_prune(W, H, sparsity=1 / 3 + 1e-6, damp=1e-9)
    assert out.mask.int().tolist() == [[0, 1, 1]]
    torch.testing.assert_close(out.W, torch.tensor([[0.0, 1.05, 2.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_sparsegpt_reconstructs_below_wanda(nm):
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 8) @ torch.randn(8, 64) + 0.3 * torch.randn(512, 64)
    H = 2 * X.T @ X / X.shape[0]
    sg = sparsegpt_prune(W, H, 0.5, *nm, block_size=16)
    wa = pruned(W, select_mask(wanda_score(W, X.norm(dim=0)), 0.5, *nm), *nm)
    err = lambda sw: float(((W - sw.W) @ X.T).norm())  # noqa: E731
    assert sg.sparsity == pytest.approx(0.5) and err(sg) < 0.8 * err(wa)
    if nm[1]:
        assert sg.mask.view(32, 16, 4).sum(-1).eq(2).all()
        assert bool((sg.W != 0).view(32, 16, 4).sum(-1).le(2).all())


def test_dsnot_swap_by_hand():
    # Wanda (unit norms) prunes 0.2 and 0.21: e = 0.41. Grow 0.21 (largest same-sign contribution), prune
    # -0.3 (the only kept weight pulling e down): e = 0.41 - 0.21 - 0.3 = -0.1, smaller; sign flipped: stop.
    W = torch.tensor([[1.0, 0.2, 0.21, -0.3]])
    one = torch.ones(4)
    init = pruned(W, select_mask(wanda_score(W, one), 0.5, 0, 0))
    out, swaps = dsnot(W, init, mean=one, var=one, norms=one, threshold=0.0)
    assert swaps == 1 and out.mask.int().tolist() == [[1, 0, 1, 0]]
    torch.testing.assert_close(out.W, torch.tensor([[1.0, 0.0, 0.21, 0.0]]))
    low_var = torch.tensor([1.0, 0.01, 1.0, 1.0])  # the var-weighted rank now grows 0.2 instead
    out, _ = dsnot(W, init, mean=one, var=low_var, norms=one, threshold=0.0)
    assert out.mask.int().tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_dsnot_lowers_mean_error_and_keeps_the_pattern(nm):
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = torch.randn(2000, 128) * torch.rand(128) * 3 + torch.randn(128)
    mu, var, norms = X.mean(0), X.var(0, unbiased=False), X.norm(dim=0)
    init = pruned(W, select_mask(wanda_score(W, norms), 0.6, *nm), *nm)
    out, swaps = dsnot(W, init, mu, var, norms)
    e = lambda sw: float(((W - sw.W) @ mu).abs().mean())  # noqa: E731
    assert swaps > 0 and e(out) < 0.7 * e(init)
    assert out.mask.sum(1).tolist() == init.mask.sum(1).tolist()
    if nm[1]:
        assert out.mask.view(64, 32, 4).sum(-1).eq(2).all()


def _run(cfg):
    m = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in calib(n=8, length=32, seed=5)])
    with torch.no_grad():
        ref = m(ids).logits
        q, report = compress(copy.deepcopy(m), cfg, calib=calib(n=8, length=32))
        err = float((q(ids).logits - ref).norm() / ref.norm())
    return q, report, err


def test_pruners_through_compress_on_a_tiny_llama():
    _, _, mag = _run(Magnitude(sparsity=0.5))
    q, report, sg = _run(SparseGPT(sparsity=0.5, block_size=16))
    assert len(report.layers) == 14 and sg < mag
    W = q.model.layers[0].mlp.down_proj.weight
    assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    q, report, _ = _run(Wanda(n=2, m=4))
    W = q.model.layers[1].self_attn.q_proj.weight
    assert (W != 0).view(W.shape[0], -1, 4).sum(-1).eq(2).all()
    q, _, _ = _run(DSnoT(sparsity=0.5, init="magnitude"))
    W = q.model.layers[1].mlp.up_proj.weight
    assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_bad_pruning_options():
    for bad in (dict(sparsity=1.0), dict(sparsity=-0.1), dict(n=4, m=4), dict(n=0, m=4), dict(n=3, m=2)):
        with pytest.raises(WeightsmithError):
            Wanda(**bad)
    with pytest.raises(WeightsmithError, match="prune_scope"):
        Magnitude(prune_scope="column")
    with pytest.raises(WeightsmithError, match="init"):
        DSnoT(init="random")
    with pytest.raises(WeightsmithError, match="does not divide the input size 6"):
        Magnitude(n=2, m=4).prune(torch.randn(3, 6), None)
    with pytest.raises(WeightsmithError, match="calibration"):
        Wanda().prune(torch.randn(3, 8), None)


def test_bitmask_layouts_match_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.utils.helpers")
    from weightsmith.compress._sparse import (
        bitmask_tensors,
        dense_from_bitmask,
        pack_mask,
        sparse24_tensors,
        unpack_mask,
    )

    torch.manual_seed(0)
    W = torch.randn(6, 20)
    for sw in (pruned(W, select_mask(W.abs(), 0.6, 0, 0)), pruned(W, nm_mask(W.abs(), 2, 4), 2, 4)):
        assert torch.equal(pack_mask(sw.mask), ct.pack_bitmasks(sw.mask))  # the peer's packing
        assert torch.equal(ct.unpack_bitmasks(pack_mask(sw.mask), [6, 20]), sw.mask)
        assert torch.equal(unpack_mask(pack_mask(sw.mask), 20), sw.mask)
        t = bitmask_tensors("p", sw, torch.float16)
        assert t["p.row_offsets"].tolist() == [0, *sw.mask.sum(1).cumsum(0)[:-1].tolist()]
        assert torch.equal(dense_from_bitmask(t["p.compressed"], t["p.bitmask"], t["p.shape"]), sw.W.half())
    t = sparse24_tensors("p", sw, torch.float32)
    assert t["p.compressed"].shape == (6, 10) and t["p.shape"].shape == (2, 1)
    assert torch.equal(dense_from_bitmask(t["p.compressed"], t["p.bitmask"], t["p.shape"]), sw.W)
    with pytest.raises(WeightsmithError, match="2:4"):
        sparse24_tensors("p", pruned(W, select_mask(W.abs(), 0.5, 0, 0)), torch.float32)


@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
def test_dsnot_config_on_each_init_keeps_sparsity_and_lowers_the_mean_error(init):
    from weightsmith.layers import InputStats, StatsSpec

    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(1000, 64) * torch.rand(64) * 2 + torch.randn(64)
    cfg = DSnoT(sparsity=0.6, init=init, threshold=0.0)
    stats = InputStats("x", cfg.stats_spec())
    stats.add(X)
    base, out = cfg.base().prune(W, stats), cfg.prune(W, stats)
    e = lambda sw: float(((W - sw.W) @ X.mean(0)).abs().mean())  # noqa: E731
    assert out.sparsity == pytest.approx(base.sparsity) and e(out) < e(base)
    assert StatsSpec(gram=init == "sparsegpt", channels=True) == cfg.stats_spec()
