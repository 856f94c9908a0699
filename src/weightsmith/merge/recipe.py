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
layer gradients; methods linear, task_arithmetic, ties, dare_ties, dare_linear run here (one pass over the
tasks). Every other method of mergekit 0.1.5 (slerp, nuslerp, multislerp, karcher, model_stock, della,
della_linear, breadcrumbs, breadcrumbs_ties, sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough) and
any config with ``slices:``, ``modules:`` or tokenizer keys (``tokenizer_source``, ``tokenizer:``,
``chat_template``) is planned and run by :mod:`weightsmith.merge.mergekit_plan`; so is every mergekit YAML
read with ``exact_dtype`` (mergekit's own low-precision arithmetic, :mod:`weightsmith.merge.mergekit_exact`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..config import YamlLoader, config_from_dict, registered
from ..errors import WeightsmithError, close_names
from ..select import Selector
from ..store import WeightStore
from . import inputs, mergekit_plan
from .task_arithmetic import GTA

MERGEKIT_METHODS = {
    # name: (GTA row, default normalize, default rescale)
    "linear": (GTA(uses_base=False), True, False),
    "task_arithmetic": (GTA(), False, False),
    "ties": (GTA("magnitude", elect="weighted_sum"), True, False),
    "dare_ties": (GTA("random", elect="weighted_sum"), False, True),
    "dare_linear": (GTA("random"), False, True),
}
MERGEKIT_KEYS = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "slices", "modules", "name",
}  # fmt: skip
MERGEKIT_NUMBERS = {"weight", "density", "lambda"}
MERGEKIT_FLAGS = {"normalize", "rescale", "int8_mask"}
LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
MAX_RECIPE_BYTES = 1 << 20  # a merge recipe is a few lines; refuse anything near a megabyte
MAX_RECIPE_NODES = 100_000  # YAML nodes after expanding aliases and merge keys (billion laughs)
Spec = str | Path | WeightStore
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother = 3, 6, 6, 80, 80


def short(value: Any, limit: int = 200) -> str:
    """A user value for an error message: never the whole object, at most ``limit`` characters."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MergeMethod(Protocol):
    """What every merge config provides: ``run`` writes a recipe's result to ``out``."""

    def run(self, recipe: Recipe, out: Path, **kw: Any) -> Path: ...


@dataclass
class Recipe:
    """A parsed recipe: what to merge, how, and into which dtype. ``params`` resolves per-tensor
    options (mergekit filters and gradients), ``filters`` are the mergekit filter strings (each must match
    a tensor); ``text`` is the original YAML, kept for provenance. Model names are resolved only here
    (``open_models``, ``open_base``, ``copy_from``), never by the executor."""

    method: Any
    models: list[Spec]
    base: Spec | None = None
    weights: list[float] | None = None
    select: Selector | None = None
    dtype: str | None = None
    params: Callable[[str], tuple[GTA, list[float], list[float]]] | None = None
    text: str = ""
    flavour: str = "weightsmith"
    filters: list[str] = field(default_factory=list)

    def open_models(self) -> list[WeightStore]:
        return [inputs.open_input(m) for m in self.models]

    def open_base(self) -> WeightStore | None:
        return inputs.open_input(self.base) if self.base is not None else None

    def copy_from(self) -> Path | None:
        """Where config and tokenizer files come from: the base, else the first model."""
        src = self.base if self.base is not None else (self.models[0] if self.models else None)
        return inputs.source_dir(src) if src is not None else None


# ---------------------------------------------------------------------------------------------- YAML


