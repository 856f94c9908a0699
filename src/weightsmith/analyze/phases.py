"""Phases of learning over a grid of zoo models: local and global loss-landscape structure.

Yang, Hodgkinson, Theisen, Zou, Gonzalez, Ramchandran & Mahoney, "Taxonomizing local versus global
structure in neural network loss landscapes", NeurIPS 2021 (arXiv:2107.11228). Models are trained over
a 2-D grid of a *temperature-like* parameter (the noise scale of SGD: larger learning rate or smaller
batch is hotter) and a *load-like* parameter (how much the data constrain the model: the paper varies
width and the amount of data). For each cell, ``seeds`` models are trained from different seeds and the
paper's metrics are read (``analyze.landscape``, ``analyze.cka``):

- training loss and test accuracy (mean over seeds);
- local: top Hessian eigenvalue (power iteration) and Hessian trace (Hutchinson) of the training loss
  at the first seed's model;
- global: mode connectivity ``mc`` of the training loss along the path between the first two seeds
  (straight line after weight matching, ``analyze.barrier``; ``mc_naive`` without matching) and the
  linear CKA of their penultimate-layer features on the test set.

The phase of a cell follows the paper's taxonomy (its Figure 1 and Table 1):

=========  =========================  ==============  ==========
phase      global                     local           models
=========  =========================  ==============  ==========
I          poorly connected (mc < 0)  sharp           -
II         poorly connected (mc < 0)  flat            -
III        well connected (mc >= 0)   sharp           -
IV-A       well connected             flat            dissimilar (low CKA)
IV-B       well connected             flat            similar (high CKA)
=========  =========================  ==============  ==========

The paper reads the boundaries off its plots; here they are explicit (``PhaseThresholds``):
poorly connected when ``mc < -mc_tol`` (a loss gap in nats), sharp when the Hessian trace is above
``sharp_trace`` (default: the geometric mean of the grid's smallest and largest trace), similar when
CKA is at least ``similar_cka`` (default: the midpoint of the grid's CKA range).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..progress import track
from .barrier import barrier, classification_eval
from .cka import linear_cka
from .landscape import hessian_trace, mode_connectivity, top_hessian_eigenvalue
from .run import num

TEMPERATURES = ("batch_size", "lr")
LOADS = ("width", "data")
PHASES = ("I", "II", "III", "IV-A", "IV-B")


@register_config("phases", "analyze")
class PhaseGrid:
    """The grid of zoo models: ``temperature`` x ``load`` values, and how each model is trained and read.

    ``temperatures`` are batch sizes (``temperature="batch_size"``; large = cold) or learning rates
    (``"lr"``; large = hot); ``loads`` are MLP widths (``load="width"``) or fractions of the training
    set in (0, 1] (``"data"``). The fixed ones are ``lr``, ``batch_size`` and ``width``.
    """

    task: str = "digits"
    temperature: str = "batch_size"
    temperatures: tuple[float, ...] = (256, 64, 16)
    load: str = "width"
    loads: tuple[float, ...] = (4, 16, 64)
    depth: int = 2
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 64
    width: int = 64
    seeds: int = 2
    hessian_examples: int = 1024
    power_iters: int = 50
    trace_samples: int = 16
    path_points: int = 11

    def __post_init__(self) -> None:
        if self.temperature not in TEMPERATURES:
            raise WeightsmithError(f"temperature must be one of {TEMPERATURES}, got {self.temperature!r}")
        if self.load not in LOADS:
            raise WeightsmithError(f"load must be one of {LOADS}, got {self.load!r}")
        for name in ("temperatures", "loads"):
            values = getattr(self, name)
            if not values or any(not (math.isfinite(v) and v > 0) for v in values):
                raise WeightsmithError(f"{name} must be a non-empty list of positive numbers, got {values}")
        if self.load == "data" and any(v > 1 for v in self.loads):
            raise WeightsmithError(f"loads are fractions of the training set in (0, 1], got {self.loads}")
        if self.load == "width" or self.temperature == "batch_size":
            ints = [*self.loads] if self.load == "width" else []
            ints += [*self.temperatures] if self.temperature == "batch_size" else []
            if any(v != int(v) for v in ints):
                raise WeightsmithError(f"widths and batch sizes must be whole numbers, got {ints}")
        for name in ("depth", "epochs", "batch_size", "width", "power_iters", "trace_samples"):
            if getattr(self, name) < 1:
                raise WeightsmithError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seeds < 2:
            raise WeightsmithError(
                f"seeds must be at least 2 (mode connectivity and CKA compare two), got {self.seeds}"
            )
        if self.path_points < 3:
            raise WeightsmithError(f"path_points must be at least 3, got {self.path_points}")
        if self.hessian_examples < 2:
            raise WeightsmithError(f"hessian_examples must be at least 2, got {self.hessian_examples}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise WeightsmithError(f"lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class PhaseThresholds:
    """Phase boundaries; ``None`` picks the grid-relative default described in the module docstring."""

    mc_tol: float = 0.05
    sharp_trace: float | None = None
    similar_cka: float | None = None


@dataclass
class PhaseResult:
    """One record per grid cell (``temperature``, ``load``, metrics, ``phase``) and the rule used."""

    grid: PhaseGrid
    cells: list[dict[str, Any]]
    thresholds: dict[str, float]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become null (``run.num``)."""
        cells = [{k: num(v) if isinstance(v, (int, float)) else v for k, v in c.items()} for c in self.cells]
        return {
            "grid": dataclasses.asdict(self.grid),
            "thresholds": {k: num(v) for k, v in self.thresholds.items()},
            "cells": cells,
            "seconds": round(self.seconds, 2),
        }


