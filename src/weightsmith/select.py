r"""Selector: which weights a config touches, by glob, regex (``re:`` prefix) or predicate on the name.

One rule for every pattern kind: a pattern matches a weight when it matches the weight's full name
(``encoder.layer.0.intermediate.dense.weight``) **or** its module name, the full name without a final
``.weight`` / ``.bias`` (``encoder.layer.0.intermediate.dense``). So the glob ``*.intermediate.dense``, the
regex ``re:intermediate\.dense$``, the word ``intermediate.dense`` and the exact weight name all select the
same tensor.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .errors import WeightsmithError, close_names


@dataclass(frozen=True)
class Selector:
    """Matches weight names.

    ``include`` patterns are globs (``*.q_proj.weight``, matched whole with ``fnmatch``), regexes
    prefixed with ``re:`` (``re.search``) or bare words without glob characters, which match a run of whole
    dotted components (``q_proj`` and ``self_attn.q_proj`` select ``model.layers.0.self_attn.q_proj.weight``,
    ``proj`` does not). Every kind is tried on the weight name and on its module name (the name without a
    final ``.weight``/``.bias``; see the module docstring). A name is selected when any include pattern
    matches (or none are given) and no exclude does.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    predicate: Callable[[str], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for p in (*self.include, *self.exclude):
            if not isinstance(p, str) or not p:
                got = "an empty string" if p == "" else f"a value of type {type(p).__name__}"
                raise WeightsmithError(f"a selector pattern must be a non-empty string, got {got}")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise WeightsmithError(f"selector pattern '{p}' is not a valid regex: {exc}") from exc

    @classmethod
    def of(cls, spec: Selector | str | Sequence[str] | None) -> Selector:
        if spec is None:
            return cls()
        if isinstance(spec, Selector):
            return spec
        if isinstance(spec, str):
            return cls(include=tuple(p.strip() for p in spec.split(",") if p.strip()))
        return cls(include=tuple(spec))

    def matches(self, name: str) -> bool:
        if self.include and not any(_match(p, name) for p in self.include):
            return False
        if any(_match(p, name) for p in self.exclude):
            return False
        return self.predicate is None or self.predicate(name)

    def filter(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.matches(n)]

    def require(self, names: Iterable[str], what: str = "weights", each: bool = False) -> list[str]:
        """Like filter, but an empty selection is an error that shows close names.

        With ``each``, every include pattern on its own must match at least one name (a typo in one of
        several comma-separated patterns is an error too, not silently ignored).
        """
        names = list(names)
        if each:
            for p in self.include:
                if not any(_match(p, n) for n in names):
                    raise WeightsmithError(
                        f"selector pattern '{p}' matches none of the {len(names)} {what}; "
                        f"close names: {close_names(p, names)}"
                    )
        hits = self.filter(names)
        if not hits:
            pattern = ",".join(self.include) or "<all>"
            raise WeightsmithError(
                f"selector '{pattern}' matches none of the {len(names)} {what}; "
                f"close names: {close_names(pattern, names)}"
            )
        return hits


def module_name(name: str) -> str:
    """The module a weight belongs to: ``a.b.weight`` -> ``a.b`` (other names are returned unchanged)."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _match(pattern: str, name: str) -> bool:
    module = module_name(name)
    return _match_one(pattern, name) or (module != name and _match_one(pattern, module))


def _match_one(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern) or ("." + pattern + ".") in ("." + name + ".")