class _Bounded(YamlLoader):
    """A safe loader that counts nodes as it composes them (aliases and merge keys included)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nodes = 0

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_RECIPE_NODES:
            raise _TooLarge

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._count(1)
        return super().compose_node(parent, index)

    def flatten_mapping(self, node: Any) -> None:
        super().flatten_mapping(node)
        self._count(len(node.value))


class _TooLarge(Exception):
    pass


def _expanded_size(data: Any, limit: int = MAX_RECIPE_NODES) -> int:
    """Nodes of ``data``, a shared (aliased) value counted each time it is used; stops past ``limit``."""
    count, todo = 0, [data]
    while todo:
        x = todo.pop()
        count += 1
        if count > limit:
            break
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return count


def read_yaml(path: Path) -> tuple[Any, str]:
    """A recipe file's data and text: UTF-8, at most 1 MB, at most 100k nodes once aliases are expanded."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise WeightsmithError(f"{path}: {size} bytes is too large for a merge recipe (limit 1 MB)")
        raw = path.read_bytes()
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsmithError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}); save the recipe as UTF-8"
        ) from None
    too_big = (
        f"{path}: the recipe expands to more than {MAX_RECIPE_NODES} YAML nodes (aliases or merge keys "
        "repeat content); refusing it"
    )
    try:
        loader = _Bounded(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _TooLarge:
        raise WeightsmithError(too_big) from None
    except yaml.YAMLError as exc:
        raise WeightsmithError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None
    if _expanded_size(data) > MAX_RECIPE_NODES:
        raise WeightsmithError(too_big)
    return data, text


def load_recipe(path: str | Path, *, exact_dtype: bool = False) -> Recipe:
    """A recipe file, ours or mergekit's. ``exact_dtype`` (mergekit YAMLs only) reproduces mergekit's
    low-precision arithmetic bit for bit instead of computing in float32."""
    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"recipe file not found: {path}")
    data, text = read_yaml(path)
    recipe = from_data(data, path, exact_dtype=exact_dtype)
    recipe.text = text
    return recipe


def from_data(data: Any, path: Path | None = None, *, exact_dtype: bool = False) -> Recipe:
    """What a recipe file holds (its parsed mapping), ours or mergekit's, as a :class:`Recipe`: the one
    reader behind :func:`load_recipe` and :func:`command_line_recipe`. ``path`` names the recipe in messages
    and is where relative model paths are looked up."""
    if not isinstance(data, dict):
        raise WeightsmithError(
            f"{path}: a recipe is a YAML mapping (with 'method' or mergekit's 'merge_method'), "
            f"got {short(data)}"
        )
    if exact_dtype and "merge_method" not in data:
        raise WeightsmithError(
            f"{path}: --exact-dtype reproduces mergekit's arithmetic, so it takes a mergekit YAML "
            "(with 'merge_method'); our recipes compute in float32"
        )
    if exact_dtype:
        return Recipe(mergekit_plan.MergekitYAML(data, path, exact=True), [], flavour="mergekit")
    return from_mergekit(data, path) if "merge_method" in data else from_dict(data, path)


def _locate(spec: Any, recipe: Path | None, what: str) -> str:
    if not isinstance(spec, str) or not spec:
        raise WeightsmithError(f"{recipe}: {what} must be a path or model name (got {short(spec)})")
    return inputs.locate(spec, recipe.parent if recipe is not None else None)


