"""The main job end to end: `weightsmith demo --quick` analyzes, adapts and merges, and writes one report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from weightsmith.cli import _register
from weightsmith.cli._app import app


def test_demo_quick_end_to_end(tmp_path):
    _register()
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["analyze"]) == {"minilm", "smollm2"}
    assert summary["analyze"]["smollm2"]["num_matrices"] > 200
    rows = {(row["task"], row["method"]): row["accuracy"] for row in summary["adapt"]}
    for task in ("rotten_tomatoes", "debates"):
        assert 0.3 < rows[(task, "LoRA r8")] <= 1.0
    merged = {row["encoder"]: row for row in summary["merge"]}
    assert "TIES (density 0.2)" in merged and 0.3 < merged["TIES (density 0.2)"]["rotten_tomatoes"] <= 1.0
    html = (out / "report.html").read_text()
    for section in ("Spectra of minilm", "Spectra of smollm2", "Adapt: LoRA on MiniLM", "Merge: one encoder"):
        assert section in html
    assert html.count("data:image/png;base64,") + html.count("<svg") >= 4
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no partial directory left behind"
