"""Self-contained HTML reports: sections of text, tables and matplotlib figures in one file.

    from weightsmith.report import Report
    rep = Report("minilm spectra")
    rep.section("Per-layer alpha", "Heavy-tailed layers have alpha between 2 and 6.")
    rep.figure(fig, "alpha per layer")
    rep.table(["name", "alpha"], [["q", 3.1], ["k", 2.7]])
    rep.write("report.html")

Figures are embedded as base64 PNG (or inline SVG), so the file opens anywhere with no network.
"""

from .html import Report, new_figure

__all__ = ["Report", "new_figure"]
