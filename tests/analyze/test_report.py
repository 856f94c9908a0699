"""The HTML report: self-contained, escaped, and its plots render in a real headless browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weightsmith.analyze import add_analysis, add_comparison, analyze_weights, compare_weights
from weightsmith.analyze.report_sections import ESD_RULES, MATRIX_COLUMNS, choose_esds
from weightsmith.errors import WeightsmithError
from weightsmith.report import Report, new_figure
from weightsmith.report.analyze_plots import plot_esd
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
    for external in ('src="http', "<link", "<script src", "url(http"):  # nothing is fetched from the network
        assert external not in html
    assert html.count("<script>") == 1  # the inline table sorter, once
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


def _many_layers() -> DictStore:
    g = torch.Generator().manual_seed(1)
    return DictStore({f"layers.{i}.q.weight": torch.randn(40, 24, generator=g) for i in range(12)}, "m")


def test_esds_are_chosen_by_the_stated_rule_and_a_bad_rule_names_the_option() -> None:
    res = analyze_weights(_many_layers(), device="cpu")
    worst = choose_esds(res, 3, "worst_fit")
    ks = sorted((m["ks_distance"] for m in res.matrices), reverse=True)
    assert [m["ks_distance"] for m in worst] == ks[:3]
    spikes = choose_esds(res, 2, "most_spikes")
    assert [m["num_spikes"] for m in spikes] == sorted((m["num_spikes"] for m in res.matrices), reverse=True)[
        :2
    ]
    assert [m["name"] for m in choose_esds(res, 3, "spread")] == ["layers.0.q.weight", "layers.6.q.weight",
                                                                 "layers.11.q.weight"]  # fmt: skip
    rep = Report("r")
    add_analysis(rep, res, esd_examples=2, esd_rule="extreme_alpha")
    assert ESD_RULES["extreme_alpha"] in rep.to_html()
    with pytest.raises(WeightsmithError, match="esd_rule"):
        add_analysis(Report("r"), res, esd_rule="prettiest")


def test_metric_names_are_the_json_keys_and_empty_plots_become_a_sentence() -> None:
    store = DictStore({"proj.weight": torch.randn(40, 24), "head.weight": torch.randn(30, 20)}, "flat")
    res = analyze_weights(store, device="cpu", keep_esd=False)
    rep = Report("r")
    add_analysis(rep, res)
    html = rep.to_html()
    assert html.count("data:image/png") == 0  # no layer indices, no kept ESDs: no empty figure at all
    assert "No per-layer plot of alpha" in html and "No example ESDs" in html
    for key in res.summary():
        assert f"<td>{key}</td>" in html
    assert set(MATRIX_COLUMNS) <= set(res.matrices[0])
    for key in MATRIX_COLUMNS:
        assert f"<th>{key}</th>" in html


def test_esd_fit_line_stays_within_the_data() -> None:
    ev = np.sort(np.random.default_rng(0).pareto(2.0, 400) + 1.0)[::-1]
    fig = plot_esd(ev, 3.0, float(ev[100]), "t")
    ax = fig.axes[0]
    fit = [ln for ln in ax.get_lines() if ln.get_label().startswith("alpha")][0]
    x, y = fit.get_xdata(), fit.get_ydata()
    assert x.min() >= ev[100] * (1 - 1e-12) and x.max() <= ev.max()
    lo, hi = ax.get_ylim()
    dots = ax.get_lines()[0].get_ydata()
    assert lo == pytest.approx(dots.min() / 2) and hi == pytest.approx(dots.max() * 2)
    assert fit.get_xdata().size and np.all(np.isfinite(y))


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


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_per_matrix_table_sorts_naturally_in_headless_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    rep = Report("sort")
    res = analyze_weights(_many_layers(), device="cpu")
    add_analysis(rep, res, esd_examples=0)
    path = rep.write(tmp_path / "sort.html")
    col = "table.sortable tbody tr td:nth-child({})"
    alpha_at = MATRIX_COLUMNS.index("alpha") + 1
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.click("table.sortable th >> text=alpha_weighted")  # scramble the order first
            page.click("table.sortable th >> nth=0")
            names = page.eval_on_selector_all(col.format(1), "els => els.map(e => e.textContent)")
            page.click(f"table.sortable th >> nth={alpha_at - 1}")
            page.click(f"table.sortable th >> nth={alpha_at - 1}")  # twice: descending
            alphas = page.eval_on_selector_all(col.format(alpha_at), "els => els.map(e => e.dataset.v)")
        finally:
            browser.close()
    assert names == [f"layers.{i}.q.weight" for i in range(12)]  # natural: 2 before 10
    assert [float(a) for a in alphas] == sorted((m["alpha"] for m in res.matrices), reverse=True)
