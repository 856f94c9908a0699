"""Merge recipes: our YAML format, and mergekit's YAML read with mergekit's own semantics.

Ours (any registered merge method; options beside ``method``)::

    method: ties            # average | task_arithmetic | ties | dare | dare_ties | gta | opcm | lora ...
    density: 0.2
    base: path/to/base      # a model directory, .safetensors file or packaged asset name
    models:
      - model: path/to/ft-a
        weight: 1.0
      - path/to/ft-b        # weight 1
    select: ["*encoder*"]  # optional: tensors to merge; the others are copied from the base
    exclude: ["*pooler*"]
    dtype: bfloat16         # optional output dtype (default: the base's)

mergekit (detected by ``merge_method``): ``models:`` with per-model ``parameters`` (weight, density),
global ``parameters`` (normalize, lambda, rescale, int8_mask), scalars, ``{filter, value}`` lists and
layer gradients; methods linear, task_arithmetic, ties, dare_ties, dare_linear.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import config_from_dict, registered
from ..errors import WeightsmithError
from ..select import Selector
from . import _core
from .task_arithmetic import DARE, DARETIES, GTA, TIES, Average, TaskArithmetic

MERGEKIT_METHODS = {
    # name: (GTA row, default normalize, default rescale)
    "linear": (GTA(uses_base=False), True, False),
    "task_arithmetic": (GTA(), False, False),
    "ties": (GTA("magnitude", elect="weighted_sum"), True, False),
    "dare_ties": (GTA("random", elect="weighted_sum"), False, True),
    "dare_linear": (GTA("random"), False, True),
}
LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


@dataclass
class Recipe:
    """A parsed recipe: what to merge, how, and into which dtype. ``params`` resolves per-tensor
    options (mergekit filters and gradients); ``text`` is the original YAML, kept for provenance."""

    method: Any
    models: list[str]
    base: str | None = None
    weights: list[float] | None = None
    select: Selector | None = None
    dtype: str | None = None
    params: Callable[[str], tuple[GTA, list[float], list[float]]] | None = None
    text: str = ""
    flavour: str = "weightsmith"


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WeightsmithError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsmithError(
            f"{path}: a recipe is a YAML mapping (with 'method' or mergekit's 'merge_method')"
        )
    recipe = from_mergekit(data, path) if "merge_method" in data else from_dict(data, path)
    recipe.text = text
    return recipe


def _locate(spec: Any, recipe: Path | None, what: str) -> str:
    if not isinstance(spec, str) or not spec:
        raise WeightsmithError(f"{recipe}: {what} must be a path or model name (got {spec!r})")
    p = Path(spec).expanduser()
    if not p.exists() and recipe is not None and (recipe.parent / p).exists():
        return str(recipe.parent / p)
    return spec


def _model_list(items: Any, recipe: Path | None) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(items, list) or not items:
        raise WeightsmithError(f"{recipe}: 'models' must be a non-empty list")
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((_locate(item, recipe, "a model"), {}))
        elif isinstance(item, dict) and "model" in item:
            rest = {k: v for k, v in item.items() if k != "model"}
            out.append((_locate(item["model"], recipe, "a model"), rest))
        else:
            raise WeightsmithError(
                f"{recipe}: each model is a path or {{model: PATH, weight: W}} (got {item!r})"
            )
    return out


def from_dict(data: dict[str, Any], recipe: Path | None = None) -> Recipe:
    """Our recipe format (see the module docstring)."""
    data = dict(data)
    if "method" not in data:
        raise WeightsmithError(f"{recipe}: missing 'method'; known: {', '.join(sorted(registered('merge')))}")
    models = _model_list(data.pop("models", None), recipe)
    base = data.pop("base", None)
    include, exclude = data.pop("select", None), data.pop("exclude", None)
    dtype = data.pop("dtype", None)
    select = None
    if include is not None or exclude is not None:
        as_tuple = lambda v: tuple([v] if isinstance(v, str) else (v or ()))  # noqa: E731
        select = Selector(include=as_tuple(include), exclude=as_tuple(exclude))
    fields = {"method": data.pop("method")}
    fields.update(data)
    method = config_from_dict(fields, "merge")
    weights = []
    for name, extra in models:
        unknown = set(extra) - {"weight"}
        if unknown:
            raise WeightsmithError(
                f"{recipe}: model {name} has unknown key(s) {sorted(unknown)}; only 'weight'"
            )
        weights.append(float(extra.get("weight", 1.0)))
    return Recipe(
        method,
        [m for m, _ in models],
        _locate(base, recipe, "base") if base else None,
        weights,
        select,
        dtype,
    )


# -------------------------------------------------------------------------------------------- mergekit


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """mergekit's value rules: a scalar; a list of numbers interpolated at ``t`` (a gradient over the
    layers); or a list of ``{filter, value}`` where the first filter that is a substring of the tensor
    name (or ``*``/absent) wins."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                flt = cond.get("filter")
                if flt is None or flt == "*" or flt in name:
                    return evaluate_setting(cond.get("value"), name, t)
            return None
        return setting[int(t * (len(setting) - 1))]
    return None


