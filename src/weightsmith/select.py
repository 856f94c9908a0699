"""Selector: which weights a config touches, by glob, regex (``re:`` prefix) or predicate on the name."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .errors import WeightsmithError, close_names


@dataclass(frozen=True)
class Selector:
    """Matches weight names.

    ``include`` patterns are globs (``*.q_proj.weight``) or regexes prefixed with ``re:``;
    a name is selected when any include pattern matches (or none are given) and no exclude does.
    A bare word without glob characters matches as a dotted component suffix, so ``q_proj``
    selects ``model.layers.0.self_attn.q_proj.weight``.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    predicate: Callable[[str], bool] | None = field(default=None, compare=False)

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

    def require(self, names: Iterable[str], what: str = "weights") -> list[str]:
        """Like filter, but an empty selection is an error that shows close names."""
        names = list(names)
        hits = self.filter(names)
        if not hits:
            pattern = ",".join(self.include) or "<all>"
            raise WeightsmithError(
                f"selector '{pattern}' matches none of the {len(names)} {what}; "
                f"close names: {close_names(pattern, names)}"
            )
        return hits


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern) or ("." + pattern + ".") in ("." + name + ".")