def label_phases(cells: list[dict[str, Any]], thresholds: PhaseThresholds | None = None) -> dict[str, float]:
    """Set ``cell["phase"]`` for every cell from ``mc``, ``hessian_trace`` and ``cka``; return the
    thresholds used (grid-relative defaults filled in)."""
    th = thresholds or PhaseThresholds()
    traces = [c["hessian_trace"] for c in cells if c["hessian_trace"] is not None and c["hessian_trace"] > 0]
    ckas = [c["cka"] for c in cells if c["cka"] is not None]
    sharp = th.sharp_trace
    if sharp is None:
        sharp = math.sqrt(min(traces) * max(traces)) if traces else math.inf
    similar = th.similar_cka
    if similar is None:
        similar = (min(ckas) + max(ckas)) / 2 if ckas else 1.0
    for c in cells:
        connected = c["mc"] >= -th.mc_tol
        is_sharp = c["hessian_trace"] is not None and c["hessian_trace"] > sharp
        if not connected:
            c["phase"] = "I" if is_sharp else "II"
        elif is_sharp:
            c["phase"] = "III"
        else:
            c["phase"] = "IV-B" if c["cka"] is not None and c["cka"] >= similar else "IV-A"
    return {"mc_tol": th.mc_tol, "sharp_trace": sharp, "similar_cka": similar}


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """The input of the model's last ``nn.Linear`` for inputs ``x`` (eval mode, no grad)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise WeightsmithError(f"{type(model).__name__} has no nn.Linear layer to read features from")
    seen: list[Tensor] = []
    handle = last[-1].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0].flatten(1)


def landscape_metrics(
    model: nn.Module, x: Tensor, y: Tensor, grid: PhaseGrid, seed: int = 0
) -> dict[str, Any]:
    """Top Hessian eigenvalue and Hutchinson trace of the mean cross-entropy of ``model`` on ``x, y``."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    top = top_hessian_eigenvalue(loss, params, iters=grid.power_iters, seed=seed)
    trace = hessian_trace(loss, params, samples=grid.trace_samples, seed=seed)
    return {"top_eigenvalue": top.eigenvalue, "hessian_trace": trace, "power_converged": top.converged}


def _cell(grid: PhaseGrid, task: Any, temp: float, load: float) -> tuple[Any, int, float, int]:
    """The cell's training data, width, learning rate and batch size."""
    width = int(load) if grid.load == "width" else grid.width
    data = task
    if grid.load == "data":
        n = max(1, round(load * len(task.y_train)))
        keep = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(1234))[:n]
        data = dataclasses.replace(task, x_train=task.x_train[keep], y_train=task.y_train[keep])
    lr = temp if grid.temperature == "lr" else grid.lr
    batch = int(temp) if grid.temperature == "batch_size" else grid.batch_size
    return data, width, lr, batch


def _train_cell(grid: PhaseGrid, task: Any, temp: float, load: float, seed: int) -> nn.Module:
    from .. import zoo

    data, width, lr, batch = _cell(grid, task, temp, load)
    torch.manual_seed(seed)
    model = zoo.make_model("mlp", data, width, grid.depth)
    return zoo.train(model, data, epochs=grid.epochs, lr=lr, batch_size=batch, seed=seed)


def run_cell(grid: PhaseGrid, task: Any, temp: float, load: float) -> dict[str, Any]:
    """Train ``grid.seeds`` models of one cell and read every metric (see the module docstring)."""
    from .. import zoo
    from ..merge.permute import infer_chain_spec

    models = [_train_cell(grid, task, temp, load, s) for s in range(grid.seeds)]
    data, width, _, _ = _cell(grid, task, temp, load)  # the data the models saw (a subset for "data")
    train_eval = [zoo.evaluate(m, data.x_train, data.y_train) for m in models]
    test_eval = [zoo.evaluate(m, task.x_test, task.y_test) for m in models]
    n = min(grid.hessian_examples, len(data.y_train))
    local = landscape_metrics(models[0], data.x_train[:n], data.y_train[:n], grid)
    a, b = (m.state_dict() for m in models[:2])
    template = zoo.make_model("mlp", task, width, grid.depth)
    curves = barrier(
        template,
        a,
        b,
        classification_eval(data.x_train, data.y_train),
        infer_chain_spec(a),
        k=grid.path_points,
    )
    features = [penultimate_features(m, task.x_test) for m in models[:2]]
    try:
        cka: float | None = linear_cka(*features)
    except WeightsmithError:  # a dead layer: constant features have no CKA
        cka = None
    return {
        "temperature": temp,
        "load": load,
        "train_loss": sum(e[0] for e in train_eval) / len(models),
        "train_acc": sum(e[1] for e in train_eval) / len(models),
        "test_loss": sum(e[0] for e in test_eval) / len(models),
        "test_acc": sum(e[1] for e in test_eval) / len(models),
        **local,
        "mc": mode_connectivity(curves["aligned"].loss),
        "mc_naive": mode_connectivity(curves["naive"].loss),
        "loss_barrier": curves["aligned"].loss_barrier,
        "cka": cka,
    }


def phase_grid(grid: PhaseGrid | None = None, thresholds: PhaseThresholds | None = None) -> PhaseResult:
    """Train and measure every cell of ``grid`` (row-major: temperatures, then loads) and label phases."""
    from .. import zoo

    grid = grid or PhaseGrid()
    start = time.perf_counter()
    task = zoo.load_task(grid.task)
    pairs = [(t, lo) for t in grid.temperatures for lo in grid.loads]
    cells = [run_cell(grid, task, t, lo) for t, lo in track(pairs, "phases", total=len(pairs))]
    used = label_phases(cells, thresholds)
    return PhaseResult(grid, cells, used, time.perf_counter() - start)
