"""Plots for the phase grid (``analyze.phases``): the 2-D phase diagram and one heat map per metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .html import new_figure

PHASE_COLOURS = {"I": "#d73027", "II": "#fc8d59", "III": "#fee090", "IV-A": "#91bfdb", "IV-B": "#4575b4"}
# (key, title, log10 colour scale)
METRIC_PANELS = (
    ("train_loss", "train_loss (training cross-entropy)", True),
    ("test_acc", "test_acc", False),
    ("top_eigenvalue", "top_eigenvalue (Hessian)", True),
    ("hessian_trace", "hessian_trace (Hutchinson)", True),
    ("mc", "mc (mode connectivity)", False),
    ("cka", "cka (linear CKA, two seeds)", False),
)


def grid_axes(cells: Sequence[dict[str, Any]], hot_is_small: bool) -> tuple[list[float], list[float]]:
    """Load values (x, ascending) and temperature values (y, cold to hot: batch sizes descending when
    ``hot_is_small``, learning rates ascending otherwise)."""
    loads = sorted({c["load"] for c in cells})
    temps = sorted({c["temperature"] for c in cells}, reverse=hot_is_small)
    return loads, temps


def _grid(cells: Sequence[dict[str, Any]], loads: list[float], temps: list[float], key: str) -> np.ndarray:
    out = np.full((len(temps), len(loads)), np.nan)
    for c in cells:
        v = c.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[temps.index(c["temperature"]), loads.index(c["load"])] = float(v)
    return out


_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7}


def _label(v: float) -> str:
    return f"{v:g}"


def _ticks(ax: Any, loads: list[float], temps: list[float], load_name: str, temp_name: str) -> None:
    ax.set_xticks(range(len(loads)), [_label(v) for v in loads])
    ax.set_yticks(range(len(temps)), [_label(v) for v in temps])
    ax.set_xlabel(f"load: {load_name}")
    ax.set_ylabel(f"temperature: {temp_name} (cold to hot, bottom to top)")


def plot_phase_diagram(
    cells: Sequence[dict[str, Any]], load_name: str, temp_name: str, hot_is_small: bool
) -> Any:
    """One coloured square per cell, labelled with its phase and mean test accuracy."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    loads, temps = grid_axes(cells, hot_is_small)
    names = list(PHASE_COLOURS)
    codes = np.full((len(temps), len(loads)), np.nan)
    for c in cells:
        codes[temps.index(c["temperature"]), loads.index(c["load"])] = names.index(c["phase"])
    fig = new_figure(6.4, 4.6)
    ax = fig.add_subplot()
    cmap = ListedColormap(list(PHASE_COLOURS.values()))
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, origin="lower", aspect="auto")
    for c in cells:
        i, j = temps.index(c["temperature"]), loads.index(c["load"])
        ax.text(j, i, f"{c['phase']}\n{100 * c['test_acc']:.1f}%", ha="center", va="center", fontsize=9)
    _ticks(ax, loads, temps, load_name, temp_name)
    ax.set_title("phase (and mean test accuracy) per cell")
    fig.legend(
        handles=[Patch(color=PHASE_COLOURS[n], label=n) for n in names],
        loc="outside right center",
        fontsize=8,
        title="phase",
    )
    return fig


def plot_metric_grid(
    cells: Sequence[dict[str, Any]], load_name: str, temp_name: str, hot_is_small: bool
) -> Any:
    """A heat map per landscape metric over the same axes as the phase diagram, values printed in cells."""
    loads, temps = grid_axes(cells, hot_is_small)
    fig = new_figure(12, 6.6)
    axes = fig.subplots(2, 3)
    for ax, (key, title, log) in zip(axes.flat, METRIC_PANELS, strict=True):
        values = _grid(cells, loads, temps, key)
        shown = np.log10(np.where(values > 0, values, np.nan)) if log else values
        if np.isnan(shown).all():
            ax.text(0.5, 0.5, f"no {key} values", ha="center", va="center", transform=ax.transAxes)
        else:
            im = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis")
            fig.colorbar(im, ax=ax, shrink=0.8, label="log10" if log else None)
        for i in range(len(temps)):
            for j in range(len(loads)):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8, bbox=_BOX)
        _ticks(ax, loads, temps, load_name, temp_name)
        ax.set_ylabel(temp_name)
        ax.set_title(title, fontsize=9)
    return fig
