"""The HTML report: self-contained, escaped, and its plots render in a real headless browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from weightsmith.analyze import add_analysis, add_comparison, analyze_weights, compare_weights
from weightsmith.report import Report, new_figure
from weightsmith.store import DictStore

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _models() -> tuple[DictStore, DictStore]:
    g = torch.Generator().manual_seed(0)
    base = {
        f"layers.{i}.{kind}.weight": torch.randn(64, 48, generator=g)
        for i in range(3)
        for kind in ("q", "mlp")
    }
    tuned = {
        n: W + 3 * torch.randn(64, 1, generator=g) @ torch.randn(1, 48, generator=g) for n, W in base.items()
    }
    return DictStore(base, "base"), DictStore(tuned, "tuned")


def _report(tmp_path: Path) -> Path:
    base, tuned = _models()
    rep = Report("analyze <test> & report", subtitle="toy")
    add_analysis(rep, analyze_weights(base, device="cpu"), esd_examples=2)
    add_comparison(rep, compare_weights(base, tuned, device="cpu"))
    fig = new_figure(3, 2)
    fig.add_subplot().plot([1, 2, 3], [1, 4, 9])
    rep.figure(fig, "an inline SVG", fmt="svg")
    return rep.write(tmp_path / "report.html")


def test_report_is_one_self_contained_file(tmp_path: Path) -> None:
    html = _report(tmp_path).read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "analyze &lt;test&gt; &amp; report" in html  # titles are escaped
    assert html.count('src="data:image/png;base64,') >= 7  # alpha, FARMS, stable rank, MP, 2 ESDs, intruders
    assert "<svg" in html
    for external in ('src="http', "<link", "<script", "url(http"):  # nothing is fetched from the network
        assert external not in html
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temporary left behind


def test_deprecated_result_methods_still_add_the_same_sections() -> None:
    base, tuned = _models()
    analysis, comparison = analyze_weights(base, device="cpu"), compare_weights(base, tuned, device="cpu")
    old, new = Report("r"), Report("r")
    with pytest.warns(DeprecationWarning, match="add_analysis"):
        analysis.add_to_report(old, esd_examples=2)
    with pytest.warns(DeprecationWarning, match="add_comparison"):
        comparison.add_to_report(old)
    add_analysis(new, analysis, esd_examples=2)
    add_comparison(new, comparison)
    assert old.to_html().count("<h2") == new.to_html().count("<h2") >= 2
    assert old.to_html().count("<table") == new.to_html().count("<table")


def test_table_formats_missing_values() -> None:
    html = Report("t").table(["a", "b"], [["x", float("nan")], ["y", None], ["z", 1.23456]]).to_html()
    assert html.count("&ndash;") == 2 and "1.235" in html


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_plots_render_in_headless_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    path = _report(tmp_path)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--no-first-run"]  # fmt: skip
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            svgs = page.eval_on_selector_all(
                "figure svg", "els => els.map(e => { const b = e.getBBox(); return [b.width, b.height]; })"
            )
        finally:
            browser.close()
    assert len(images) >= 7
    assert all(done and w > 0 and h > 0 for done, w, h in images)
    assert svgs and all(w > 0 and h > 0 for w, h in svgs)