def _layer_t(name: str, n_layers: int) -> float:
    m = LAYER.search("." + name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def from_mergekit(data: dict[str, Any], recipe: Path | None = None) -> Recipe:
    """A mergekit YAML, reproducing mergekit 0.1.5's semantics for the supported methods."""
    method = data["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise WeightsmithError(
            f"{recipe}: mergekit method '{method}' is not supported here; supported: "
            f"{', '.join(MERGEKIT_METHODS)}. Run mergekit itself for the others."
        )
    for key in ("slices", "modules"):
        if data.get(key):
            raise WeightsmithError(
                f"{recipe}: mergekit '{key}:' (layer slicing) is not supported; use 'models:'"
            )
    tok = data.get("tokenizer_source")
    if data.get("tokenizer") or (tok is not None and tok != "base"):
        raise WeightsmithError(
            f"{recipe}: tokenizer_source '{tok}' is not supported; the base's tokenizer is copied"
        )
    row, norm_default, rescale_default = MERGEKIT_METHODS[method]
    entries = _model_list(data.get("models"), recipe)
    for name, _ in entries:
        if "+" in name and not Path(name).exists():
            raise WeightsmithError(
                f"{recipe}: '{name}': model+LoRA references are not supported; merge the "
                "LoRA first (weightsmith.merge.lora_merge)"
            )
    base = _locate(data["base_model"], recipe, "base_model") if data.get("base_model") else None
    if row.uses_base:
        if base is None:
            raise WeightsmithError(f"{recipe}: mergekit method '{method}' needs base_model")
        entries = [(m, p) for m, p in entries if m != base]
    glob = data.get("parameters") or {}
    per_model = [(m, (extra.get("parameters") or {})) for m, extra in entries]
    n_layers = _num_layers(base or entries[0][0])

    def value(key: str, scopes: list[dict[str, Any]], name: str, t: float, default: Any) -> Any:
        for scope in scopes:
            if key in scope:
                v = evaluate_setting(scope[key], name, t)
                if v is not None:
                    return v
        if default is None:
            raise WeightsmithError(f"{recipe}: missing required parameter '{key}' for tensor '{name}'")
        return default

    def params(name: str) -> tuple[GTA, list[float], list[float]]:
        t = _layer_t(name, n_layers)
        normalize = bool(value("normalize", [glob], name, t, norm_default))
        rescale = bool(value("rescale", [glob], name, t, rescale_default))
        spec = GTA(
            row.sparsify,
            1.0,
            "tensor",
            "l1" if rescale else "none",
            row.elect,
            "weights" if normalize else "none",
            float(value("lambda", [glob], name, t, 1.0)),
            uses_base=row.uses_base,
        )
        weights = [float(value("weight", [p, glob], name, t, None)) for _, p in per_model]
        dens = [float(value("density", [p, glob], name, t, 1.0)) for _, p in per_model]
        return spec, weights, dens

    return Recipe(
        row,
        [m for m, _ in per_model],
        base,
        None,
        None,
        data.get("out_dtype") or data.get("dtype"),
        params,
        flavour="mergekit",
    )


def _num_layers(model: str) -> int:
    import json

    from ..models import resolve

    try:
        cfg = resolve(model) / "config.json"
        return int(json.loads(cfg.read_text()).get("num_hidden_layers", 1)) if cfg.is_file() else 1
    except (WeightsmithError, OSError, ValueError):
        return 1


# A runner writes a recipe's result to OUT; each method family registers one for its config types.
Runner = Callable[..., Path]
RUNNERS: dict[type, Runner] = {}


def register_runner(*types: type) -> Callable[[Runner], Runner]:
    def wrap(fn: Runner) -> Runner:
        for t in types:
            RUNNERS[t] = fn
        return fn

    return wrap


@register_runner(GTA, Average, TaskArithmetic, TIES, DARE, DARETIES)
def _run_gta(recipe: Recipe, out: Path, **kw: Any) -> Path:
    return _core.merge(
        recipe.models,
        recipe.method,
        out,
        base=recipe.base,
        weights=recipe.weights,
        select=recipe.select,
        params=recipe.params,
        **kw,
    )


def run(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
) -> Path:
    """Execute a recipe (a :class:`Recipe` or a YAML path) and write the result to ``out``."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fn = RUNNERS.get(type(r.method))
    if fn is None:
        raise WeightsmithError(f"merge method '{type(r.method).method}' cannot run from a recipe")  # type: ignore[attr-defined]
    provenance = {"weightsmith_recipe.yaml": r.text} if r.text else None
    return fn(
        r,
        Path(out),
        dtype=dtype or r.dtype,
        device=device,
        force=force,
        shard_size=shard_size,
        extra_files=provenance,
    )
