"""Rich vs lazy weight changes: hand-made cases with known answers, and the scale knob on a zoo run."""

from __future__ import annotations

import pytest
import torch

from weightsmith import zoo
from weightsmith.analyze.richlazy import (
    low_rank_init_,
    model_weight_changes,
    regime,
    run_regime,
    scale_init_,
    weight_change,
)
from weightsmith.errors import WeightsmithError


def test_rank_one_change_along_the_top_direction() -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    S = torch.linspace(10, 1, 30, dtype=torch.float64)
    W0 = U[:, :30] * S @ V.T
    D = 8.0 * torch.outer(U[:, 0], V[:, 0])  # grows the top singular direction by 8
    c = weight_change(W0, W0 + D, k=1)
    assert c.relative_change == pytest.approx(8.0 / float(S.norm()), rel=1e-12)
    assert c.delta_effective_rank == pytest.approx(1.0, abs=1e-4)  # Gram-matrix round-off
    assert c.init_alignment == pytest.approx(1.0, abs=1e-12) and c.final_alignment == pytest.approx(1.0)
    # a change along the 30th (smallest) direction is orthogonal to W0's top-1 subspace
    c = weight_change(W0, W0 + 8.0 * torch.outer(U[:, 29], V[:, 29]), k=1)
    assert c.init_alignment == pytest.approx(0.0, abs=1e-12)


def test_regime_rule() -> None:
    assert [regime(0.05, 0.9), regime(0.6, 0.3), regime(0.6, 0.8), regime(0.3, 0.1)] == [
        "lazy", "rich", "intermediate", "intermediate"]  # fmt: skip
    with pytest.raises(WeightsmithError):
        weight_change(torch.zeros(3, 4), torch.zeros(4, 3))


def test_large_init_is_lazier_than_small_init_on_digits() -> None:
    task = zoo.load_task("digits")
    names = ["net.0", "net.2"]
    out = {}
    for scale in (0.1, 10.0):
        torch.manual_seed(0)
        model = scale_init_(zoo.make_model("mlp", task, width=64, depth=1), {n: scale for n in names})
        init = {k: v.clone() for k, v in model.state_dict().items()}
        zoo.train(model, task, epochs=3, seed=0)
        out[scale] = run_regime(model_weight_changes(init, model.state_dict()))
    assert out[10.0]["regime"] == "lazy" and out[10.0]["relative_change"] < 0.1
    assert out[0.1]["relative_change"] > 10 * out[10.0]["relative_change"]


def test_low_rank_init_keeps_the_norm() -> None:
    torch.manual_seed(0)
    model = zoo.make_model("mlp", zoo.load_task("digits"), width=32, depth=1)
    before = float(model.net[0].weight.norm())  # type: ignore[union-attr,index]
    low_rank_init_(model, 2, ["net.0"], torch.Generator().manual_seed(1))
    W = model.net[0].weight  # type: ignore[union-attr,index]
    assert float(W.norm()) == pytest.approx(before, rel=1e-5)
    assert int(torch.linalg.matrix_rank(W)) == 2
    with pytest.raises(WeightsmithError, match="net.1"):
        scale_init_(model, {"net.1": 2.0})
