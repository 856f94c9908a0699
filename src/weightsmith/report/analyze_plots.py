"""Plots for the analyze job: per-layer metrics, ESDs with their power-law fits, intruder counts."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .html import new_figure

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted weight name (``model.layers.3.mlp...`` -> 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def matrix_kind(name: str) -> str:
    """The name with its layer index removed, e.g. ``self_attn.q_proj`` for every layer's q_proj."""
    m = _LAYER.search(name)
    tail = name[m.end() :] if m else name
    return tail.removesuffix(".weight") or name


def _by_kind(records: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        layer, value = layer_index(r["name"]), r.get(key)
        if layer is None or value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        xs, ys = series[matrix_kind(r["name"])]
        xs.append(layer)
        ys.append(float(value))
    return dict(series)


def has_layer_series(records: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any record has a layer index and a finite ``key`` (else a plot of it would be empty)."""
    return bool(_by_kind(records, key))


def _readable(ax: Any, log_x: bool = False, log_y: bool = False) -> None:
    """Few, plain tick labels: integers on a layer axis; on log axes 1-2-5 steps written as numbers
    (0.01, 20, 5e+04), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    ax.autoscale_view()
    for axis, log in ((ax.xaxis, log_x), (ax.yaxis, log_y)):
        if log:
            lo, hi = axis.get_view_interval()
            decades = math.log10(hi / lo) if lo > 0 and hi > lo else 10.0
            axis.set_major_locator(LogLocator(subs=(1.0,) if decades > 3 else (1.0, 2.0, 5.0), numticks=8))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        elif axis is ax.xaxis:
            axis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        else:
            axis.set_major_locator(MaxNLocator(nbins=6))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25, which="major")


def plot_layer_metric(
    records: Sequence[dict[str, Any]],
    key: str,
    ylabel: str,
    title: str = "",
    log: bool = False,
    bands: Sequence[float] = (),
) -> Any:
    """One line per matrix kind of ``key`` against the layer index (matrices without one are left out).

    Call ``has_layer_series`` first: with no series the figure says so in words only.
    """
    fig = new_figure(9, 4)
    ax = fig.add_subplot()
    series = _by_kind(records, key)
    for kind, (xs, ys) in sorted(series.items()):
        order = np.argsort(xs)
        ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", ms=3, lw=1, label=kind)
    for b in bands:
        ax.axhline(b, color="grey", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    _readable(ax, log_y=log)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    if series:
        ax.legend(fontsize=7, ncol=2 if len(series) > 4 else 1)
    else:
        ax.text(0.5, 0.5, "no per-layer matrices", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_esd(evals: np.ndarray, alpha: float | None, xmin: float | None, title: str) -> Any:
    """Histogram of the ESD on log-log axes (density) with the fitted power law over its tail.

    The fitted line spans the tail's eigenvalues only (``xmin`` to the largest), and both axes are set
    by the data, so the line never stretches the plot beyond the ESD.
    """
    fig = new_figure(4.2, 3.2)
    ax = fig.add_subplot()
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > 1e-5]
    if ev.size == 0:
        ax.text(0.5, 0.5, "no positive eigenvalues", ha="center", va="center", transform=ax.transAxes)
        return fig
    lo, hi = math.log10(ev.min()), math.log10(ev.max())
    bins = np.logspace(lo, hi if hi > lo else lo + 1, 60)
    dens, edges = np.histogram(ev, bins=bins, density=True)
    centers = np.sqrt(edges[:-1] * edges[1:])
    keep = dens > 0
    ax.loglog(centers[keep], dens[keep], ".", ms=4, label="ESD")
    if alpha is not None and xmin is not None and math.isfinite(alpha) and math.isfinite(xmin):
        x = np.logspace(math.log10(xmin), math.log10(max(ev.max(), xmin)), 50)
        share = (ev >= xmin).mean()  # the fitted density covers only the tail's share of the mass
        y = share * (alpha - 1) / xmin * (x / xmin) ** (-alpha)
        ax.loglog(x, y, "r-", lw=1.5, label=f"alpha={alpha:.2f}")
        ax.axvline(xmin, color="r", lw=0.6, ls=":")
    d = dens[keep]
    ax.set_ylim(d.min() / 2, d.max() * 2)
    ax.set_xlim(edges[0] / 1.2, edges[-1] * 1.2)
    _readable(ax, log_x=True, log_y=True)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return fig


def plot_intruders(records: Sequence[dict[str, Any]], k: int, epsilon: float) -> Any:
    """Stacked bars of intruder counts per layer, one colour per matrix kind."""
    fig = new_figure(9, 3.8)
    ax = fig.add_subplot()
    series = _by_kind(records, "num_intruders")
    layers = sorted({x for xs, _ in series.values() for x in xs})
    bottom = np.zeros(len(layers))
    pos = {layer: i for i, layer in enumerate(layers)}
    for kind, (xs, ys) in sorted(series.items()):
        h = np.zeros(len(layers))
        for x, y in zip(xs, ys, strict=True):
            h[pos[x]] = y
        ax.bar(layers, h, bottom=bottom, label=kind)
        bottom += h
    ax.set_xlabel("layer")
    ax.set_ylabel(f"intruders among top-{k}")
    ax.set_title(f"intruder dimensions per layer (epsilon={epsilon})")
    if series:
        ax.legend(fontsize=7, ncol=2 if len(series) > 4 else 1)
    return fig
