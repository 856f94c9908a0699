"""``weightsmith adapt``: train an adapter (or fully fine-tune) on a packaged task."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from .. import config as cfg
from ..errors import WeightsmithError
from ..tasks import TASKS
from ..train import FULL, HEAD, TrainArgs, finetune
from ._app import app

BUILTIN = {
    FULL: "full fine-tuning: every weight trainable",
    HEAD: "frozen backbone, train the task head only",
}


def _parse_opts(opts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in opts:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WeightsmithError(f"--opt '{item}': expected key=value (e.g. --opt dropout=0.1)")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def _methods() -> dict[str, type]:
    from .. import adapters  # noqa: F401  (imports every method file, which registers its config)

    return cfg.registered("adapter")


def build_adapter(method: str, rank: int | None, alpha: float | None, opts: list[str]) -> Any:
    """The adapter config for ``--method`` plus options (or "full" / "head")."""
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
    if rank is not None:
        extra["rank"] = rank
    if alpha is not None:
        extra["alpha"] = alpha
    try:
        return cfg.config_from_dict({"method": method, **extra}, "adapter")
    except TypeError as exc:  # a value of the wrong type reaching the dataclass
        raise WeightsmithError(f"--method {method}: {exc}") from exc


def _list_methods() -> None:
    table = Table(title="adapter methods (weightsmith adapt --method NAME)")
    table.add_column("method")
    table.add_column("options (defaults)")
    table.add_column("what")
    for name, about in BUILTIN.items():
        table.add_row(name, "", about)
    for name, cls in sorted(_methods().items()):
        fields = ", ".join(
            f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
        )
        doc = (cls.__doc__ or "").strip().splitlines()
        table.add_row(name, fields, doc[0] if doc else "")
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
    max_steps: int = typer.Option(None, "--max-steps", help="optimizer steps (overrides --epochs)"),
    lr: float = typer.Option(None, "--lr", help="learning rate (default: the method's usual one)"),
    head_lr: float = typer.Option(2e-3, "--head-lr", help="learning rate of the classification head"),
    batch_size: int = typer.Option(32, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    schedule: str = typer.Option("linear", "--schedule", help="linear, cosine or constant (after warm-up)"),
    warmup: float = typer.Option(0.06, "--warmup", help="warm-up fraction of the steps"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_examples: int = typer.Option(None, "--max-examples", help="use at most this many training examples"),
    max_len: int = typer.Option(None, "--max-len", help="max tokens per example (default 64; LM blocks 128)"),
    eval_examples: int = typer.Option(None, "--eval-examples", help="evaluate on at most this many examples"),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="also checkpoint every N steps"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    out: Path = typer.Option(None, "--out", "-o", help="output directory"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
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
    args = TrainArgs(
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        head_lr=head_lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup=warmup,
        schedule=schedule,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        checkpoint_every=checkpoint_every,
    )
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
    table = Table(title=f"{result.method} on {result.task} ({result.model})")
    table.add_column("result")
    table.add_column("value", justify="right")
    rows = [
        (
            f"test {result.metric_name}" if result.metric_name == "accuracy" else "val perplexity",
            f"{result.metric:.4f}",
        ),
        (
            "trainable parameters",
            f"{result.trainable_params:,} ({100 * result.trainable_params / result.total_params:.3f} %)",
        ),
        ("optimizer steps", str(result.steps)),
        ("wall time", f"{result.wall_time_s:.1f} s"),
        (f"peak memory ({result.memory_kind})", f"{result.peak_memory_mb:.0f} MiB"),
        ("output", str(out)),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
