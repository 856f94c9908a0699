"""Recipes: a YAML file of steps, each a registered config of one job, run in order on one model.

DESIGN.md: "a recipe file is a list of steps built from the same configs, so the CLI, YAML and Python say
the same thing". A step is a one-key mapping, ``{KIND: {method: NAME, **fields, **step options}}``: the
kind names a job that registers a step (:func:`register_step`; today ``compress``), ``method`` and the
fields build that job's registered config exactly as ``--method``/``--opt`` and ``config_from_dict`` do,
and the job's own step options say where its data comes from and where its output goes::

    model: smollm2                 # the first step's input: packaged name or model directory
    steps:
      - compress:
          method: gptq             # a registered compress config ...
          bits: 4                  # ... and its fields
          group_size: 64
          calib: hamlet            # step options: calibration text, windows, format, output
          samples: 32
          seq_len: 512
          format: compressed-tensors
          out: smollm2-gptq4       # relative paths are taken from the recipe's folder

Steps run on one model in memory: each works on the model the step before left (so a dense-format pruning
step followed by a quantising one chains), unless the step names its own ``model:``, which is then loaded
afresh. Every step is parsed and checked (configs, options, formats, calibration texts, free outputs) before
the first model loads; each output is written through the staging writer, complete or not at all (the outputs
of steps that finished before a failing one stay). Under torchrun every process runs the recipe and each
step shares out its calibration (see :mod:`weightsmith.compress.step`); rank 0 writes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import distributed
from .distributed import World
from .errors import WeightsmithError

STEP_PACKAGES = ("weightsmith.compress",)  # job packages that register a step kind when imported


class Step(Protocol):
    """A checked step: ``run`` changes the model in place (and writes the step's output), returns a line."""

    def run(self, model: nn.Module, tokenizer: Any, device: torch.device, world: World) -> str: ...


# a step kind's reader: (the step's mapping, the recipe's folder, force) -> a checked step
StepReader = Callable[[dict[str, Any], Path, bool], Step]
_STEPS: dict[str, StepReader] = {}


def register_step(kind: str) -> Callable[[StepReader], StepReader]:
    """Register the reader of the recipe steps of ``kind`` (a job's name, e.g. ``compress``)."""

    def wrap(reader: StepReader) -> StepReader:
        if kind in _STEPS and _STEPS[kind] is not reader:
            raise TypeError(f"recipe step kind '{kind}' registered twice")
        _STEPS[kind] = reader
        return reader

    return wrap


def step_kinds() -> list[str]:
    """The kinds a recipe step may name (imports the job packages that register them)."""
    for name in STEP_PACKAGES:
        importlib.import_module(name)
    return sorted(_STEPS)


@dataclass(frozen=True)
class RecipeStep:
    kind: str
    model: str | None  # a model to load afresh for this step (None: the model the previous step left)
    step: Step


@dataclass(frozen=True)
class StepsRecipe:
    """A parsed, checked recipe file."""

    path: Path
    model: str | None
    steps: list[RecipeStep] = field(default_factory=list)


def _locate(spec: str, folder: Path) -> str:
    """A model directory relative to the recipe's folder when it exists there; otherwise ``spec`` as given
    (a packaged name such as ``smollm2``, or a path from the working directory)."""
    p = Path(spec).expanduser()
    return str(folder / p) if not p.is_absolute() and (folder / p).exists() else spec


def load_steps(path: str | Path, force: bool = False) -> StepsRecipe:
    """Read and check a recipe file (nothing is loaded or written yet). ``force``: outputs may be replaced."""
    from .merge.recipe import read_yaml  # the bounded, UTF-8-checked YAML reader of recipe files

    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"recipe file not found: {path}")
    data, _ = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise WeightsmithError(f"{path}: a recipe is a mapping with a non-empty 'steps' list")
    unknown = sorted(str(k) for k in data if k not in ("model", "steps"))
    if unknown:
        raise WeightsmithError(f"{path}: unknown key '{unknown[0]}'; a recipe has 'model' and 'steps'")
    kinds = step_kinds()
    folder = path.parent
    top = data.get("model")
    if top is not None and not isinstance(top, str):
        raise WeightsmithError(f"{path}: 'model' must be a packaged name or a model directory (got {top!r})")
    steps: list[RecipeStep] = []
    outs: dict[str, int] = {}
    for i, item in enumerate(data["steps"], 1):
        where = f"{path}: step {i}"
        if not isinstance(item, dict) or len(item) != 1:
            raise WeightsmithError(
                f"{where}: a step is one mapping {{KIND: {{method: ...}}}}; kinds: {', '.join(kinds)}"
            )
        ((kind, body),) = item.items()
        if kind not in kinds:
            raise WeightsmithError(f"{where}: unknown step kind {kind!r}; known: {', '.join(kinds)}")
        if not isinstance(body, dict):
            raise WeightsmithError(f"{where} ({kind}): expected a mapping with 'method' and options")
        body = dict(body)
        model = body.pop("model", None)
        if model is not None and not isinstance(model, str):
            raise WeightsmithError(f"{where} ({kind}): 'model' must be a name or a directory (got {model!r})")
        if model is None and not steps and top is None:
            raise WeightsmithError(f"{where} ({kind}): no model; give the recipe a 'model' or the step one")
        out = body.get("out")
        target = str((folder / out).resolve()) if isinstance(out, str) else None
        if target in outs:
            raise WeightsmithError(f"{where} ({kind}): 'out' {out} is step {outs[target]}'s output too")
        try:
            step = _STEPS[kind](body, folder, force)
        except WeightsmithError as exc:
            raise WeightsmithError(f"{where} ({kind}): {exc}") from exc
        if target is not None:
            outs[target] = i
        steps.append(RecipeStep(kind, None if model is None else _locate(model, folder), step))
    return StepsRecipe(path, None if top is None else _locate(top, folder), steps)


def run_recipe(path: str | Path, device: str | torch.device = "cpu", force: bool = False) -> list[str]:
    """Run every step of the recipe at ``path`` in order; one summary line per step (under torchrun: rank 0
    writes the outputs and gets the lines, the other ranks an empty list)."""
    from .models import load_model

    recipe = load_steps(path, force)
    world, dev = distributed.init(device)
    lines: list[str] = []
    loaded: tuple[nn.Module, Any] | None = None
    for i, rs in enumerate(recipe.steps, 1):
        if rs.model is not None or loaded is None:
            spec = rs.model if rs.model is not None else recipe.model
            assert spec is not None  # load_steps refused a first step without a model
            loaded = load_model(spec)
        try:
            line = rs.step.run(loaded[0], loaded[1], dev, world)
        except WeightsmithError as exc:
            raise WeightsmithError(f"{recipe.path}: step {i} ({rs.kind}): {exc}") from exc
        if world.main:
            lines.append(f"step {i} ({rs.kind}): {line}")
    return lines
