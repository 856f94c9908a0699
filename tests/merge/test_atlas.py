"""aTLAS (Zhang et al., NeurIPS 2024): composition by hand, gradients against finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.merge.atlas import (
    atlas_loss,
    compose,
    entropy,
    learn_coefficients,
    task_arithmetic_state,
    task_vector,
)


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [
        {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()}
        for _ in range(2)
    ]
    return model, base, [task_vector(ft, base) for ft in fts]


def test_compose_is_the_anisotropic_sum_by_hand():
    model, base, tvs = _setup()
    names = list(tvs[0])
    coef = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 3.0, 0.0]])
    out = compose(base, tvs, coef, names)
    torch.testing.assert_close(out["0.bias"], base["0.bias"] + 2.0 * tvs[0]["0.bias"])
    torch.testing.assert_close(out["2.weight"], base["2.weight"] + 3.0 * tvs[1]["2.weight"])
    torch.testing.assert_close(
        out["0.weight"], base["0.weight"] + tvs[0]["0.weight"] + 0.5 * tvs[1]["0.weight"]
    )
    assert set(task_arithmetic_state(base, tvs, 0.0)) == set(base)
    torch.testing.assert_close(task_arithmetic_state(base, tvs, 0.0)["2.bias"], base["2.bias"])


@pytest.mark.parametrize("labelled", [True, False])
def test_coefficient_gradient_matches_finite_differences(labelled):
    model, base, tvs = _setup(torch.float64)
    names = list(tvs[0])
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 3 if labelled else None
    coef = (0.1 * torch.randn(2, len(names), dtype=torch.float64)).requires_grad_()
    loss = atlas_loss(model, base, tvs, coef, names, x, y)
    (grad,) = torch.autograd.grad(loss, coef)
    eps = 1e-6
    for i in range(2):
        for b in range(len(names)):
            e = torch.zeros_like(coef)
            e[i, b] = eps
            with torch.no_grad():
                fd = (
                    atlas_loss(model, base, tvs, coef + e, names, x, y)
                    - atlas_loss(model, base, tvs, coef - e, names, x, y)
                ) / (2 * eps)
            assert abs(float(fd) - float(grad[i, b])) < 1e-7 * max(1.0, abs(float(fd)))


def test_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert abs(float(entropy(logits)) - (0.5 * 0.6931472 + 0.5 * 1.3862944)) < 1e-6


def test_learning_fits_labels_of_the_finetuned_model():
    # One task vector, labels from the fine-tuned model (coefficients all 1 reach 100% accuracy). Training
    # from 0 must end with a lower loss than both the base (all 0) and the fine-tuned point (all 1),
    # with base and task vector untouched.
    model, base, tvs = _setup()
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    model.load_state_dict({k: base[k] + tvs[0][k] for k in base})
    with torch.no_grad():
        y = model(x).argmax(-1)
    frozen = {k: v.clone() for k, v in base.items()}
    names = list(tvs[0])
    with torch.no_grad():
        at_one = float(atlas_loss(model, base, tvs[:1], torch.ones(1, len(names)), names, x, y))
    r = learn_coefficients(model, base, tvs[:1], x, y, steps=300, lr=0.05)
    assert r.losses[-1] < min(r.losses[0], at_one)
    assert all(torch.equal(base[k], frozen[k]) for k in base)


def test_no_task_vectors_raises():
    model, base, _ = _setup()
    with pytest.raises(WeightsmithError, match="at least one"):
        learn_coefficients(model, base, [], torch.zeros(1, 4))
