"""User-facing errors: every message names the file, tensor or option at fault and what to do."""

from __future__ import annotations


class WeightsmithError(Exception):
    """An error caused by the user's input. The CLI prints it (no traceback) and exits with code 2."""


class ShapeMismatchError(WeightsmithError):
    """Two tensors that must agree in shape do not."""

    def __init__(self, name: str, expected: tuple[int, ...], got: tuple[int, ...], where: str = "") -> None:
        suffix = f" ({where})" if where else ""
        super().__init__(f"tensor '{name}': expected shape {tuple(expected)}, got {tuple(got)}{suffix}")


def close_names(name: str, candidates: list[str], n: int = 5) -> str:
    """A short 'did you mean' hint listing the closest names."""
    import difflib

    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
    if not hits:
        hits = candidates[:n]
    return ", ".join(hits)
