"""SalUn checked by hand: the saliency mask is the top fraction of |∇ CE| worked out in closed form on
a one-layer net, masked unlearning never moves an unmasked weight, and random labelling makes a tiny
classifier forget its class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.adapters.salun import random_labels, saliency_masks, unlearn
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_mask_is_top_fraction_of_hand_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    # by hand: d mean CE / d logits = (softmax - onehot) / n; dW = that^T x, db = column sums
    with torch.no_grad():
        d = (torch.softmax(lin(x), -1) - F.one_hot(y, 2).float()) / 4
        flat = torch.cat([(d.T @ x).abs().flatten(), d.sum(0).abs()])  # 6 weights then 2 biases
    for fraction in (0.25, 0.5, 1.0):
        masks = saliency_masks(lin, [(x[:1], y[:1]), (x[1:], y[1:])], fraction=fraction)
        got = torch.cat([masks["weight"].flatten(), masks["bias"].flatten()])
        k = round(fraction * 8)
        assert int(got.sum()) == k
        assert set(got.nonzero().flatten().tolist()) == set(flat.topk(k).indices.tolist())
    assert lin.weight.grad is None  # .grad left alone


def _blobs(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y


def _trained() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _blobs()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_unmasked_weights_never_change_and_class_is_forgotten():
    net = _trained()
    x, y = _blobs()
    forget, retain = (x[y == 0], y[y == 0]), (x[y != 0], y[y != 0])
    assert (net(forget[0]).argmax(-1) == 0).float().mean() == 1.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    masks = saliency_masks(net, [forget], fraction=0.3)
    unlearn(net, forget, retain, masks=masks, epochs=30, lr=0.05, batch_size=16)
    for n, p in net.named_parameters():
        assert torch.equal(p[~masks[n]], before[n][~masks[n]]), n
        assert not torch.equal(p[masks[n]], before[n][masks[n]]), n
    with torch.no_grad():
        assert (net(forget[0]).argmax(-1) == 0).float().mean() < 0.5
        assert (net(retain[0]).argmax(-1) == retain[1]).float().mean() > 0.9


def test_random_labels_are_uniform_over_other_classes():
    y = torch.zeros(3000, dtype=torch.long)
    r = random_labels(y, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(r, minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 900


def test_bad_options_name_the_option():
    net = _trained()
    x, y = _blobs()
    with pytest.raises(WeightsmithError, match="fraction"):
        saliency_masks(net, [(x, y)], fraction=0.0)
    with pytest.raises(WeightsmithError, match="lr"):
        unlearn(net, (x, y), (x, y), lr=-1.0)
    with pytest.raises(WeightsmithError, match="unknown parameter"):
        unlearn(net, (x, y), (x, y), masks={"nope": torch.ones(1, dtype=torch.bool)})


def test_saliency_ignores_weights_the_loss_does_not_read():
    from weightsmith.adapters.salun import saliency_masks

    class WithUnused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 4)  # unused: gradient None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    model = WithUnused()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    masks = saliency_masks(model, [(x, y)], fraction=0.2)  # fewer than the used weights
    assert not masks["unused.weight"].any() and masks["used.weight"].any()
