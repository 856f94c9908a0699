"""The phase grid: phase labels by the stated rule, a tiny grid end to end, the report and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import weightsmith.cli.phases  # noqa: F401  (registers analyze-phases)
from weightsmith.analyze.phases import (
    PhaseGrid,
    PhaseThresholds,
    label_phases,
    penultimate_features,
    phase_grid,
)
from weightsmith.analyze.report_sections import add_phases
from weightsmith.cli._app import app
from weightsmith.errors import WeightsmithError
from weightsmith.report import Report

torch.set_num_threads(1)
TINY: dict[str, Any] = {"temperatures": (128, 16), "loads": (4, 32), "epochs": 6, "power_iters": 10,
                        "trace_samples": 2, "hessian_examples": 256, "path_points": 5}  # fmt: skip


def _cell(mc: float, trace: float, cka: float) -> dict[str, float]:
    return {"temperature": 1.0, "load": 1.0, "mc": mc, "hessian_trace": trace, "cka": cka}


def test_label_phases_follows_the_taxonomy_table() -> None:
    cells = [_cell(-1.0, 100.0, 0.5), _cell(-1.0, 1.0, 0.5), _cell(0.0, 100.0, 0.5),
             _cell(0.01, 1.0, 0.2), _cell(-0.01, 1.0, 0.9)]  # fmt: skip
    used = label_phases(cells)
    assert [c["phase"] for c in cells] == ["I", "II", "III", "IV-A", "IV-B"]
    assert used["sharp_trace"] == pytest.approx(10.0)  # geometric mean of 1 and 100
    assert used["similar_cka"] == pytest.approx(0.55)  # midpoint of 0.2 and 0.9
    label_phases(cells, PhaseThresholds(mc_tol=2.0, sharp_trace=1000.0, similar_cka=0.0))
    assert {c["phase"] for c in cells} == {"IV-B"}


def test_penultimate_features_are_the_last_linear_input() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(7, 3)
    torch.testing.assert_close(penultimate_features(net, x), net[1](net[0](x)))


def test_tiny_grid_end_to_end_and_report(tmp_path: Path) -> None:
    res = phase_grid(PhaseGrid(**TINY))
    assert len(res.cells) == 4
    for c in res.cells:
        assert c["phase"] in ("I", "II", "III", "IV-A", "IV-B")
        assert c["top_eigenvalue"] > 0 and c["hessian_trace"] is not None
        assert c["mc_naive"] <= c["mc"] + 0.05  # weight matching never makes the straight path much worse
    wide = [c for c in res.cells if c["load"] == 32]
    narrow = [c for c in res.cells if c["load"] == 4]
    assert min(c["test_acc"] for c in wide) > max(c["test_acc"] for c in narrow)
    rep = Report("phases")
    add_phases(rep, res)
    html = rep.write(tmp_path / "p.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "hessian_trace" in html
    json.dumps(res.to_json(), allow_nan=False)


def test_grid_config_round_trips_and_bad_options_name_the_option() -> None:
    from weightsmith.config import config_from_dict, to_dict

    grid = PhaseGrid(load="data", loads=(0.25, 1.0), temperature="lr", temperatures=(1e-3, 1e-2))
    assert config_from_dict(to_dict(grid), "analyze") == grid
    with pytest.raises(WeightsmithError, match="temperature"):
        PhaseGrid(temperature="heat")
    with pytest.raises(WeightsmithError, match="seeds"):
        PhaseGrid(seeds=1)
    with pytest.raises(WeightsmithError, match="fractions"):
        PhaseGrid(load="data", loads=(0.5, 2.0))
    with pytest.raises(WeightsmithError, match="whole numbers"):
        PhaseGrid(loads=(4.5,))


def test_cli_refuses_bad_values_before_training(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["analyze-phases", "--out", str(tmp_path / "r.html"), "--loads", "4,x"])
    assert (
        res.exit_code != 0 and isinstance(res.exception, WeightsmithError) and "--loads" in str(res.exception)
    )
    res = runner.invoke(app, ["analyze-phases", "--out", str(tmp_path / "r.html"), "--seeds", "1"])
    assert isinstance(res.exception, WeightsmithError) and "seeds" in str(res.exception)
    assert not (tmp_path / "r.html").exists()
