"""One compress step, shared by ``weightsmith compress`` and a recipe's ``compress:`` step.

:meth:`CompressStep.build` checks everything that can be checked before a model loads (method, options,
format, calibration text, output directory); :meth:`CompressStep.execute` compresses a loaded model through
:func:`~weightsmith.compress.compress` and writes it through :func:`~weightsmith.compress.save_compressed`
(the staging writer: a complete directory or nothing).

Data-parallel calibration: under torchrun (``torchrun --nproc_per_node N -m weightsmith compress ...``) each
process calibrates on its contiguous share of the ``samples`` windows, the layer walker sums the statistics
over the processes block by block, every process compresses the block from those same statistics (rank 0's
weights are then broadcast), and only rank 0 writes the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_from_dict, registered
from ..distributed import World
from ..errors import WeightsmithError
from ..progress import log
from ..recipe import register_step
from ..staging import check_output
from ._core import (
    CompressConfig,
    CompressReport,
    calibration_batches,
    calibration_text,
    compress,
    target_layers,
)
from ._format import FORMATS, save_compressed

STEP_KEYS = ("calib", "samples", "seq_len", "format", "out")  # a recipe step's keys that are not options


@dataclass(frozen=True)
class CompressStep:
    """A checked compress job: the method's config, the output directory and format, the calibration."""

    config: CompressConfig
    out: Path
    format: str
    calib: str = "hamlet"
    samples: int = 32
    seq_len: int = 512
    force: bool = False

    @classmethod
    def build(
        cls,
        options: dict[str, Any],
        out: str | Path,
        format: str | None = None,
        calib: str = "hamlet",
        samples: int = 32,
        seq_len: int = 512,
        force: bool = False,
    ) -> CompressStep:
        """``options``: ``{"method": NAME, **fields}`` of a registered compress config. Refuses (naming the
        option) an unknown method or format, bad options, too few samples, an unreadable calibration text
        and an existing output without ``force``."""
        method = options.get("method")
        methods = registered("compress")
        if method not in methods:
            raise WeightsmithError(f"--method {method}: unknown; known: {', '.join(sorted(methods))}")
        if format is not None and format not in FORMATS:
            raise WeightsmithError(f"--format {format}: unknown; use one of {', '.join(FORMATS)}")
        try:
            config: CompressConfig = config_from_dict(options, "compress")
        except TypeError as exc:
            raise WeightsmithError(f"--opt: {exc}") from exc
        fmt = config.default_format if format is None else format
        config.check_format(fmt)
        if fmt == "compressed-tensors" and getattr(config, "integer_zero", True) is False:
            raise WeightsmithError(
                "--format compressed-tensors stores integer zero points; drop integer_zero=false "
                "or use --format weightsmith"
            )
        if config.needs_calibration():
            if samples < 1 or seq_len < 2:
                raise WeightsmithError(
                    f"--samples {samples} / --seq-len {seq_len}: need at least 1 window of 2 tokens"
                )
            calibration_text(calib)  # a missing or unreadable text is refused before the model loads
        check_output(out, force, directory=True)
        return cls(config, Path(out), fmt, calib, samples, seq_len, force)

    def execute(
        self, model: nn.Module, tokenizer: Any, device: torch.device, world: World = World()
    ) -> tuple[CompressReport, Path | None]:
        """Compress ``model`` in place and write it (rank 0 only); the report and the path written (None
        on the other ranks). Every rank returns only once the output is complete."""
        config = self.config
        if world.size > 1 and not config.data_parallel():
            method = type(config).method  # type: ignore[attr-defined]
            raise WeightsmithError(
                f"--method {method}: its calibration does not run data-parallel yet (it makes passes over "
                "the samples outside the layer walker); run it in one process, without torchrun"
            )
        layers = target_layers(model, config)
        if self.format != "dense":
            conv = [ly.name for ly in layers if ly.kind != "linear"]
            if conv:
                raise WeightsmithError(
                    f"--format {self.format} stores nn.Linear layers only; '{conv[0]}' is a GPT-2 Conv1D. "
                    "Use --format dense"
                )
        batches = None
        if config.needs_calibration():
            batches = calibration_batches(
                tokenizer, self.calib, self.samples, self.seq_len, rank=world.rank, world_size=world.size
            )
        share = f" (process {world.rank} of {world.size})" if world.size > 1 else ""
        log(f"compressing {len(layers)} layer(s) with {config}{share}")
        model, report = compress(model, config, calib=batches, device=device)
        path = (
            save_compressed(model, report, self.out, tokenizer, self.format, self.force)
            if world.main
            else None
        )
        world.barrier()
        return report, path

    def run(self, model: nn.Module, tokenizer: Any, device: torch.device, world: World = World()) -> str:
        """:meth:`execute`, then one line on what was done (a recipe step's summary)."""
        report, path = self.execute(model, tokenizer, device, world)
        return summary(report, path, self.format)


def summary(report: CompressReport, path: Path | None, fmt: str) -> str:
    """The line the CLI prints: layers, time, weight error, stored size, where it went."""
    errs = [r.rel_error for r in report.layers]
    line = (
        f"{len(errs)} layers {report.config.verb} in {report.seconds:.1f} s; relative weight error mean "
        f"{sum(errs) / max(len(errs), 1):.4f}, max {max(errs, default=0.0):.4f}; "
        f"{report.config.describe(report)}"
    )
    if path is None:
        return line
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return f"{line}; {size / 1e6:.1f} MB written to {path} ({fmt})"


@register_step("compress")
def recipe_step(data: dict[str, Any], folder: Path, force: bool) -> CompressStep:
    """A recipe's ``compress:`` step: ``method`` and the config's fields, plus ``calib``, ``samples``,
    ``seq_len``, ``format`` and ``out`` (required). Relative paths (``out``, a ``calib`` file) are taken
    from the recipe's folder (a packaged text such as ``hamlet`` stays a name)."""
    options = {k: v for k, v in data.items() if k not in STEP_KEYS}
    if "method" not in options:
        raise WeightsmithError(f"'method' is required; known: {', '.join(sorted(registered('compress')))}")
    out = data.get("out")
    if not isinstance(out, str) or not out:
        raise WeightsmithError("'out' (the output directory) is required and must be a path")
    calib = data.get("calib", "hamlet")
    if not isinstance(calib, str):
        raise WeightsmithError(f"'calib' must be a packaged text name or a text file (got {calib!r})")
    if (folder / calib).is_file() and not Path(calib).is_absolute():
        calib = str(folder / calib)
    counts = {k: data.get(k, d) for k, d in (("samples", 32), ("seq_len", 512))}
    for k, v in counts.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise WeightsmithError(f"'{k}' must be a whole number (got {v!r})")
    fmt = data.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise WeightsmithError(f"'format' must be one of {', '.join(FORMATS)} (got {fmt!r})")
    return CompressStep.build(options, folder / out, fmt, calib, counts["samples"], counts["seq_len"], force)
