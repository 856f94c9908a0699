"""BitStack (Wang et al. 2024): the absolute-value decomposition against Eckart-Young worked by hand, the
global stack, and loading at any size."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compress_fixtures import calib, tiny_llama

from weightsmith.compress import compress, load_compressed, save_compressed
from weightsmith.compress._format import stack_sizes
from weightsmith.compress.bitstack import BitStack, BitStackWeight, decompose
from weightsmith.errors import WeightsmithError

torch.set_num_threads(1)


def test_first_block_by_hand_eckart_young():
    # |W| = [[1, 2], [3, 4]]: σ1² is the largest eigenvalue of [[10, 14], [14, 20]], 15 + sqrt(221); the
    # signs of W are kept exactly, so ‖W − B_0‖² = ‖W‖² − σ1² = 30 − 29.8661 = 0.1339
    W = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    w, history = decompose(W, torch.ones(2), levels=1, k=1)
    sigma1_sq = 15 + 221**0.5
    assert history[0] == pytest.approx(30.0)
    assert history[1] == pytest.approx(30 - sigma1_sq, abs=2e-3)  # u, v are float16
    B = w.dequantize()
    assert torch.equal(torch.sign(B), torch.sign(W))
    assert float((W - B).square().sum()) == pytest.approx(history[1], rel=1e-5)


def test_error_never_grows_and_blocks_sum_to_the_weight():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    s = torch.rand(40, generator=g) + 0.5
    w, history = decompose(W, s, levels=6, k=2)
    assert all(b <= a * (1 + 1e-4) for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < 0.5 * history[0]
    for n in (1, 3, 6):  # the first n blocks, scaled back, leave exactly the n-th residual
        R = (W - w.dequantize(n)) * s
        assert float(R.double().square().sum()) == pytest.approx(history[n], rel=1e-4)
    # a 1-bit sign matrix plus float16 factors per block
    assert w.block_bytes() == 24 * 5 + 2 * 2 * (24 + 40)


def test_activation_aware_scaling_lowers_output_error_on_salient_channels():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g)
    X = torch.randn(256, 48, generator=g)
    X[:, :4] *= 20  # salient input channels
    s = X.square().mean(0).sqrt()
    s = s / s.mean()
    plain, _ = decompose(W, torch.ones(48), levels=3, k=2)
    aware, _ = decompose(W, s, levels=3, k=2)
    err = lambda w: float(((W - w.dequantize()) @ X.T).norm())  # noqa: E731
    assert err(aware) < 0.8 * err(plain)


def _trained_tiny(steps: int = 60):
    """A tiny Llama that has learned a fixed token map (so compression error shows in its loss)."""
    m = tiny_llama(seed=3)
    m.train()
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        start = torch.randint(0, 256, (8, 1), generator=g)
        ids = (start + 7 * torch.arange(16)) % 256
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


def _pattern(n: int = 4, seed: int = 9) -> list[dict[str, torch.Tensor]]:
    start = torch.randint(0, 256, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + 7 * torch.arange(16)) % 256
    return [{"input_ids": ids[i : i + 2]} for i in range(0, n, 2)]


def _loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b, labels=b["input_ids"]).loss) for b in batches) / len(batches)


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    m = _trained_tiny()
    q, report = compress(copy.deepcopy(m), BitStack(levels=4, rank=4), calib=_pattern())
    out = save_compressed(q, report, tmp_path_factory.mktemp("bitstack") / "bs", format="weightsmith")
    return m, q, report, out


def test_loss_falls_with_size_along_the_stack(stacked):
    m, q, report, out = stacked
    sizes = stack_sizes(out)
    assert sizes == sorted(sizes) and len(sizes) == 1 + 14 * 3
    held_out = _pattern(seed=11)
    level_ends = [sizes[0], sizes[14], sizes[28], sizes[42]]  # every layer at 1, 2, 3, 4 blocks
    losses = [_loss(load_compressed(out, memory_mb=s), held_out) for s in level_ends]
    print(f"\n[bitstack tiny] dense {_loss(m, held_out):.4f}; per level {[round(x, 4) for x in losses]}")
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(_loss(q, held_out), rel=1e-5)


def test_any_size_loads_exactly_the_top_of_the_stack(stacked):
    _, q, report, out = stacked
    info = json.loads((out / "compression.json").read_text())
    order = info["stack"]["order"]
    sizes = stack_sizes(out)
    n = 10
    back = load_compressed(out, memory_mb=(sizes[n] + sizes[n + 1]) / 2)  # room for n blocks, not n + 1
    taken = {}
    for path, level in order[:n]:
        taken[path] = max(taken.get(path, 1), level + 1)
    for name, w in report.weights.items():
        assert isinstance(w, BitStackWeight)
        path = name[: -len(".weight")]
        expect = w.dequantize(taken.get(path, 1))
        assert torch.equal(back.get_parameter(name).detach(), expect), name
    full = load_compressed(out)
    ids = calib()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(full(ids).logits, q(ids).logits)
    with pytest.raises(WeightsmithError, match="needs at least"):
        load_compressed(out, memory_mb=sizes[0] * 0.9)


def test_error_sort_is_data_free_and_formats(tmp_path):
    q, report = compress(tiny_llama(), BitStack(levels=2, rank=2, activation_aware=False, sort="error"))
    assert all(w.position[1] >= 0 for w in report.weights.values())
    assert "bits/weight" in report.config.describe(report)
    with pytest.raises(WeightsmithError, match="BitStack"):
        save_compressed(q, report, tmp_path / "ct", format="compressed-tensors")
    out = save_compressed(q, report, tmp_path / "dense", format="dense")
    with pytest.raises(WeightsmithError, match="no BitStack stack"):
        load_compressed(out, memory_mb=10)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(load_compressed(out).get_parameter(name), q.get_parameter(name))


def test_bad_options():
    with pytest.raises(WeightsmithError, match="levels=0"):
        BitStack(levels=0)
    with pytest.raises(WeightsmithError, match="sort='best'"):
        BitStack(sort="best")
    with pytest.raises(WeightsmithError, match="rank=40 is larger than the matrix"):
        compress(tiny_llama(), BitStack(rank=40, sort="error", activation_aware=False))
    with pytest.raises(WeightsmithError, match="needs calibration data"):
        compress(tiny_llama(), BitStack())
