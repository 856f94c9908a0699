"""Monarch projection as a compression: exact on Monarch matrices, Eckart-Young for one block."""

from __future__ import annotations

import pytest
import torch
from compress_fixtures import tiny_llama

from weightsmith.adapters.monarch import monarch_dense
from weightsmith.compress import compress
from weightsmith.compress._lowrank import Weighting, weighted_svd
from weightsmith.compress.monarch_compress import MonarchCompress, MonarchWeight, monarch_params
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_a_monarch_matrix_is_its_own_projection():
    g = torch.Generator().manual_seed(0)
    R, L = torch.randn(4, 8, 6, generator=g), torch.randn(4, 5, 8, generator=g)  # k = l = 4, b = 2
    M = monarch_dense(R, L)  # [20, 24]
    w = MonarchCompress(nblocks=4, block_rank=2).quantize(M, None)
    assert isinstance(w, MonarchWeight) and w.params == monarch_params((20, 24), 4, 2) == 2 * 4 * 44
    torch.testing.assert_close(w.dequantize(), M, atol=1e-4, rtol=1e-4)


def test_one_block_is_the_truncated_svd():
    # nblocks = 1: the Monarch matrix is one rank-b block, so the projection is Eckart-Young's truncation
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    w = MonarchCompress(nblocks=1, block_rank=3).quantize(W, None)
    err = float((W - w.dequantize()).norm() ** 2)
    assert err == pytest.approx(float(torch.linalg.svdvals(W)[3:].square().sum()), rel=1e-4)


def test_on_a_tiny_llama_against_svd_at_equal_parameters():
    m = tiny_llama()
    W = {n: p.detach().clone() for n, p in m.named_parameters()}
    m, report = compress(m, MonarchCompress(nblocks=4, block_rank=1))
    assert len(report.layers) == 14 and "Monarch factors hold" in report.config.describe(report)
    for r in report.layers:
        w = report.weights[r.name]
        svd = weighted_svd(W[r.name], Weighting(), 4)  # rank b·nblocks: the same number of parameters
        assert svd.params == w.params
        torch.testing.assert_close(dict(m.named_parameters())[r.name].detach(), w.dequantize())
        assert 0 < r.rel_error < 1


def test_bad_monarch_options():
    for bad in (dict(nblocks=0), dict(block_rank=0)):
        with pytest.raises(WeightsmithError):
            MonarchCompress(**bad)
    with pytest.raises(WeightsmithError, match="nblocks=5 does not divide"):
        compress(tiny_llama(), MonarchCompress(nblocks=5))
    with pytest.raises(WeightsmithError, match="block_rank=9 exceeds"):
        compress(tiny_llama(), MonarchCompress(nblocks=4, block_rank=9))
    with pytest.raises(WeightsmithError, match="no layout for Monarch factors; use --format weightsmith"):
        MonarchCompress().check_format("compressed-tensors")
