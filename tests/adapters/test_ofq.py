"""OFQ (Liu et al. 2023): StatsQ and CGA's confidence worked by hand, the straight-through gradient,
freezing, merging to quantised weights, and QAT beating post-training quantisation on a toy regression."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.ofq import OFQ, confidence, level, stats_scale, statsq
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_statsq_and_confidence_by_hand():
    # mean|w| = 0.25, α = 0.5; 2 bits: n = 2, levels α (k + ½) / 2 = ±0.125, ±0.375.
    # t = clip(w / α) · 2 − ½ = [−0.1, −1.7, 1.5, −0.9] -> k = [0, −2, 2 -> clamp 1, −1]
    W = torch.tensor([[0.1, -0.3, 0.5, -0.1]])
    torch.testing.assert_close(statsq(W, 2), torch.tensor([[0.125, -0.375, 0.375, -0.125]]))
    # c = 1 − 2 |t − round(t)|: 0.8, 0.4, 0 (1.5 sits on a threshold), 0.8
    torch.testing.assert_close(confidence(W, 2), torch.tensor([[0.8, 0.4, 0.0, 0.8]]), atol=1e-6, rtol=0)


def _layer(bits: int = 2, **kw) -> tuple[nn.Sequential, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    m = nn.Sequential(lin)
    adapters.adapt(m, OFQ(bits=bits, **kw), targets="0")
    return m, lin


def test_forward_is_quantised_from_the_start_and_gradient_is_straight_through():
    m, lin = _layer()
    x = torch.randn(5, 16)
    W0 = lin.weight.detach().clone()
    Wq = statsq(W0, 2)
    assert len(torch.unique(Wq[0])) <= 4  # 2^2 levels per row
    torch.testing.assert_close(m(x), x @ Wq.T)  # not the base output: quantised at init
    (m(x) * torch.arange(8.0)).sum().backward()
    D = next(adapters.adapter_parameters(m))
    # d/dW_q of Σ_o o · y_o is o · x summed over rows; STE passes it unchanged to D
    torch.testing.assert_close(D.grad, torch.arange(8.0).unsqueeze(1) * x.sum(0).unsqueeze(0))


def test_cga_freezes_confident_weights_and_merge_writes_the_levels():
    m, lin = _layer(anneal_start=0.5, confidence=0.5)
    x = torch.randn(5, 16)
    layer = next(layer for _, layer in adapters.adapted_layers(m))
    a = layer.adapters["default"]
    m(x).square().sum().backward()
    adapters.adapter_step(m, 0, 10)  # before anneal_start: nothing frozen
    assert not a.frozen.any()
    m(x).square().sum().backward()
    adapters.adapter_step(m, 5, 10)
    W = layer.weight().detach().float()
    conf = confidence(W + a.D.detach(), 2)
    assert torch.equal(a.frozen, conf >= 0.5) and a.frozen.any() and not a.frozen.all()
    assert (a.D.grad[a.frozen] == 0).all() and (a.D.grad[~a.frozen] != 0).any()
    with torch.no_grad():  # move every latent weight by a whole bin: frozen ones keep their level
        a.D += 0.3 * torch.sign(a.D + 1e-9) + 0.3
    after = a.quantized(W).detach()
    alpha = stats_scale(W + a.D.detach())
    expect = level(a.frozen_k, alpha, 2)
    assert torch.equal(after[a.frozen], expect[a.frozen])
    assert not torch.equal(after[~a.frozen], level(a.frozen_k, alpha, 2)[~a.frozen])
    adapters.merge_adapters(m)
    torch.testing.assert_close(lin.weight.detach(), after)
    adapters.unmerge_adapters(m)
    torch.testing.assert_close(lin.weight.detach(), W)


def test_qat_beats_post_training_quantisation_on_a_toy_regression():
    # correlated inputs (rank ~6 of 16): QAT finds 2-bit weights that fit the data, rounding alone cannot
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 16, generator=g) * 0.3
    X = torch.randn(512, 6, generator=g) @ torch.randn(6, 16, generator=g) + 0.1 * torch.randn(
        512, 16, generator=g
    )
    Y = X @ teacher.T
    student = nn.Sequential(nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        student[0].weight.copy_(teacher)
    ptq = float((X @ statsq(teacher, 2).T - Y).square().mean())
    adapters.adapt(student, OFQ(bits=2, anneal_start=0.7), targets="0")
    opt = torch.optim.Adam(adapters.adapter_parameters(student), lr=1e-3)
    steps = 150
    for step in range(steps):
        loss = (student(X) - Y).square().mean() + adapters.adapter_regularization(student)
        loss.backward()
        adapters.adapter_step(student, step, steps)
        opt.step()
        opt.zero_grad()
    adapters.merge_adapters(student)
    qat = float((student(X) - Y).square().mean())
    print(f"\n[ofq toy] 2-bit MSE: post-training {ptq:.4f}, QAT {qat:.4f}")
    assert qat < 0.5 * ptq


def test_dampening_regulariser_and_bad_options():
    m, _ = _layer(dampen=0.1)
    assert float(adapters.adapter_regularization(m)) == 0.0  # nothing seen yet
    m(torch.randn(3, 16))
    assert float(adapters.adapter_regularization(m).detach()) > 0.0
    for opts, word in (
        ({"bits": 1}, "bits=1"),
        ({"confidence": 2.0}, "confidence=2.0"),
        ({"dampen": -1}, "dampen"),
    ):
        with pytest.raises(WeightsmithError, match=word):
            adapters.adapt(nn.Sequential(nn.Linear(4, 4)), OFQ(**opts), targets="0")
