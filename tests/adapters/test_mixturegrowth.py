"""MixtureGrowth checked by hand: the grown layers are the block grid of the small networks' layers, the
new blocks are convex combinations of the templates (recovered by least squares), and with zero new
blocks the grown network computes exactly the mean of the small networks' logits."""

from __future__ import annotations

import pytest
import torch

from weightsmith.adapters.mixturegrowth import combine, grow
from weightsmith.errors import WeightsmithError
from weightsmith.zoo import MLP

torch.set_num_threads(1)


def _small(seed: int, hidden: tuple[int, ...] = (5, 5)) -> MLP:
    torch.manual_seed(seed)
    return MLP(4, hidden, 3)


def test_combine_by_hand():
    eye = torch.eye(2)
    assert torch.equal(combine([eye, 2 * eye], torch.tensor([0.25, 0.75])), 1.75 * eye)


def test_zero_new_blocks_compute_the_mean_of_the_small_networks():
    a, b = _small(0), _small(1)
    big = grow([a, b], new="zero")
    assert big.hidden == (10, 10)
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert torch.allclose(big(x), (a(x) + b(x)) / 2, atol=1e-6)


def test_mixture_blocks_are_convex_combinations_of_the_templates():
    a, b, c = _small(0), _small(1), _small(2)
    big = grow([a, b, c], new="mixture", seed=3)
    W = big.net[2].weight.detach()
    T = [m.net[2].weight.detach() for m in (a, b, c)]
    for i in range(3):
        for j in range(3):
            block = W[5 * i : 5 * i + 5, 5 * j : 5 * j + 5]
            if i == j:
                assert torch.equal(block, T[i])
                continue
            A = torch.stack([t.flatten() for t in T], 1).double()
            coef = torch.linalg.lstsq(A, block.flatten().double()[:, None]).solution.flatten()
            assert torch.allclose(A @ coef, block.flatten().double(), atol=1e-6)
            assert bool((coef > -1e-6).all()) and float(coef.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(big.net[0].weight[5:10], b.net[0].weight)  # first layer: rows stacked
    assert torch.allclose(big.net[4].weight[:, :5], a.net[4].weight / 3)  # last layer: outputs averaged
    random = grow([a, b, c], new="random", seed=3).net[2].weight.detach()
    assert float(random[:5, 5:10].abs().max()) <= 15**-0.5  # nn.Linear's bound at the grown fan-in


def test_bad_options_name_the_option():
    with pytest.raises(WeightsmithError, match="new"):
        grow([_small(0), _small(1)], new="copy")
    with pytest.raises(WeightsmithError, match="at least 2"):
        grow([_small(0)])
    with pytest.raises(WeightsmithError, match="architecture"):
        grow([_small(0), _small(1, (6, 6))])
