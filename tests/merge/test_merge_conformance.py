"""Conformance of every registered task-arithmetic-family merge kernel, plus hand-worked paper examples."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import weightsmith.merge  # noqa: F401  (registers every merge method)
from weightsmith.config import registered
from weightsmith.errors import WeightsmithError
from weightsmith.linalg import magnitude_threshold
from weightsmith.merge import merge_state_dicts
from weightsmith.merge._chunked import CHUNK, chunk_generator, merge_streamed
from weightsmith.merge.task_arithmetic import (
    DARE,
    DARETIES,
    GTA,
    TIES,
    Average,
    GTAMethod,
    TaskArithmetic,
    merge_tensors,
    trim_magnitude,
)

FAMILY = [name for name, cls in registered("merge").items() if issubclass(cls, GTAMethod)]


def identity_config(name: str):
    """The method with its sparsification switched off (density 1 / p = 0)."""
    cls = registered("merge")[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {"density": 1.0} if "density" in fields else {}
    kw.update({"p": 0.0} if "p" in fields else {})
    return cls(**kw)


def tensors(n: int = 3, shape=(24, 10), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def test_family_is_registered():
    assert {"average", "task_arithmetic", "ties", "dare", "dare_ties", "gta"} <= set(FAMILY)


@pytest.mark.parametrize("name", FAMILY)
def test_one_task_with_weight_one_returns_that_task(name):
    base, (theta,) = tensors(1)
    out = merge_tensors(base, [theta], identity_config(name), weights=[1.0])
    torch.testing.assert_close(out, theta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY)
def test_symmetric_methods_ignore_input_order(name):
    cfg = registered("merge")[name]()
    if not cfg.gta().symmetric:
        pytest.skip(f"{name} draws its random masks per input position")
    (b1, t1), (b2, t2) = tensors(3), tensors(3, (7, 5), seed=9)
    base = {"x": b1, "y": b2}
    models = [{"x": a, "y": b} for a, b in zip(t1, t2, strict=True)]
    w = [0.5, 1.0, 2.0]
    fwd = merge_state_dicts(base, models, cfg, weights=w)
    rev = merge_state_dicts(base, models[::-1], cfg, weights=w[::-1])
    for k in base:
        torch.testing.assert_close(fwd[k], rev[k], rtol=0, atol=1e-6)


def test_ties_without_trim_or_election_is_task_arithmetic():
    base, thetas = tensors(4)
    ta = merge_tensors(base, thetas, TaskArithmetic(scaling=0.7))
    ties = merge_tensors(base, thetas, GTA("magnitude", 1.0, scaling=0.7))  # density 1, no sign election
    torch.testing.assert_close(ties, ta, rtol=0, atol=1e-6)
    torch.testing.assert_close(ta, base + 0.7 * sum(t - base for t in thetas), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_dare_with_p_zero_is_task_arithmetic(rescale):
    base, thetas = tensors(3)
    dare = merge_tensors(base, thetas, DARE(p=0.0, scaling=0.5, rescale=rescale))
    torch.testing.assert_close(dare, merge_tensors(base, thetas, TaskArithmetic(scaling=0.5)), rtol=0, atol=0)


def test_dare_rescale_keeps_the_expectation():
    """E[drop(tau)/(1-p)] = tau: per entry the mean of n draws has std |tau| sqrt(p/(1-p)/n)."""
    p, n = 0.7, 400
    base = torch.zeros(64)
    tau = torch.linspace(-1.0, 1.0, 64)
    draws = torch.stack([merge_tensors(base, [tau], DARE(p=p), seeds=[i]) for i in range(n)])
    kept = (draws != 0).float().mean()
    assert abs(float(kept) - (1 - p)) < 4 * math.sqrt(p * (1 - p) / draws.numel())
    sd = tau.abs() * math.sqrt(p / (1 - p) / n)
    assert bool(((draws.mean(0) - tau).abs() <= 4 * sd + 1e-7).all())
    # every survivor is exactly tau / (1 - p)
    survivors = draws != 0
    torch.testing.assert_close(draws[survivors], (tau / (1 - p)).expand_as(draws)[survivors])


def test_ties_worked_by_hand():
    """Yadav et al. 2023, Algorithm 1 on a 5-entry example (k = 40%, disjoint mean, lambda = 1)."""
    base = torch.zeros(5)
    t1 = torch.tensor([0.9, -0.1, 0.5, 0.0, -0.8])
    t2 = torch.tensor([-0.7, 0.2, 0.6, 0.3, 0.05])
    t3 = torch.tensor([0.4, 0.0, -0.2, -0.9, 0.1])
    # trim (top 2 of 5 by magnitude): t1 -> [.9, 0, 0, 0, -.8]; t2 -> [-.7, 0, .6, 0, 0];
    # t3 -> [.4, 0, 0, -.9, 0]
    # elect: sums [.6, 0, .6, -.9, -.8] -> signs [+, + (tie), +, -, -]
    # disjoint mean: [(.9+.4)/2, 0, .6, -.9, -.8]
    expected = torch.tensor([0.65, 0.0, 0.6, -0.9, -0.8])
    out = merge_tensors(base, [t1, t2, t3], TIES(density=0.4, trim="tensor"))
    torch.testing.assert_close(out, expected)


def ties_stacked(base, thetas, density, weights, weighted_vote):
    """Reference: TIES with all trimmed task vectors stacked (as the paper's code does)."""
    taus = torch.stack([trim_magnitude(t - base, density) for t in thetas])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    vote = (taus * w).sum(0) if weighted_vote else taus.sum(0)
    gamma = torch.where(vote >= 0, 1.0, -1.0)
    agree = torch.sign(taus * w if weighted_vote else taus) == gamma
    num = (taus * w * agree).sum(0)
    den = agree.sum(0).clamp_min(1)
    return base + num / den


@pytest.mark.parametrize("weighted_vote", [False, True])
def test_one_pass_ties_equals_the_stacked_algorithm(weighted_vote):
    base, thetas = tensors(5, (40, 30), seed=3)
    w = [1.0, 0.3, 2.0, 0.7, 1.1]
    out = merge_tensors(base, thetas, TIES(density=0.3, trim="tensor", weighted_election=weighted_vote), w)
    torch.testing.assert_close(out, ties_stacked(base, thetas, 0.3, w, weighted_vote), rtol=0, atol=1e-6)


def test_magnitude_threshold_is_the_kth_largest():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(s, generator=g) for s in [(100, 7), (333,), (5, 5, 5)]]
    flat = torch.cat([c.reshape(-1) for c in chunks]).abs()
    for k in (1, 17, 500, flat.numel()):
        assert magnitude_threshold(lambda: chunks, k) == float(torch.topk(flat, k).values[-1])


