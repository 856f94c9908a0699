"""D-Pruner: the general (OBS) and domain (Taylor/Fisher) importance worked by hand, the dual score keeping
the domain's weights on a toy regression, the CLI path with a domain text file, and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from weightsmith.compress import compress
from weightsmith.compress.dpruner import (
    DPruner,
    domain_importance,
    dpruner_compress,
    dual_importance,
    obs_importance,
)
from weightsmith.compress.magnitude import Magnitude
from weightsmith.compress.wanda import Wanda
from weightsmith.errors import WeightsmithError
from weightsmith.layers import find_layers

torch.set_num_threads(1)


class Reg(nn.Module):
    """A linear regression that returns its loss like a Hugging Face model."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.lin(input_ids) - labels).square().mean()}


def test_obs_importance_by_hand():
    # H = [[2, 1], [1, 2]], H^-1 = [[2, -1], [-1, 2]] / 3. Upper Cholesky U (U^T U = H^-1): U_00^2 = 2/3,
    # U_01 = (-1/3) / sqrt(2/3), U_11^2 = 2/3 - U_01^2 = 2/3 - 1/6 = 1/2.  G = w^2 / U_jj^2 = [1.5, 8].
    W = torch.tensor([[1.0, 2.0]])
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    G = obs_importance(W, H, damp=1e-9)
    torch.testing.assert_close(G, torch.tensor([[1.5, 8.0]]), atol=1e-4, rtol=1e-4)


def test_domain_importance_by_hand_and_dual_score():
    m = Reg(2, 1)
    with torch.no_grad():
        m.lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
    batches = [{"input_ids": torch.tensor([[1.0, 1.0]]), "labels": torch.tensor([[0.0]])},
               {"input_ids": torch.tensor([[2.0, 0.0]]), "labels": torch.tensor([[1.0]])}]  # fmt: skip
    # loss = (w.x - y)^2: g = 2 (w.x - y) x.  Batch 1: w.x = -1, g = [-2, -2]; batch 2: w.x = 2, g = [4, 0].
    # t = g * w: [-2, 4] and [4, 0]; |-t + t^2/2|: [4, 4] and [4, 0].
    layers = find_layers(m)
    D = domain_importance(m, layers, batches)["lin.weight"]
    torch.testing.assert_close(D, torch.tensor([[8.0, 4.0]]))
    assert m.lin.weight.grad is None and m.lin.weight.requires_grad  # restored
    G = torch.tensor([[1.0, 3.0]])
    torch.testing.assert_close(dual_importance(G, D, 0.5), torch.tensor([[8 / 6 + 0.25, 4 / 6 + 0.75]]))


def _toy(seed: int = 0):
    """Inputs of the general data use channels 0-15, the domain data channels 16-31."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(8, 32, generator=g)

    def data(lo: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(4):
            x = torch.zeros(64, 32)
            x[:, lo : lo + 16] = torch.randn(64, 16, generator=g)
            out.append({"input_ids": x, "labels": x @ target.T + 0.1 * torch.randn(64, 8, generator=g)})
        return out

    model = Reg(32, 8, seed)
    with torch.no_grad():
        model.lin.weight.copy_(target + 0.05 * torch.randn(8, 32, generator=g))
    return model, data(0), data(16)


def _loss(model: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b)["loss"]) for b in batches) / len(batches)


def test_dpruner_keeps_the_domain_weights_and_lam_trades_for_general():
    model, general, domain = _toy()
    runs = {}
    for key, cfg in {"lam0": DPruner(sparsity=0.5, lam=0.0), "lam1": DPruner(sparsity=0.5, lam=1.0),
                     "lam100": DPruner(sparsity=0.5, lam=100.0)}.items():  # fmt: skip
        m, report = dpruner_compress(copy.deepcopy(model), cfg, general, domain)
        assert report.layers[0].rel_error > 0
        runs[key] = m
    mag, _ = compress(copy.deepcopy(model), Magnitude(sparsity=0.5))
    wan, _ = compress(copy.deepcopy(model), Wanda(sparsity=0.5), calib=general)
    dom = {k: _loss(m, domain) for k, m in runs.items()}
    gen = {k: _loss(m, general) for k, m in runs.items()}
    assert dom["lam0"] < 0.5 * _loss(mag, domain) and dom["lam0"] < 0.5 * _loss(wan, domain)
    assert float((runs["lam0"].lin.weight[:, 16:] != 0).float().mean()) == 1.0  # every domain weight kept
    assert dom["lam0"] <= dom["lam1"] <= dom["lam100"] and gen["lam100"] <= gen["lam1"] <= gen["lam0"]
    m, _ = dpruner_compress(copy.deepcopy(model), DPruner(n=2, m=4, prune_scope="row"), general, domain)
    assert (m.lin.weight != 0).view(8, 8, 4).sum(-1).le(2).all()


def test_cli_dpruner_with_a_domain_text(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    import weightsmith.cli.compress  # noqa: F401  (registers the command)
    from weightsmith.cli._app import app

    text = tmp_path / "domain.txt"
    text.write_text("The committee shall report the bill with amendments to the Senate. " * 40)
    out = tmp_path / "dp"
    args = ["compress", str(tiny_dir), "--method", "dpruner", "--opt", f"domain={text}", "--opt",
            "domain_samples=2", "--opt", "domain_seq_len=32", "--samples", "2", "--seq-len", "32",
            "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    from weightsmith.compress import load_compressed

    W = load_compressed(out).model.layers[0].mlp.up_proj.weight
    assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    res = CliRunner().invoke(app, [*args[:4], *args[10:14], "--out", str(tmp_path / "none")])  # no domain
    assert res.exit_code != 0 and not (tmp_path / "none").exists()


def test_bad_dpruner_options():
    for bad, opt in ((dict(sparsity=1.0), "sparsity"), (dict(n=2, m=2), "n=2, m=2"), (dict(lam=-1.0), "lam"),
                     (dict(prune_scope="col"), "prune_scope"), (dict(domain_samples=0), "domain_samples"),
                     (dict(damp=0.0), "damp")):  # fmt: skip
        with pytest.raises(WeightsmithError, match=opt):
            DPruner(**bad)  # type: ignore[arg-type]
    model, general, _ = _toy()
    with pytest.raises(WeightsmithError, match="option domain"):
        compress(model, DPruner(), calib=general)
    with pytest.raises(WeightsmithError, match="domain"):
        dpruner_compress(model, DPruner(), general, [])
    with pytest.raises(WeightsmithError, match="M=4 does not divide the input size 6"):
        dpruner_compress(Reg(6, 2), DPruner(n=2, m=4), general, general)


def test_gradient_scores_on_a_frozen_model():
    """A loaded fine-tune has frozen weights: the gradient hooks still fire and the flags come back."""
    from compress_fixtures import tiny_llama

    from weightsmith.compress._core import target_layers
    from weightsmith.compress._sparse import layer_gradients

    model = tiny_llama()
    model.requires_grad_(False)
    layers = target_layers(model, Magnitude())
    seen: list[str] = []
    ids = torch.randint(0, 64, (2, 8))
    layer_gradients(model, layers, [{"input_ids": ids}], lambda ly, g: seen.append(ly.name))
    assert sorted(seen) == sorted(ly.name for ly in layers)
    assert not any(p.requires_grad for p in model.parameters())
