"""Up-front checks of option values shared by the commands: run them before any model is loaded.

Each check raises ``WeightsmithError`` with a message naming the option and the value, so a bad command
line fails in milliseconds with exit code 2 instead of after minutes of work (or with a traceback).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import WeightsmithError

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"

# The options that ``adapt`` and ``train`` share (the training loop's, see ``train_args``, and the run
# folder's), declared once; typer takes the default from the parameter: ``batch_size: BatchSize = 32``.
MaxSteps = Annotated[int | None, typer.Option("--max-steps", help="optimizer steps (overrides --epochs)")]
HeadLR = Annotated[float, typer.Option("--head-lr", help="learning rate of the classification head")]
BatchSize = Annotated[int, typer.Option("--batch-size")]
GradAccum = Annotated[int, typer.Option("--grad-accum", help="micro-batches per optimizer step")]
Schedule = Annotated[str, typer.Option("--schedule", help="linear, cosine or constant (after warm-up)")]
Warmup = Annotated[float, typer.Option("--warmup", help="warm-up fraction of the steps")]
CheckpointEvery = Annotated[
    int | None, typer.Option("--checkpoint-every", help="also checkpoint every N steps")
]
Seed = Annotated[int, typer.Option("--seed")]
TrainDevice = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
RunDir = Annotated[Path | None, typer.Option("--out", "-o", help="output directory")]
ReplaceRun = Annotated[
    bool, typer.Option("--force", help="replace an existing --out (kept until the new run is complete)")
]
Resume = Annotated[bool, typer.Option("--resume", help="continue the unfinished run in --out")]


def device(value: str, option: str = "--device") -> str | None:
    """``auto`` -> None; ``cpu``, ``cuda``, ``cuda:N`` checked against this machine."""
    import torch

    if value == "auto":
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise WeightsmithError(f"{option} {value}: use {DEVICE_HELP}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsmithError(
                f"{option} {value}: CUDA is not available on this machine; use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeightsmithError(
                f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    return value


def positive(value: float, option: str) -> None:
    """A finite number > 0."""
    if not math.isfinite(value) or value <= 0:
        raise WeightsmithError(f"{option} {value}: must be a positive number")


def finite(value: float, option: str) -> None:
    if not math.isfinite(value):
        raise WeightsmithError(f"{option} {value}: must be a finite number")


def in_range(value: float, option: str, low: float, high: float) -> None:
    """``low <= value <= high`` (NaN is refused)."""
    if not (low <= value <= high):
        raise WeightsmithError(f"{option} {value}: must be between {low} and {high}")


def choice(value: str, option: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise WeightsmithError(f"{option} {value!r}: use one of {', '.join(choices)}")


def input_file(value: str | os.PathLike[str], option: str, suffix: str | None = None) -> Path:
    """An existing regular file (with ``suffix``, if given)."""
    p = Path(value)
    if not p.exists():
        raise WeightsmithError(f"{option} {value}: no such file")
    if not p.is_file():
        raise WeightsmithError(f"{option} {value}: not a regular file")
    if suffix is not None and p.suffix != suffix:
        raise WeightsmithError(f"{option} {value}: expected a {suffix} file")
    return p


def outputs(force: bool, *paths: tuple[str, Path | None], directory: bool = False) -> None:
    """Check ``(option, path)`` outputs up front: not already there without ``force``, writable, distinct
    (``-`` means stdout and is skipped). Call after the inputs are checked: it creates missing parents."""
    from ..staging import check_output, final_path

    seen: dict[Path, str] = {}
    for option, path in paths:
        if path is None or str(path) == "-":
            continue
        if str(path) == "":
            raise WeightsmithError(f"{option}: empty output path")
        final = final_path(path)
        if final in seen and final != Path(os.devnull):
            raise WeightsmithError(f"{option} {path} and {seen[final]} name the same output; give two paths")
        seen[final] = f"{option} {path}"
    for option, path in paths:
        if path is None or str(path) == "-":
            continue
        try:
            check_output(path, force, directory)
        except WeightsmithError as exc:
            raise WeightsmithError(f"{option}: {exc}") from exc


def train_args(options: Mapping[str, Any]) -> Any:
    """``TrainArgs`` from a command's options (``locals()`` of ``adapt`` or ``train``): each option named
    like a field of ``TrainArgs`` sets it, so a new training setting is one typer option, not three lines."""
    import dataclasses

    from ..train import TrainArgs

    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in options.items() if k in names})
