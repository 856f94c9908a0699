"""Intruder dimensions (Shuttleworth et al., 2024) on a case worked by hand and on a real matrix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from weightsmith.analyze import compare_matrices, intruder_dimensions, subspace_overlap
from weightsmith.store import open_store


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """W0 = diag(6..1): its singular vectors are the standard basis e_1..e_6.

    W1 = U1 diag(20, 6, 5, 4, 3, 2) U1^T where U1 is the QR basis of [y, e_1, ..., e_5] with
    y = (1, ..., 1) / sqrt(6). W1's top singular vector is y: max_i |cos(y, e_i)| = 1/sqrt(6) = 0.408,
    below 0.5, so it is an intruder. Its second vector is e_1 made orthogonal to y:
    |cos| with e_1 = sqrt(1 - 1/6) = 0.913, not an intruder; the later ones are not either.
    """
    W0 = torch.diag(torch.arange(6.0, 0.0, -1.0, dtype=torch.float64))
    y = torch.ones(6, 1, dtype=torch.float64) / math.sqrt(6)
    U1, _ = torch.linalg.qr(torch.cat([y, torch.eye(6, dtype=torch.float64)[:, :5]], dim=1))
    W1 = U1 @ torch.diag(torch.tensor([20.0, 6, 5, 4, 3, 2], dtype=torch.float64)) @ U1.T
    return W0, W1


def test_intruders_worked_by_hand() -> None:
    W0, W1 = _hand_case()
    count, energy, max_cos = intruder_dimensions(W0, W1, k=6, epsilon=0.5)
    assert int(count) == 1
    assert float(energy) == pytest.approx(400 / (400 + 36 + 25 + 16 + 9 + 4))  # 20^2 / ||W1||_F^2
    assert float(max_cos[0]) == pytest.approx(1 / math.sqrt(6))
    assert float(max_cos[1]) == pytest.approx(math.sqrt(5 / 6))
    assert bool((max_cos[1:] >= 0.5).all())
    # epsilon is strict and an option: at 0.4 the top vector (0.408) is no longer an intruder
    assert int(intruder_dimensions(W0, W1, k=6, epsilon=0.4)[0]) == 0
    # k is an option: only the top vector examined still finds it
    assert int(intruder_dimensions(W0, W1, k=1)[0]) == 1


def test_compare_matrices_batches_and_reports_drift() -> None:
    W0, W1 = _hand_case()
    res = compare_matrices(torch.stack([W0, W0]), torch.stack([W1, W0]), k=6)
    assert res.num_intruders.tolist() == [1, 0]
    assert float(res.relative_norm[1]) == 0.0 and float(res.delta_effective_rank[1]) == 0.0
    assert float(res.subspace_overlap[1]) == pytest.approx(1.0)
    assert float(res.relative_norm[0]) == pytest.approx(
        float(torch.linalg.norm(W1 - W0) / torch.linalg.norm(W0))
    )
    assert float(subspace_overlap(W0, W0, k=3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_matrices(W0, W0[:5])


def test_low_rank_updates_create_intruders_full_rank_ones_do_not(minilm_dir: Path) -> None:
    W = open_store(minilm_dir)["encoder.layer.0.intermediate.dense.weight"].float()  # 1536 x 384
    g = torch.Generator().manual_seed(0)
    size = 0.5 * torch.linalg.norm(W)
    low = torch.randn(1536, 4, generator=g) @ torch.randn(4, 384, generator=g)
    full = torch.randn(1536, 384, generator=g)
    res = compare_matrices(
        torch.stack([W, W]), torch.stack([W + low * size / low.norm(), W + full * size / full.norm()]), k=10
    )
    assert float(res.relative_norm[0]) == pytest.approx(0.5, rel=1e-4)
    assert float(res.relative_norm[1]) == pytest.approx(0.5, rel=1e-4)
    assert int(res.num_intruders[0]) >= 3  # the rank-4 update's directions enter the top-10 as intruders
    assert int(res.num_intruders[1]) == 0  # the same amount of full-rank noise adds none
    assert float(res.delta_effective_rank[0]) < 4.5 < float(res.delta_effective_rank[1])
