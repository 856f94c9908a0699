"""The Report builder: an ordered list of HTML blocks written atomically as one standalone file."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..staging import write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1100px;color:#1b1f24;padding:0 1rem;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.3rem;margin-top:2.2rem;border-bottom:1px solid #d0d7de}
.sub{color:#57606a;margin-top:0}figure{margin:1rem 0}figure img,figure svg{max-width:100%;height:auto}
figcaption{color:#57606a;font-size:.9rem}table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:right}th{background:#f6f8fa}
td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;color:#57606a}
nav ul{columns:2;font-size:.9rem}.tablewrap{overflow-x:auto}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
"""

# Click a header of a sortable table to sort by that column (again: reverse). Each cell's data-v holds its
# raw value: numbers compare as numbers, text in natural order (layers.2 before layers.10), blanks last.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  var coll = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  var heads = t.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i].getAttribute("data-v"), y = b.cells[i].getAttribute("data-v");
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = Number(x), ny = Number(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : coll.compare(x, y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def new_figure(width: float = 8.0, height: float = 4.0) -> Any:
    """A matplotlib Figure not tied to pyplot (no global state, no display backend needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _format(value: Any, float_format: str) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        if math.isnan(value):
            return "&ndash;"
        return html.escape(float_format.format(value))
    return html.escape(str(value))


def _sort_key(value: Any) -> str:
    """A cell's raw value for sorting: '' for None and NaN, the full number, or the text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(repr(value) if isinstance(value, float) else str(value), quote=True)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


class Report:
    """An HTML report built block by block: ``section``, ``text``, ``figure``, ``table``, ``raw``."""

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[str] = []
        self._toc: list[tuple[str, str]] = []
        self._ids: set[str] = set()
        self._sortable = False

    def section(self, title: str, text: str | None = None, html_body: str | None = None) -> Report:
        """Start a section with a heading; ``text`` is escaped (blank lines split paragraphs)."""
        anchor = _slug(title, self._ids)
        self._toc.append((anchor, title))
        self._blocks.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        if text:
            self.text(text)
        if html_body:
            self.raw(html_body)
        return self

    def text(self, text: str) -> Report:
        for para in re.split(r"\n\s*\n", text.strip()):
            self._blocks.append(f"<p>{html.escape(para)}</p>")
        return self

    def raw(self, html_body: str) -> Report:
        """Append trusted HTML as is."""
        self._blocks.append(html_body)
        return self

    def figure(self, fig: Any, caption: str = "", fmt: str = "png", dpi: int = 110) -> Report:
        """Embed a matplotlib figure as a base64 PNG (default) or inline SVG."""
        buf = io.BytesIO()
        if fmt == "png":
            fig.savefig(buf, format="png", dpi=dpi)
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            alt = html.escape(caption or "figure", quote=True)
            body = f'<img alt="{alt}" src="data:image/png;base64,{data}">'
        elif fmt == "svg":
            fig.savefig(buf, format="svg")
            svg = buf.getvalue().decode("utf-8")
            body = svg[svg.find("<svg") :]
        else:
            raise ValueError(f"figure format must be 'png' or 'svg', got {fmt!r}")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._blocks.append(f"<figure>{body}{cap}</figure>")
        return self

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str = "",
        float_format: str = "{:.4g}",
        sortable: bool = False,
    ) -> Report:
        """A table; floats use ``float_format``, None and NaN print as a dash. With ``sortable`` a click on
        a header sorts the rows by that column (numbers by value, text in natural order; inline script)."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        if sortable:
            cell = '<td data-v="{k}">{v}</td>'
            body = "".join(
                "<tr>"
                + "".join(cell.format(k=_sort_key(v), v=_format(v, float_format)) for v in row)
                + "</tr>"
                for row in rows
            )
        else:
            body = "".join(
                "<tr>" + "".join(f"<td>{_format(v, float_format)}</td>" for v in row) + "</tr>"
                for row in rows
            )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        cls = ' class="sortable"' if sortable else ""
        self._blocks.append(
            f'<div class="tablewrap"><table{cls}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )
        self._sortable = self._sortable or sortable
        return self

    def to_html(self) -> str:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        sub = html.escape(self.subtitle) + " &middot; " if self.subtitle else ""
        toc = ""
        if len(self._toc) > 1:
            items = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self._toc)
            toc = f"<nav><ul>{items}</ul></nav>"
        script = f"<script>{_SORT_JS}</script>" if self._sortable else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f'<h1>{html.escape(self.title)}</h1><p class="sub">{sub}weightsmith report, {stamp}</p>'
            f"{toc}{''.join(self._blocks)}{script}</body></html>\n"
        )

    def write(self, path: str | os.PathLike[str], force: bool = True) -> Path:
        """Write the report through ``weightsmith.staging``: swapped in whole when complete; an existing
        file is replaced (``force=False`` refuses instead); a special file such as a FIFO is streamed to."""
        return write_text(path, self.to_html(), force=force)
