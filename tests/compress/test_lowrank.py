"""Low-rank compressors checked against Eckart-Young / SVD-LLM's theorem and hand-worked allocations."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama
from torch import nn

from weightsmith.compress._lowrank import (
    LowRankLinear,
    Weighting,
    allocate_ranks,
    compress_lowrank,
    thin_linears,
    uniform_ranks,
    weighted_svd,
)
from weightsmith.compress.asvd import ASVD, cholesky_whitening
from weightsmith.compress.fwsvd import FWSVD, row_fisher
from weightsmith.compress.svd import SVD
from weightsmith.errors import WeightsmithError
from weightsmith.layers import find_layers

torch.set_num_threads(1)


def test_global_allocation_by_hand():
    # two 4x4 layers (8 params per rank, at most rank 2 pays off); rank 1 each costs 16 of the budget 24,
    # the one extra direction goes where relative energy is larger: b's 1/4 beats a's 1/5.02.
    spectra = {"a": torch.tensor([2.0, 1.0, 0.1, 0.1]), "b": torch.ones(4)}
    shapes = {"a": (4, 4), "b": (4, 4)}
    assert allocate_ranks(spectra, shapes, keep=0.75) == {"a": 1, "b": 2}
    assert allocate_ranks(spectra, shapes, keep=1.0) == {"a": 2, "b": 2}  # capped at out*in/(out+in)
    assert allocate_ranks(spectra, shapes, keep=0.1) == {"a": 1, "b": 1}  # never below rank 1
    assert uniform_ranks({"a": (8, 24)}, keep=0.5) == {"a": 3}  # 0.5 * 192 / 32


def test_plain_svd_is_eckart_young():
    torch.manual_seed(0)
    W = torch.randn(12, 20)
    f = weighted_svd(W, Weighting(), 5)
    S = torch.linalg.svdvals(W)
    assert f.A.shape == (12, 5) and f.B.shape == (5, 20) and f.params == 5 * 32
    assert float((W - f.dequantize()).norm() ** 2) == pytest.approx(float(S[5:].square().sum()), rel=1e-4)


def test_svdllm_whitening_truncation_loss_is_the_dropped_singular_values():
    # SVD-LLM Theorem 3.2: with S S^T = X^T X, ||(W - W_hat) X^T||_F^2 = sum of the dropped sigma_k(W S)^2
    torch.manual_seed(0)
    W = torch.randn(16, 24)
    X = torch.randn(400, 6) @ torch.randn(6, 24) + 0.2 * torch.randn(400, 24)
    S = cholesky_whitening(X.T @ X, damp=1e-9)
    torch.testing.assert_close(S @ S.T, X.T @ X, rtol=1e-3, atol=1e-2)
    f = weighted_svd(W, Weighting(right=S), 6)
    sig = torch.linalg.svdvals(W @ S)
    out_err = float(((W - f.dequantize()) @ X.T).norm() ** 2)
    assert out_err == pytest.approx(float(sig[6:].square().sum()), rel=1e-3)
    plain = weighted_svd(W, Weighting(), 6)
    assert out_err < 0.5 * float(((W - plain.dequantize()) @ X.T).norm() ** 2)


def test_fwsvd_minimises_the_row_weighted_error():
    torch.manual_seed(0)
    W = torch.randn(10, 16)
    imp = torch.tensor([100.0] * 3 + [1.0] * 7)  # three important rows
    f = weighted_svd(W, Weighting(left=imp.sqrt()), 3)
    plain = weighted_svd(W, Weighting(), 3)
    werr = lambda g: float((imp.sqrt().unsqueeze(1) * (W - g.dequantize())).norm())  # noqa: E731
    assert werr(f) == pytest.approx(
        float(torch.linalg.svdvals(imp.sqrt().unsqueeze(1) * W)[3:].norm()), rel=1e-4
    )
    assert werr(f) < werr(plain)
    assert float((W - f.dequantize())[:3].norm()) < float((W - plain.dequantize())[:3].norm())
    same = weighted_svd(W, Weighting(left=torch.full((10,), 3.0)), 3)  # a uniform weight changes nothing
    torch.testing.assert_close(same.dequantize(), plain.dequantize(), atol=1e-5, rtol=0)


class _Reg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))

    def forward(self, input_ids, labels):
        return {"loss": 0.5 * (self.lin(input_ids) - labels).square().sum()}


def test_row_fisher_by_hand():
    # loss = 0.5 ||W x - t||^2: dL/dW = (W x - t) x^T; x = [1, 2], t = 0: residual [1, 4], grad rows
    # [1, 2] and [4, 8]: row sums of squares 5 and 80 (twice that for two identical batches)
    m = _Reg()
    b = {"input_ids": torch.tensor([[1.0, 2.0]]), "labels": torch.zeros(1, 2)}
    ly = find_layers(m)
    f = row_fisher(m, ly, [b, b])
    torch.testing.assert_close(f[ly[0].name], torch.tensor([10.0, 160.0]))
    assert m.lin.weight.grad is None and m.lin.weight.requires_grad


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_lowrank_methods_on_a_tiny_llama_and_thin_linears():
    m = tiny_llama()
    ids = torch.cat([b["input_ids"] for b in calib(n=8, length=32, seed=5)])
    ref = _logits(m, ids)
    errs = {}
    for cfg in (SVD(keep=0.6), SVD(keep=0.6, allocation="uniform"), ASVD(keep=0.6), FWSVD(keep=0.6)):
        q, report = compress_lowrank(copy.deepcopy(m), cfg, calib=calib(n=8, length=32))
        dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
        kept = sum(f.params for f in report.weights.values())
        assert len(report.layers) == 14 and kept <= 0.6 * dense
        errs[(cfg.method, cfg.allocation)] = float((_logits(q, ids) - ref).norm() / ref.norm())
    assert errs[("asvd", "global")] < errs[("svd", "global")]
    # thin layers: same function, fewer parameters
    q, report = compress_lowrank(copy.deepcopy(m), ASVD(keep=0.5), calib=calib(n=8, length=32))
    before = sum(p.numel() for p in q.parameters())
    want = _logits(q, ids)
    thin_linears(q, report.weights)
    assert isinstance(q.model.layers[0].mlp.down_proj, LowRankLinear)
    assert sum(p.numel() for p in q.parameters()) < before
    torch.testing.assert_close(_logits(q, ids), want, atol=1e-4, rtol=1e-4)
    # a saved thin state dict loads into zero-filled thin layers of the recorded ranks
    fresh = thin_linears(tiny_llama(seed=3), {n: f.rank for n, f in report.weights.items()})
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-4, rtol=1e-4)


def test_bad_lowrank_options():
    for bad in (dict(keep=0.0), dict(keep=1.5), dict(allocation="best"), dict(rank=-1)):
        with pytest.raises(WeightsmithError):
            SVD(**bad)
    with pytest.raises(WeightsmithError, match="whiten"):
        ASVD(whiten="qr")
    with pytest.raises(WeightsmithError, match="larger than the matrix"):
        compress_lowrank(tiny_llama(), SVD(rank=65))
    with pytest.raises(WeightsmithError, match="calibration"):
        compress_lowrank(tiny_llama(), ASVD())
    with pytest.raises(WeightsmithError, match="calibration"):
        compress_lowrank(tiny_llama(), FWSVD())


def test_a_layer_left_out_of_choose_ranks_stays_dense():
    class FirstOnly(SVD):
        def choose_ranks(self, spectra, shapes):
            first = next(iter(shapes))
            return {first: 2}

    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m, report = compress_lowrank(m, FirstOnly(keep=0.5))
    (name,) = report.weights
    assert report.weights[name].rank == 2 and [r.name for r in report.layers] == [name]
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [name]