def test_trim_keeps_exactly_k_with_ties():
    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 0.2])
    kept = trim_magnitude(delta, 0.5)  # k = 3 of four tied |1.0| entries: the first three by position
    assert kept.tolist() == [1.0, -1.0, 1.0, 0.0, 0.0, 0.0]


def test_average_is_the_weighted_mean_without_a_base():
    _, thetas = tensors(3)
    out = merge_tensors(None, thetas, Average(), weights=[1.0, 2.0, 1.0])
    torch.testing.assert_close(out, (thetas[0] + 2 * thetas[1] + thetas[2]) / 4)


def test_dare_ties_elects_after_dropping():
    base, thetas = tensors(3)
    out = merge_tensors(base, thetas, DARETIES(p=0.5), seeds=[7, 8, 9])
    gens = [chunk_generator(s, 0) for s in (7, 8, 9)]  # one chunk: the whole (small) tensor
    dropped = [
        base + (torch.rand(base.shape, generator=g) < 0.5) * (t - base) / 0.5
        for t, g in zip(thetas, gens, strict=True)
    ]
    torch.testing.assert_close(out, ties_stacked(base, dropped, 1.0, [1.0] * 3, False), rtol=0, atol=1e-6)


def test_chunked_evaluation_equals_one_chunk(monkeypatch):
    """Tensors larger than a chunk: thresholds, tie budgets and L1 factors are whole-tensor quantities."""
    import weightsmith.merge._chunked as chunked

    base, thetas = tensors(3, (64, 50), seed=5)
    thetas[1][3:9] = base[3:9] + 0.1  # many exact ties in |tau|
    spec = GTA("magnitude", 0.3, rescale="l1", elect="weighted_sum", normalize="weights")
    args = (base, thetas, spec, [1.0, 0.5, 2.0], [0.3, 0.6, 0.2])
    whole = merge_streamed(*args)
    monkeypatch.setattr(chunked, "CHUNK", 200)  # 4 rows of 50 per chunk
    torch.testing.assert_close(merge_streamed(*args), whole, rtol=0, atol=1e-6)
    assert CHUNK > 200


def test_model_wide_trim_needs_the_whole_model():
    base, thetas = tensors(2)
    with pytest.raises(WeightsmithError, match="whole model"):
        merge_tensors(base, thetas, TIES(density=0.2, trim="model"))
    parts = {"a": base[:10], "b": base[10:]}
    models = [{"a": t[:10], "b": t[10:]} for t in thetas]
    split = merge_state_dicts(parts, models, TIES(density=0.2))
    whole = merge_state_dicts({"w": base}, [{"w": t} for t in thetas], TIES(density=0.2))["w"]
    torch.testing.assert_close(torch.cat([split["a"], split["b"]]), whole, rtol=0, atol=1e-6)
