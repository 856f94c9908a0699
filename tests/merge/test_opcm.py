"""OPCM (Tang et al. 2025): the economy-SVD projection equals the paper code's full-SVD form; the fold keeps
its invariants and constant-size state."""

from __future__ import annotations

import math

import pytest
import torch
from merge_fixtures import make_family

from weightsmith.merge.opcm import (
    OPCM,
    merge_continual,
    opcm,
    opcm_init,
    opcm_update,
    project_out,
    split_rank,
)
from weightsmith.store import open_store


def project_out_full(delta, tau, alpha):
    """The full-SVD form: P = U^T tau V with full bases; zero its diagonal and [:r, :r]; U P V^T."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    r = split_rank(S, alpha)
    P = U.mT @ tau @ Vh.mT
    i = torch.arange(min(P.shape))
    P[i, i] = 0
    P[:r, :r] = 0
    return U @ P @ Vh


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 64)])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_economy_projection_equals_full_svd(shape, alpha):
    g = torch.Generator().manual_seed(0)
    delta, tau = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    fast = project_out(delta, tau, alpha)
    torch.testing.assert_close(fast, project_out_full(delta, tau, alpha), rtol=1e-5, atol=1e-5)
    exact = project_out_full(delta.double(), tau.double(), alpha)
    torch.testing.assert_close(
        project_out(delta.double(), tau.double(), alpha), exact, rtol=1e-10, atol=1e-10
    )


def test_projection_removes_the_dominant_block_and_diagonal():
    g = torch.Generator().manual_seed(1)
    delta, tau = torch.randn(30, 20, generator=g).double(), torch.randn(30, 20, generator=g).double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = split_rank(S, 0.5)
    P = U.mT @ project_out(delta, tau, 0.5) @ Vh.mT
    assert float(P.diagonal().abs().max()) < 1e-12
    assert float(P[:r, :r].abs().max()) < 1e-12
    kept = torch.ones_like(P, dtype=torch.bool)
    kept[:r, :r] = False
    kept.diagonal().fill_(False)
    torch.testing.assert_close(P[kept], (U.mT @ tau @ Vh.mT)[kept], rtol=0, atol=1e-12)


def models(T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "w1": torch.randn(12, 20, generator=g),
        "w2": torch.randn(20, 8, generator=g),
        "bias": torch.randn(20, generator=g),
        "embed.weight": torch.randn(30, 12, generator=g),
    }
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, fts


def test_fold_invariants_and_constant_state():
    base, fts = models()
    cfg = OPCM(alpha=0.5)
    taus = [{k: ft[k] - base[k] for k in base} for ft in fts]
    state = opcm_init(taus[0])
    bytes0 = sum(t.numel() * t.element_size() for t in state.merged.values())
    projected_sum = {k: v.clone() for k, v in taus[0].items()}
    norms = [math.sqrt(sum(float(v.square().sum()) for v in taus[0].values()))]
    for tau in taus[1:]:
        for k in base:  # tau~ from the state before the update
            projected_sum[k] += (
                project_out(state.merged[k], tau[k], 0.5) if cfg.projected(k, tau[k].ndim) else tau[k]
            )
        old = {k: v.clone() for k, v in state.merged.items()}
        new = opcm_update(state, tau, cfg)
        assert all(torch.equal(old[k], state.merged[k]) for k in old)  # the old state is not mutated
        state = new
        norms.append(math.sqrt(sum(float(v.square().sum()) for v in tau.values())))
        # ||theta^(t) - theta_0|| = mean of the task-vector norms; lambda_t Delta_t = sum of projected tau
        merged_norm = math.sqrt(sum(float(v.square().sum()) for v in state.merged.values()))
        assert merged_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        for k in base:
            torch.testing.assert_close(state.lam * state.merged[k], projected_sum[k], rtol=1e-4, atol=1e-5)
    # the state holds one merged tensor per weight plus scalars, whatever the number of models
    assert set(vars(state)) == {"merged", "lam", "mean_norm", "t"} and state.t == len(fts)
    assert sum(t.numel() * t.element_size() for t in state.merged.values()) == bytes0
    assert not cfg.projected("embed.weight", 2) and not cfg.projected("bias", 1) and cfg.projected("w1", 2)


def test_one_model_returns_it():
    base, fts = models(T=1)
    state = opcm(base, fts[:1])
    for k in base:
        torch.testing.assert_close(base[k] + state.merged[k], fts[0][k])


def test_merge_continual_on_disk(tmp_path):
    base_dir, ft_dirs = make_family(tmp_path, n=3)
    steps = []
    out = merge_continual(
        base_dir, ft_dirs, tmp_path / "out", OPCM(alpha=0.5), on_step=lambda s: steps.append(s.lam)
    )
    b = open_store(base_dir)
    state = opcm(b, [open_store(d) for d in ft_dirs], OPCM(alpha=0.5))
    got = open_store(out)
    for k in b:
        torch.testing.assert_close(got[k], b[k] + state.merged[k], rtol=1e-6, atol=1e-6)
    assert (
        steps[0] == 1.0 and 1.0 < steps[-1] < 3.0
    )  # lambda_t grows like sqrt(t) for near-orthogonal updates
