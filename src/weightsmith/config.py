"""Config dataclasses: frozen, registered by a short name, round-trip through JSON and YAML.

Every method's options are a class decorated with ``@register_config("name", kind)``, which makes it a
frozen dataclass (a class already decorated with ``@dataclass(frozen=True)`` is kept as it is) and
registers it. ``to_dict`` writes ``{"method": name, **fields}``; ``config_from_dict`` reads it back to the
registered type, so the CLI, a YAML recipe and Python build the very same object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import pkgutil
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, dataclass_transform

import yaml

from .errors import WeightsmithError, close_names

C = TypeVar("C")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-8`` and ``6e-05`` are numbers (YAML 1.1, which PyYAML
    follows, reads them as strings because they lack a dot; JSON writes floats that way)."""


YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML (or JSON) text safely, with YAML 1.2 floats; no Python tags ever run."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (YamlLoader is a SafeLoader)


# kind ("adapter", "merge", ...) -> name -> class
_REGISTRY: dict[str, dict[str, type]] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def register_config(name: str, kind: str) -> Callable[[type[C]], type[C]]:
    """Make ``cls`` a frozen dataclass (unless its own body is one already) and register it under ``name``
    within ``kind``: configs are values, hashed and compared by their fields, never changed in place."""

    def wrap(cls: type[C]) -> type[C]:
        if "__dataclass_params__" not in cls.__dict__:
            cls = dataclasses.dataclass(frozen=True)(cls)
        elif not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not cls:
            raise TypeError(f"{kind} config '{name}' registered twice")
        table[name] = cls
        cls.method = name  # type: ignore[attr-defined]
        cls.kind = kind  # type: ignore[attr-defined]
        return cls

    return wrap


def parse_opts(items: list[str], example: str = "dropout=0.1") -> dict[str, tuple[str, Any]]:
    """``--opt key=value`` items as ``{key: (text, value)}``: values parse as YAML (numbers, lists, booleans;
    ``1e-8`` is a float), text that is not valid YAML stays a string, ``-`` in keys becomes ``_``."""
    out: dict[str, tuple[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise WeightsmithError(f"--opt '{item}': expected key=value (e.g. --opt {example})")
        try:
            value = yaml_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out[key.strip().replace("-", "_")] = (text, value)
    return out


def type_name(tp: Any) -> str:
    """How an option's type reads in a message: "a number", "an integer or null", ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join([*(type_name(a) for a in args), "null"])
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {type_name(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


NOT_VALID = object()  # what coerce returns for a value its type does not take


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (a config field's annotation), or ``NOT_VALID``. Strings holding numbers are
    read as numbers (YAML reads ``1e-3`` as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in typing.get_args(tp) else NOT_VALID
        for arg in typing.get_args(tp):
            if arg is not type(None) and (got := coerce(value, arg)) is not NOT_VALID:
                return got
        return NOT_VALID
    if origin is typing.Literal:
        return value if value in typing.get_args(tp) else NOT_VALID
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        got = [coerce(v, inner) for v in items]
        return NOT_VALID if any(g is NOT_VALID for g in got) else tuple(got)
    if tp is bool:
        return value if isinstance(value, bool) else NOT_VALID
    if tp is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else NOT_VALID
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else NOT_VALID
    if tp is str:
        return value if isinstance(value, str) else NOT_VALID
    return value


def registered(kind: str) -> dict[str, type]:
    """All configs registered under ``kind`` (imports the method packages first)."""
    return dict(_REGISTRY.get(kind, {}))


def to_dict(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"method": type(config).method}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any], kind: str) -> Any:
    data = dict(data)
    name = data.pop("method", None)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise WeightsmithError(
            f"unknown {kind} method '{name}'; known: {', '.join(sorted(table)) or '(none)'}"
        )
    cls = table[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise WeightsmithError(
            f"{kind} method '{name}' has no option '{unknown[0]}'; "
            f"options: {close_names(unknown[0], list(fields))}"
        )
    hints = _hints(cls)
    for key, value in list(data.items()):
        if key in hints:
            got = coerce(value, hints[key])
            if got is NOT_VALID:
                raise WeightsmithError(
                    f"{kind} method '{name}': option '{key}' takes {type_name(hints[key])}, not {value!r}"
                )
            if isinstance(value, str):  # text read as the number it holds; other values stay as given
                value = got
        data[key] = tuple(value) if isinstance(value, list) else value
    return cls(**data)


def _hints(cls: type) -> dict[str, Any]:
    """A config's field types; none where an annotation does not resolve at run time (then unchecked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a name imported for type checking only
        return {}


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    text = (
        yaml.safe_dump(to_dict(config), sort_keys=False)
        if path.suffix in (".yaml", ".yml")
        else json.dumps(to_dict(config), indent=2)
    )
    path.write_text(text)


def load_config(path: str | Path, kind: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise WeightsmithError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise WeightsmithError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsmithError(f"{path}: expected a mapping with a 'method' key")
    return config_from_dict(data, kind)


def import_methods(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__path__``) whose name has no leading underscore, so that
    the methods it holds register their configs: a new method is a new file, and no list names it."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
