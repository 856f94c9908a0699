"""PST: the low-rank + structured fit of the movement score checked by hand and against an SVD, the score
gathered from gradients by hand, the mask through compress, and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_fixtures import calib, tiny_llama
from torch import nn

from weightsmith.compress import compress
from weightsmith.compress.pst import PST, movement_scores, pst_factors, pst_importance
from weightsmith.errors import WeightsmithError
from weightsmith.layers import find_layers

torch.set_num_threads(1)


def test_factors_by_hand_and_exact_on_their_own_model():
    Z = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 8.0]])
    A, B, R, C = pst_factors(Z, rank=0)
    torch.testing.assert_close(C, torch.tensor([2.0, 3.0, 5.5]))  # column means
    torch.testing.assert_close(R, torch.tensor([2.0 - 3.5, 5.0 - 3.5]))  # row means less the grand mean
    assert A.shape == (2, 0) and B.shape == (0, 3)
    torch.manual_seed(0)
    u, v = torch.randn(6, 2), torch.randn(2, 5)
    Z = u @ v + torch.randn(6, 1) + torch.randn(1, 5)  # rank 2 plus a row and a column part
    A, B, R, C = pst_factors(Z, rank=2)
    torch.testing.assert_close(A @ B + R[:, None] + C[None, :], Z, atol=1e-5, rtol=1e-5)
    A1, B1, _, _ = pst_factors(Z, rank=1, structured=False)  # Eckart-Young: the top singular pair
    U, S, Vh = torch.linalg.svd(Z)
    torch.testing.assert_close(A1 @ B1, S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-5, rtol=1e-5)


def test_importance_adds_unit_scaled_parts():
    W = torch.tensor([[1.0, -3.0]])
    Z = torch.tensor([[4.0, 0.0]])  # rank 1 with no row/column part needed: fitted exactly
    S = pst_importance(W, Z, rank=1, alpha=2.0, structured=False)
    torch.testing.assert_close(S, torch.tensor([[0.5 + 2 * 2.0, 1.5 + 0.0]]), atol=1e-5, rtol=1e-5)


class Reg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.lin(input_ids) - labels).square().mean()}


def test_movement_score_by_hand():
    m = Reg()
    with torch.no_grad():
        m.lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
    batches = [{"input_ids": torch.tensor([[1.0, 1.0]]), "labels": torch.tensor([[0.0]])},
               {"input_ids": torch.tensor([[2.0, 0.0]]), "labels": torch.tensor([[1.0]])}]  # fmt: skip
    # g = 2 (w.x - y) x: [-2, -2] then [4, 0]; Z = -sum g * w = -([-2, 4] + [4, 0]) = [-2, -4]
    Z = movement_scores(m, find_layers(m), batches)["lin.weight"]
    torch.testing.assert_close(Z, torch.tensor([[-2.0, -4.0]]))


def test_pst_through_compress_on_a_tiny_llama():
    m = tiny_llama()
    q, report = compress(copy.deepcopy(m), PST(sparsity=0.5, rank=4), calib=calib(n=4, length=32))
    assert len(report.layers) == 14 and all(r.rel_error > 0 for r in report.layers)
    W = q.model.layers[0].mlp.down_proj.weight
    assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    q, _ = compress(copy.deepcopy(m), PST(n=2, m=4, prune_scope="row"), calib=calib(n=4, length=32))
    W = q.model.layers[1].self_attn.q_proj.weight
    assert (W != 0).view(W.shape[0], -1, 4).sum(-1).eq(2).all()
    # alpha = 0 leaves the data-free part: magnitude within the layer
    q, _ = compress(copy.deepcopy(m), PST(sparsity=0.5, alpha=0.0), calib=calib(n=2, length=16))
    W0, W = m.model.layers[0].mlp.up_proj.weight.detach(), q.model.layers[0].mlp.up_proj.weight.detach()
    kept = W0.abs()[W != 0]
    assert float(kept.min()) >= float(W0.abs()[W == 0].max())


def test_bad_pst_options():
    for bad, opt in ((dict(sparsity=-0.1), "sparsity"), (dict(n=5, m=4), "n=5, m=4"), (dict(rank=-1), "rank"),
                     (dict(alpha=-1.0), "alpha"), (dict(prune_scope="col"), "prune_scope")):  # fmt: skip
        with pytest.raises(WeightsmithError, match=opt):
            PST(**bad)  # type: ignore[arg-type]
    with pytest.raises(WeightsmithError, match="calibration"):
        compress(tiny_llama(), PST())
    with pytest.raises(WeightsmithError, match="M=4 does not divide the input size 2"):
        compress(Reg(), PST(n=2, m=4), calib=[{"input_ids": torch.ones(1, 2), "labels": torch.ones(1, 1)}])
