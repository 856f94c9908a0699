"""DELLA's MagPrune on the CPU: the packed-key ranking and the mask draw against their definitions.

Deep, Bhardwaj & Poria, "DELLA-Merging", 2024, Sec. 3: p_keep = (density - epsilon) + 2 epsilon r, r the
min-max normalised magnitude rank within the row. The CPU path ranks by sorting int64 keys
``bits(|x|) << 32 | position`` and draws the mask as ``torch.rand(...) < p``; these tests check both
against torch's stable argsort and ``torch.bernoulli`` on the same generator.
"""

from __future__ import annotations

import pytest
import torch

from weightsmith.merge import della as della_module
from weightsmith.merge.della import magnitude_ranks, magprune

torch.set_num_threads(1)


def by_definition(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """MagPrune without rescale, written out: stable ranks, the paper's keep probability, one bernoulli."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(delta.dtype)
    probs = (density - epsilon) + (ranks / max(n - 1, 1)) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed))
    return (rows * mask).reshape(delta.shape)


@pytest.mark.parametrize("shape", [(40, 300), (300,), (6, 5, 3, 3)])
def test_magprune_is_the_definition_with_stable_ranks(shape):
    torch.manual_seed(0)
    delta = torch.randn(shape)
    delta.view(-1)[::7] = 0.5  # many equal magnitudes: ties ranked by position
    delta.view(-1)[3::7] = -0.5
    got = magprune(delta.clone(), 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, by_definition(delta, 0.5, 0.2, 11))


def test_magprune_blocks_draw_as_one_bernoulli(monkeypatch):
    """Blocks of a few rows draw the same mask as one whole-tensor torch.bernoulli (the RNG order)."""
    delta = torch.randn(23, 17)
    whole = by_definition(delta, 0.4, 0.1, 5)
    monkeypatch.setattr(della_module, "PRUNE_BLOCK", 40)  # two rows per block
    got = magprune(delta.clone(), 0.4, 0.1, rescale=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, whole)


def test_magnitude_ranks_are_the_stable_order():
    x = torch.tensor([[3.0, -1.0, 1.0, 0.0, -3.0, 1.0], [2.0, 2.0, -2.0, 0.5, 2.0, -0.0]])
    expect = torch.tensor([[3, 1, 2, 5, 0, 4], [5, 3, 0, 1, 2, 4]])
    assert torch.equal(magnitude_ranks(x), expect)
    y = torch.randn(64, 257)
    assert torch.equal(magnitude_ranks(y), y.abs().argsort(dim=1, stable=True))
    # the fallbacks (float64, more than two dimensions) rank the same way
    assert torch.equal(magnitude_ranks(x.double()), expect)
    assert torch.equal(magnitude_ranks(x.unsqueeze(-1)).squeeze(-1), expect)
