"""``weightsmith adapt``: train an adapter (or fully fine-tune) on a packaged task."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import config as cfg
from ..errors import WeightsmithError
from ..tasks import TASKS
from ..train import FULL, HEAD, TrainResult, finetune
from . import _options as shared
from ._app import app
from ._options import train_args

BUILTIN = {
    FULL: "full fine-tuning: every weight trainable",
    HEAD: "frozen backbone, train the task head only",
    "lrc": "WeLore LRC fine-tuning: only the low-rank factors of a --format weightsmith compress output",
}


def _parse_opts(opts: list[str]) -> dict[str, tuple[str, Any]]:
    return cfg.parse_opts(opts, "dropout=0.1")


def _methods() -> dict[str, type]:
    from .. import adapters  # noqa: F401  (imports every method file, which registers its config)

    return cfg.registered("adapter")


def _options(cls: type) -> str:
    """Every option of a method with its default: ``rank=8, alpha=16.0, ...``."""
    return ", ".join(
        f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
        for f in dataclasses.fields(cls)
    )


def build_adapter(method: str, rank: int | None, alpha: float | None, opts: list[str]) -> Any:
    """The adapter config for ``--method`` plus options (or "full" / "head"), every value checked against
    the type of the config field it sets."""
    extra = _parse_opts(opts)
    if method in BUILTIN:
        if rank is not None or alpha is not None or extra:
            raise WeightsmithError(f"--method {method} takes no --rank/--alpha/--opt")
        return method
    methods = _methods()
    if method not in methods:
        names = sorted([*methods, *BUILTIN])
        raise WeightsmithError(
            f"unknown method '{method}'; known: {', '.join(names)} (see weightsmith adapt --list)"
        )
    cls = methods[method]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    given = {k: (f"--opt {k}={raw}", v) for k, (raw, v) in extra.items()}
    for flag, key, value in (("--rank", "rank", rank), ("--alpha", "alpha", alpha)):
        if value is not None:
            given[key] = (f"{flag} {value}", value)
    values: dict[str, Any] = {}
    for key, (where, value) in given.items():
        if key not in fields:
            options = _options(cls)
            raise WeightsmithError(f"{where}: method '{method}' has no option '{key}'; options: {options}")
        got = cfg.coerce(value, hints[key])
        if got is cfg.NOT_VALID:
            raise WeightsmithError(
                f"{where}: option '{key}' of method '{method}' takes {cfg.type_name(hints[key])}; "
                f"options: {_options(cls)}"
            )
        if (key == "rank" or key.endswith("_rank")) and isinstance(got, int) and got < 1:
            raise WeightsmithError(f"{where}: the rank must be at least 1")
        if key == "dropout" and isinstance(got, float) and not 0 <= got < 1:
            raise WeightsmithError(f"{where}: dropout must lie in [0, 1)")
        values[key] = got
    try:
        return cfg.config_from_dict({"method": method, **values}, "adapter")
    except (TypeError, ValueError) as exc:  # the method's own checks (__post_init__)
        raise WeightsmithError(f"--method {method}: {exc}; options: {_options(cls)}") from exc


def _first_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(f"{cls.__name__}("):  # dataclass' generated signature: no description
        return ""
    return doc.splitlines()[0].replace("``", "")


def _list_methods() -> None:
    rows = [(name, "", about) for name, about in BUILTIN.items()]
    rows += [(name, _options(cls), _first_line(cls)) for name, cls in sorted(_methods().items())]
    title = "adapter methods (weightsmith adapt --method NAME)"
    if not sys.stdout.isatty():  # plain text for pipes and files: no box drawing, no markup
        lines = [title, ""]
        for name, options, what in rows:
            lines.append(f"{name}: {what}" if what else name)
            if options:
                lines.extend(textwrap.wrap(options, 100, initial_indent="    ", subsequent_indent="    "))
        typer.echo("\n".join(lines))
        return
    table = Table(title=title)
    table.add_column("method")
    table.add_column("options (defaults)")
    table.add_column("what")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: no markup parsing of user-facing strings
    Console().print(table)


@app.command("adapt")
def adapt_cmd(
    model: str = typer.Argument(None, help="model: packaged asset (minilm, smollm2) or a local HF directory"),
    method: str = typer.Option(None, "--method", "-m", help="adapter method, 'full' or 'head'"),
    rank: int = typer.Option(None, "--rank", "-r", help="adapter rank (methods with a rank)"),
    alpha: float = typer.Option(None, "--alpha", help="adapter scaling alpha (methods with an alpha)"),
    opt: list[str] = typer.Option([], "--opt", help="method option key=value (repeatable)"),
    targets: str = typer.Option(
        None, "--targets", help="weights to adapt: globs or re:regex, comma separated"
    ),
    task: str = typer.Option(None, "--task", "-t", help=f"task: {', '.join(TASKS)}"),
    epochs: int = typer.Option(1, "--epochs", help="training epochs"),
    max_steps: shared.MaxSteps = None,
    lr: float = typer.Option(None, "--lr", help="learning rate (default: the method's usual one)"),
    head_lr: shared.HeadLR = 2e-3,
    batch_size: shared.BatchSize = 32,
    grad_accum: shared.GradAccum = 1,
    schedule: shared.Schedule = "linear",
    warmup: shared.Warmup = 0.06,
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_examples: int = typer.Option(None, "--max-examples", help="use at most this many training examples"),
    max_len: int = typer.Option(None, "--max-len", help="max tokens per example (default 64; LM blocks 128)"),
    eval_examples: int = typer.Option(
        None, "--eval-examples", help="evaluate on at most this many examples (LM tasks: windows)"
    ),
    checkpoint_every: shared.CheckpointEvery = None,
    seed: shared.Seed = 0,
    device: shared.TrainDevice = "auto",
    parallel: str = typer.Option("ddp", "--parallel", help="under torchrun: ddp or fsdp2 (sharded)"),
    cuda_graphs: bool = typer.Option(
        False,
        "--cuda-graphs",
        help="replay each batch's forward and backward as one CUDA graph (GPU, LM tasks)",
    ),
    out: shared.RunDir = None,
    force: shared.ReplaceRun = False,
    resume: shared.Resume = False,
    fmt: str = typer.Option("native", "--format", help="adapter format: native or peft (LoRA family)"),
    list_methods: bool = typer.Option(False, "--list", help="list the adapter methods and exit"),
) -> None:
    """Train an adapter on MODEL for a task; writes the adapter, head and run.json to --out.

    Example: weightsmith adapt minilm --method lora --rank 8 --task rotten_tomatoes --epochs 1 --out runs/lora
    """
    if list_methods:
        _list_methods()
        return
    missing = [
        n for n, v in (("MODEL", model), ("--method", method), ("--task", task), ("--out", out)) if v is None
    ]
    if missing:
        raise WeightsmithError(f"weightsmith adapt needs {', '.join(missing)} (see weightsmith adapt --help)")
    if resume and force:
        raise WeightsmithError("--resume and --force exclude each other")
    adapter = build_adapter(method, rank, alpha, opt)
    args = train_args(locals())
    if method == "lrc":
        from ..compress.welore import finetune_lrc

        if targets is not None or fmt != "native":
            raise WeightsmithError("--method lrc takes no --targets/--format: it trains every LRC of MODEL")
        lrc = finetune_lrc(
            model, task, out, force=force, resume=resume, max_examples=max_examples, max_len=max_len,
            eval_examples=eval_examples, args=args,
        )  # fmt: skip
        n = f"{lrc.trainable_params:,} ({100 * lrc.trainable_params / lrc.total_params:.3f} %)"
        print_result(f"LRC fine-tuning on {lrc.task} ({model})", lrc, ("trainable LRC parameters", n), out)
        return
    result = finetune(
        model,
        task,
        adapter,
        out=out,
        force=force,
        resume=resume,
        targets=targets,
        format=fmt,
        max_examples=max_examples,
        max_len=max_len,
        eval_examples=eval_examples,
        args=args,
    )
    trainable = f"{result.trainable_params:,} ({100 * result.trainable_params / result.total_params:.3f} %)"
    print_result(
        f"{result.method} on {result.task} ({result.model})", result, ("trainable parameters", trainable), out
    )


def print_result(title: str, result: TrainResult, detail: tuple[str, str], out: Path | None) -> None:
    """The table that ``adapt`` and ``train`` print at the end of a run: the metric, ``detail`` (what was
    trained), steps, time, peak memory and the output directory."""
    table = Table(title=title)
    table.add_column("result")
    table.add_column("value", justify="right")
    metric = f"test {result.metric_name}" if result.metric_name == "accuracy" else "val perplexity"
    for row in (
        (metric, f"{result.metric:.4f}"),
        detail,
        ("optimizer steps", str(result.steps)),
        ("wall time", f"{result.wall_time_s:.1f} s"),
        (f"peak memory ({result.memory_kind})", f"{result.peak_memory_mb:.0f} MiB"),
        ("output", str(out)),
    ):
        table.add_row(*row)
    Console().print(table)
