"""Progress bars for long work (rich, on stderr). Silenced with WEIGHTSMITH_PROGRESS=0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("WEIGHTSMITH_PROGRESS", "1") != "0"


def bar() -> Progress:
    """The house progress bar (description, bar, n/total, elapsed, a free ``status`` field) on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
        disable=not enabled(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield from `items` while drawing a progress bar on stderr."""
    if not enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.update(task, advance=1)


def log(message: str, markup: bool = True) -> None:
    """A status line on stderr (kept off stdout so JSON output stays clean). ``markup=False`` prints it as
    plain text, so a path or value holding ``[...]`` is shown as it is, never read as rich markup."""
    if enabled():
        console.print(message, markup=markup, highlight=markup)
