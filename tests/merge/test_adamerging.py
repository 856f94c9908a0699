"""AdaMerging (Yang et al., ICLR 2024): the start is task arithmetic, the gradient is the entropy's (finite
differences of -Σ p log p by hand), steps lower the entropy, and a recipe on tiny Llama checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_regmean import tiny_llama_family
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.merge import merge
from weightsmith.merge.adamerging import AdaMerging, learn_adamerging
from weightsmith.store import open_store


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(input_ids)))


def _setup(k: int = 2):
    torch.manual_seed(0)
    net = Net()
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = torch.Generator().manual_seed(1)
    taus = [{n: 0.5 * torch.randn(p.shape, generator=g) for n, p in base.items()} for _ in range(k)]
    data = [[{"input_ids": torch.randn(8, 3, generator=g)}] for _ in range(k)]
    return net, base, taus, data


def _entropy_by_hand(net, params, x):
    p = torch.softmax(torch.func.functional_call(net, params, (x,)), -1)
    return float(-(p * p.log()).sum(-1).mean())


def test_zero_steps_is_task_arithmetic_at_init():
    net, base, taus, data = _setup()
    res = learn_adamerging([net, net], base, taus, data, AdaMerging(steps=0, init=0.3))
    state = res.state(base, taus)
    for n in base:
        torch.testing.assert_close(state[n], base[n] + 0.3 * (taus[0][n] + taus[1][n]))
    assert res.coef.shape == (2, len(base))
    assert learn_adamerging(
        [net, net], base, taus, data, AdaMerging(steps=0, granularity="task")
    ).coef.shape == (2, 1)


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_one_step_follows_the_entropy_gradient(granularity):
    """Adam's first step moves each coefficient by -lr * sign(gradient); the sign is checked against central
    finite differences of the summed entropy computed by hand."""
    net, base, taus, data = _setup()
    cfg = AdaMerging(steps=1, lr=1e-3, granularity=granularity)
    res = learn_adamerging([net, net], base, taus, data, cfg)
    names = res.names
    eps = 1e-3

    def loss(coef):
        params = {n: base[n] + sum(coef[k, j if coef.shape[1] > 1 else 0] * taus[k][n] for k in range(2))
                  for j, n in enumerate(names)}  # fmt: skip
        return sum(_entropy_by_hand(net, params, d[0]["input_ids"]) for d in data)

    start = torch.full_like(res.coef, 0.3)
    for k in range(2):
        for j in range(res.coef.shape[1]):
            e = torch.zeros_like(start)
            e[k, j] = eps
            fd = (loss(start + e) - loss(start - e)) / (2 * eps)
            if abs(fd) > 1e-4:
                assert float(res.coef[k, j] - start[k, j]) == pytest.approx(
                    -1e-3 * (1 if fd > 0 else -1), rel=1e-3
                )


def test_steps_lower_the_entropy():
    net, base, taus, data = _setup(3)
    res = learn_adamerging([net] * 3, base, taus, data, AdaMerging(steps=30, lr=5e-2))
    assert res.losses[-1] < res.losses[0] - 1e-3


def test_bad_options_name_the_option():
    for opts, word in (
        ({"granularity": "block"}, "granularity"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(WeightsmithError, match=word):
            AdaMerging(**opts)


def test_recipe_on_a_tiny_llama(tmp_path, minilm_dir):
    base, fts = tiny_llama_family(tmp_path, minilm_dir)
    cfg = AdaMerging(
        data=("hamlet",), samples=2, seq_len=12, batch_size=2, steps=2, lr=1e-2, granularity="task"
    )
    out = open_store(merge(fts, cfg, tmp_path / "out", base=base))
    b, f0, f1 = open_store(base), open_store(fts[0]), open_store(fts[1])
    name = "model.layers.1.mlp.up_proj.weight"
    tau = f0[name] - b[name], f1[name] - b[name]
    # task-wise: one coefficient per task, shared by every tensor; recover them from one tensor, check another
    A = torch.stack([t.flatten() for t in tau], 1)
    lam = torch.linalg.lstsq(A, (out[name] - b[name]).flatten()[:, None]).solution.flatten()
    assert all(abs(float(v) - 0.3) < 0.05 and abs(float(v) - 0.3) > 1e-4 for v in lam)
    other = "model.embed_tokens.weight"
    torch.testing.assert_close(
        out[other],
        b[other] + lam[0] * (f0[other] - b[other]) + lam[1] * (f1[other] - b[other]),
        atol=1e-5,
        rtol=1e-4,
    )
    with pytest.raises(WeightsmithError, match="base"):
        merge(fts, cfg, tmp_path / "o2")