def _model_list(items: Any, recipe: Path | None, keys: set[str]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(items, list) or not items:
        raise WeightsmithError(f"{recipe}: 'models' must be a non-empty list (got {short(items)})")
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((_locate(item, recipe, "a model"), {}))
        elif isinstance(item, dict) and "model" in item:
            name = _locate(item["model"], recipe, "a model")
            rest = {k: v for k, v in item.items() if k != "model"}
            unknown = sorted(str(k) for k in set(rest) - keys)
            if unknown:
                raise WeightsmithError(
                    f"{recipe}: model {short(name)} has unknown key(s) {short(unknown)}; "
                    f"allowed: {', '.join(sorted(keys | {'model'}))}"
                )
            out.append((name, rest))
        else:
            raise WeightsmithError(
                f"{recipe}: each model is a path or {{model: PATH, ...}} (got {short(item)})"
            )
    return out


def _number(value: Any, what: str, recipe: Path | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WeightsmithError(f"{recipe}: {what} must be a finite number (got {short(value)})")
    return float(value)


def _check_option_types(fields: dict[str, Any], recipe: Path | None) -> None:
    """Each option of a registered merge config has the type of its default (a number where a number is
    expected, a list of strings for a pattern list, ...), so ``density: high`` is a message, not a crash."""
    cls = registered("merge").get(fields.get("method"))  # type: ignore[arg-type]
    if cls is None:
        return
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            continue
        value, default = fields[f.name], f.default
        what = f"option '{f.name}' of method '{fields['method']}'"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            kind = "true or false"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a finite number"
        elif isinstance(default, str):
            ok = isinstance(value, str)
            kind = "a string"
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            kind = "a list of strings"
        else:
            continue
        if not ok:
            raise WeightsmithError(f"{recipe}: {what} must be {kind} (got {short(value)})")


def _patterns(value: Any, key: str, recipe: Path | None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise WeightsmithError(
            f"{recipe}: '{key}' must be a pattern or a list of patterns (got {short(value)})"
        )
    return tuple(items)


def from_dict(data: dict[str, Any], recipe: Path | None = None) -> Recipe:
    """Our recipe format (see the module docstring)."""
    data = dict(data)
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise WeightsmithError(f"{recipe}: recipe keys are names (got {short(bad_keys[0])})")
    if "method" not in data:
        raise WeightsmithError(f"{recipe}: missing 'method'; known: {', '.join(sorted(registered('merge')))}")
    if not isinstance(data["method"], str):
        raise WeightsmithError(f"{recipe}: 'method' must be a name (got {short(data['method'])})")
    models = _model_list(data.pop("models", None), recipe, {"weight"})
    base = data.pop("base", None)
    include, exclude = data.pop("select", None), data.pop("exclude", None)
    dtype = data.pop("dtype", None)
    if dtype is not None and not isinstance(dtype, str):
        raise WeightsmithError(f"{recipe}: 'dtype' must be a name like bfloat16 (got {short(dtype)})")
    select = None
    if include is not None or exclude is not None:
        select = Selector(
            include=_patterns(include, "select", recipe) if include is not None else (),
            exclude=_patterns(exclude, "exclude", recipe) if exclude is not None else (),
        )
    fields = {"method": data.pop("method")}
    fields.update(data)
    _check_option_types(fields, recipe)
    method = config_from_dict(fields, "merge")
    weights = [
        _number(extra.get("weight", 1.0), f"the weight of model {short(n)}", recipe) for n, extra in models
    ]
    return Recipe(
        method,
        [m for m, _ in models],
        _locate(base, recipe, "base") if base is not None else None,
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


def _check_setting(key: str, setting: Any, where: str, recipe: Path | None, filters: list[str]) -> None:
    """A mergekit parameter value: a scalar of the right type, a gradient (non-empty list of numbers), or
    a list of ``{filter, value}``. Numbers must be finite; ``density`` in (0, 1]."""
    what = f"parameter '{key}' {where}"
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for cond in setting:
            extra = sorted(str(k) for k in set(cond) - {"filter", "value"})
            if extra or "value" not in cond:
                raise WeightsmithError(
                    f"{recipe}: {what}: each entry is {{filter: NAME, value: V}} (got {short(cond)})"
                )
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise WeightsmithError(f"{recipe}: {what}: a filter is a name substring (got {short(flt)})")
            if flt is not None:
                filters.append(flt)
            if isinstance(cond["value"], (dict, list)) and key in MERGEKIT_FLAGS:
                raise WeightsmithError(
                    f"{recipe}: {what}: must be true or false (got {short(cond['value'])})"
                )
            _check_setting(key, cond["value"], where, recipe, filters)
        return
    if key in MERGEKIT_FLAGS:
        if not isinstance(setting, bool):
            raise WeightsmithError(f"{recipe}: {what} must be true or false (got {short(setting)})")
        return
    values = setting if isinstance(setting, list) else [setting]
    if not values:
        raise WeightsmithError(f"{recipe}: {what} is an empty list")
    for v in values:
        _number(v, what, recipe)
        if key == "density" and not 0.0 < float(v) <= 1.0:
            raise WeightsmithError(f"{recipe}: {what} must be in (0, 1] (got {short(v)})")


def _check_parameters(params: Any, where: str, recipe: Path | None, filters: list[str]) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise WeightsmithError(f"{recipe}: 'parameters' {where} must be a mapping (got {short(params)})")
    for key, setting in params.items():
        if key not in MERGEKIT_NUMBERS | MERGEKIT_FLAGS:
            raise WeightsmithError(
                f"{recipe}: unknown parameter {short(key)} {where}; known: "
                f"{', '.join(sorted(MERGEKIT_NUMBERS | MERGEKIT_FLAGS))}"
            )
        _check_setting(key, setting, where, recipe, filters)
    return params


def _layer_t(name: str, n_layers: int) -> float:
    m = LAYER.search("." + name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def from_mergekit(data: dict[str, Any], recipe: Path | None = None) -> Recipe:
    """A mergekit YAML, reproducing mergekit 0.1.5's semantics for the supported methods."""
    method = data["merge_method"]
    if isinstance(method, str) and method in DATA_AWARE:  # RegMean, Fisher, AdaMerging
        return data_aware_recipe(data, recipe)
    if mergekit_plan.handles(data):  # SLERP, Model Stock, DELLA, ... and every ``slices:`` config
        return Recipe(mergekit_plan.MergekitYAML(data, recipe), [], flavour="mergekit")
    unknown = sorted(str(k) for k in data if k not in MERGEKIT_KEYS)
    if unknown:
        raise WeightsmithError(
            f"{recipe}: unknown mergekit key(s) {short(unknown)}; known: {', '.join(sorted(MERGEKIT_KEYS))}"
        )
    if not isinstance(method, str) or method not in MERGEKIT_METHODS:
        raise WeightsmithError(
            f"{recipe}: mergekit method {short(method)} is not supported here; supported: "
            f"{', '.join(sorted(set(MERGEKIT_METHODS) | set(mergekit_plan.METHODS_WITH_KERNELS)))}"
        )
    for key in ("slices", "modules"):
        if data.get(key):
            raise WeightsmithError(
                f"{recipe}: mergekit '{key}:' (layer slicing) is not supported; use 'models:'"
            )
    row, norm_default, rescale_default = MERGEKIT_METHODS[method]
    entries = _model_list(data.get("models"), recipe, {"parameters"})
    filters: list[str] = []
    glob = _check_parameters(data.get("parameters"), "(global)", recipe, filters)
    for name, extra in entries:
        _check_parameters(extra.get("parameters"), f"of model {short(name)}", recipe, filters)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise WeightsmithError(f"{recipe}: 'dtype' must be a name like bfloat16 (got {short(dtype)})")
    for name, _ in entries:
        inputs.split_lora(name)  # a malformed model+LoRA reference is refused before anything is read
    base = _locate(data["base_model"], recipe, "base_model") if data.get("base_model") else None
    if row.uses_base:
        if base is None:
            raise WeightsmithError(f"{recipe}: mergekit method '{method}' needs base_model")
        entries = [(m, p) for m, p in entries if m != base]
    per_model = [(m, (extra.get("parameters") or {})) for m, extra in entries]
    n_layers = _num_layers(base or entries[0][0])

    def value(key: str, scopes: list[dict[str, Any]], name: str, t: float, default: Any) -> Any:
        for scope in scopes:
            if key in scope:
                v = evaluate_setting(scope[key], name, t)
                if v is not None:
                    return v
        if default is None:
            raise WeightsmithError(
                f"{recipe}: missing required parameter '{key}' for tensor '{name}' (no scalar, gradient or "
                "matching filter gives it a value)"
            )
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
        dtype,
        params,
        flavour="mergekit",
        filters=filters,
    )


def _num_layers(model: str) -> int:
    try:
        cfg = inputs.model_path(model) / "config.json"
        return int(json.loads(cfg.read_text()).get("num_hidden_layers", 1)) if cfg.is_file() else 1
    except (WeightsmithError, OSError, ValueError, TypeError, AttributeError):
        return 1


def merge_method(config: Any) -> MergeMethod:
    """``config`` as a merge method: an instance of a config registered under kind "merge"."""
    cls = type(config)
    if isinstance(config, mergekit_plan.MergekitYAML):
        return config
    if registered("merge").get(getattr(cls, "method", "")) is not cls:
        raise WeightsmithError(
            f"{short(config)} is not a merge method; use one of {', '.join(sorted(registered('merge')))}"
        )
    runner: MergeMethod = config
    return runner


def run(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    exact_dtype: bool = False,
) -> Path:
    """Execute a recipe (a :class:`Recipe` or a YAML path) and write the result to ``out``: the method's
    registered config type runs it (``config.run(recipe, out, ...)``). ``exact_dtype``: see
    :func:`load_recipe`."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, exact_dtype=exact_dtype)
    if exact_dtype and not (isinstance(r.method, mergekit_plan.MergekitYAML) and r.method.exact):
        raise WeightsmithError(
            "--exact-dtype applies to a mergekit YAML read with load_recipe(exact_dtype=True)"
        )
    method = merge_method(r.method)
    provenance = {"weightsmith_recipe.yaml": r.text} if r.text else None
    return method.run(
        r,
        Path(out),
        dtype=dtype or r.dtype,
        device=device,
        force=force,
        shard_size=shard_size,
        extra_files=provenance,
    )


def merge(
    models: Sequence[Spec],
    method: MergeMethod,
    out: str | Path,
    *,
    base: Spec | None = None,
    weights: Sequence[float] | None = None,
    select: Selector | str | Sequence[str] | None = None,
    params: Callable[[str], tuple[GTA, list[float], list[float]]] | None = None,
    dtype: str | None = None,
    device: str | None = "cpu",
    force: bool = False,
    shard_size: str | int = "2GB",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Merge checkpoints (paths, model names, adapt runs or stores) with a merge config
    (``TIES(density=0.2)``, ``TaskArithmetic(scaling=0.5)``, ``OPCM()``, ...) and write a Hugging Face
    model directory to ``out``.

    Tensors that ``select`` leaves out are copied from the base (or the first model). ``params`` may give
    per-tensor (spec, weights, densities), as mergekit's filters and gradients do.
    """
    if not models:
        raise WeightsmithError("nothing to merge: give at least one model")
    merge_method(method)
    r = Recipe(
        method,
        list(models),
        base,
        [float(w) for w in weights] if weights is not None else None,
        Selector.of(select) if select is not None else None,
        None,
        params,
    )
    return method.run(
        r, Path(out), dtype=dtype, device=device, force=force, shard_size=shard_size, extra_files=extra_files
    )


DATA_AWARE = ("regmean", "fisher", "adamerging")
DATA_AWARE_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
}


def data_aware_recipe(data: Mapping[str, Any], path: Path | None = None) -> Recipe:
    """A mergekit-style YAML naming a data-aware method (``merge_method: regmean``) as a recipe: the method's
    options (data options included) come from the global ``parameters:``, a model's ``parameters:`` may give
    its ``weight`` and its ``data`` source; ``base_model`` is the base. Scalars only (no gradients or
    filters: these methods set their own per-layer weights)."""
    method = data["merge_method"]
    unknown = sorted(str(k) for k in data if k not in DATA_AWARE_KEYS)
    if unknown:
        raise WeightsmithError(f"{path}: key(s) {unknown} are not read with merge_method {method}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise WeightsmithError(f"{path}: tokenizer_source with {method}: only 'base' (the base's tokenizer)")
    glob = dict(data.get("parameters") or {})
    entries = _model_list(data.get("models"), path, {"parameters"})
    base = data.get("base_model")
    base_name = _locate(base, path, "base_model") if base else None
    entries = [(m, e) for m, e in entries if m != base_name]
    per = [dict(e.get("parameters") or {}) for _, e in entries]
    for p in per:
        extra = sorted(set(p) - {"weight", "data"})
        if extra:
            raise WeightsmithError(
                f"{path}: per-model parameter(s) {extra} of {method}: only weight and data"
            )
    if any("data" in p for p in per):
        if "data" in glob or not all("data" in p for p in per):
            raise WeightsmithError(f"{path}: give 'data' for every model, or once in the global parameters")
        glob["data"] = [str(p["data"]) for p in per]
    elif isinstance(glob.get("data"), str):
        glob["data"] = [glob["data"]]
    fields = {"method": method, **glob}
    _check_option_types(fields, path)
    weights = [_number(p.get("weight", 1.0), "a model's weight", path) for p in per]
    dtype = data.get("out_dtype") or data.get("dtype")
    return Recipe(
        config_from_dict(fields, "merge"), [m for m, _ in entries], base_name, weights, None, dtype,
        flavour="mergekit",
    )  # fmt: skip


# ------------------------------------------------------------------------------------ command line

COMMAND_LINE = Path("command line")  # names a recipe built from options in messages (models are as given)


def mergekit_names() -> list[str]:
    """The method names a mergekit-style recipe (``merge_method:``) takes."""
    return sorted(set(MERGEKIT_METHODS) | set(mergekit_plan.METHODS_WITH_KERNELS) | set(DATA_AWARE))


def recipe_data(
    method: str,
    models: Sequence[str],
    *,
    base: str | None = None,
    weights: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    mergekit: bool = False,
) -> dict[str, Any]:
    """The mapping a recipe file would hold for ``method`` on ``models`` (read it with :func:`from_data`):
    ours (``method:`` with the options beside it) for a registered merge config; mergekit's
    (``merge_method:`` with the options under ``parameters:`` and each weight under its model's) for a name
    only mergekit has (``linear``, ``dare_linear``) or when ``mergekit`` asks for mergekit's semantics.
    Without ``weights``, a mergekit method that requires one gets weight 1 for every model. Our options are
    checked here to be fields of the method's config (a recipe key such as ``base`` is not an option)."""
    options = dict(options or {})
    ours = registered("merge")
    if weights is not None and len(weights) != len(models):
        raise WeightsmithError(f"{len(weights)} weight(s) for {len(models)} model(s); give one per model")
    if not mergekit and method in ours:
        names = [f.name for f in dataclasses.fields(ours[method])]
        for key in options:
            if key not in names:
                raise WeightsmithError(
                    f"method '{method}' has no option '{key}'; options: {close_names(key, names) or '(none)'}"
                )
        items: list[Any] = (
            list(models)
            if weights is None
            else [{"model": m, "weight": w} for m, w in zip(models, weights, strict=True)]
        )
        data: dict[str, Any] = {"method": method, **options, "models": items}
        if base is not None:
            data["base"] = base
    elif method in mergekit_names():
        if weights is None and "weight" not in options and _requires_weight(method):
            weights = [1.0] * len(models)
        per: list[dict[str, Any]] = [{"model": m} for m in models]
        for item, w in zip(per, weights or [], strict=False):
            item["parameters"] = {"weight": w}
        data = {"merge_method": method, "models": per}
        if base is not None:
            data["base_model"] = base
        if options:
            data["parameters"] = options
    else:
        known = sorted(set(ours) | set(mergekit_names())) if not mergekit else mergekit_names()
        raise WeightsmithError(
            f"unknown {'mergekit ' if mergekit else ''}merge method '{method}'; known: {', '.join(known)}"
        )
    if dtype is not None:
        data["dtype"] = dtype
    return data


def _requires_weight(method: str) -> bool:
    if method in MERGEKIT_METHODS:
        return True  # mergekit's linear / task arithmetic / TIES / DARE rows read a weight per model
    if method not in mergekit_plan.METHODS_WITH_KERNELS:
        return False
    params = mergekit_plan.method(method).params
    return any(p.name == "weight" and p.default is mergekit_plan.REQUIRED for p in params)


def command_line_recipe(data: dict[str, Any], *, exact_dtype: bool = False) -> Recipe:
    """The :class:`Recipe` of a mapping from :func:`recipe_data`, read exactly as a recipe file with that
    content (its text, the equivalent YAML, is kept as the output's provenance)."""
    recipe = from_data(data, COMMAND_LINE, exact_dtype=exact_dtype)
    recipe.text = yaml.safe_dump(data, sort_keys=False)
    return recipe
