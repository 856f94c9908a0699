"""``weightsmith train``: full-weight training with a memory-lean optimizer (GaLore family, APOLLO, AdamW).

A separate command rather than ``adapt --method full --optimizer ...``: the optimizer options (rank, gap,
projector, scale) mean nothing to the adapter methods and the adapter options (rank, alpha, targets of
adapters) mean something else here, so one command with both would have to reject half of its options
depending on the other half. The run itself is the same: ``finetune(adapter="full", optimizer=factory)``,
with the same checkpoints, ``--resume`` and progress as ``adapt``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .. import config as cfg
from ..config import parse_opts
from ..errors import WeightsmithError
from ..tasks import TASKS
from . import _options as shared
from ._app import app
from ._options import train_args
from .adapt import print_result


def _optimizers() -> dict[str, type]:
    from .. import optim  # noqa: F401  (registers the optimizer configs)
    from ..optim import configs  # noqa: F401

    return cfg.registered("optimizer")


def build_optimizer(name: str, options: dict[str, Any]) -> Any:
    """The registered optimizer config ``name`` with the options given on the command line."""
    table = _optimizers()
    if name not in table:
        raise WeightsmithError(f"unknown optimizer '{name}'; known: {', '.join(sorted(table))}")
    fields = {f.name for f in dataclasses.fields(table[name])}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in fields:
            flag = "--" + key.replace("_", "-")
            raise WeightsmithError(
                f"--optimizer {name} takes no {flag} (its options: {', '.join(sorted(fields))})"
            )
    try:
        return cfg.config_from_dict({"method": name, **given}, "optimizer")
    except TypeError as exc:
        raise WeightsmithError(f"--optimizer {name}: {exc}") from exc


def _parse_opts(opts: list[str]) -> dict[str, Any]:
    parsed = parse_opts(opts, "proj_type=left")
    return {k: tuple(v) if isinstance(v, list) else v for k, (_, v) in parsed.items()}


def _list() -> None:
    table = Table(title="optimizers (weightsmith train --optimizer NAME)")
    table.add_column("optimizer")
    table.add_column("options (defaults)")
    table.add_column("what")
    for name, cls in sorted(_optimizers().items()):
        own_first = sorted(dataclasses.fields(cls), key=lambda f: f.kw_only is True)  # shared options last
        fields = ", ".join(f"{f.name}={f.default!r}" for f in own_first)
        doc = (cls.__doc__ or "").strip().splitlines()
        table.add_row(name, fields, doc[0] if doc else "")
    Console().print(table)


@app.command("train")
def train_cmd(
    model: str = typer.Argument(
        None, metavar="MODEL", help="model: packaged asset (minilm, smollm2) or a local HF directory"
    ),
    optimizer: str = typer.Option(
        "galore", "--optimizer", help="galore, q-galore, apollo, apollo-mini, adamw"
    ),
    rank: int = typer.Option(None, "--rank", "-r", help="projection rank"),
    update_proj_gap: int = typer.Option(None, "--update-proj-gap", help="steps between subspace refreshes"),
    projector: str = typer.Option(None, "--projector", help="svd, rsvd (default), dct, random or sparse"),
    scale: float = typer.Option(None, "--scale", help="update scale (GaLore's alpha, APOLLO's alpha)"),
    opt: list[str] = typer.Option([], "--opt", help="other optimizer option key=value (repeatable)"),
    targets: str = typer.Option(
        None, "--targets", help="weights to project: globs or re:regex, comma separated"
    ),
    task: str = typer.Option(None, "--task", "-t", help=f"task: {', '.join(TASKS)}"),
    epochs: int = typer.Option(1, "--epochs"),
    max_steps: shared.MaxSteps = None,
    lr: float = typer.Option(None, "--lr", help="learning rate (default: full fine-tuning's)"),
    head_lr: shared.HeadLR = 2e-3,
    batch_size: shared.BatchSize = 32,
    grad_accum: shared.GradAccum = 1,
    schedule: shared.Schedule = "linear",
    warmup: shared.Warmup = 0.06,
    weight_decay: float = typer.Option(None, "--weight-decay"),
    max_examples: int = typer.Option(None, "--max-examples"),
    max_len: int = typer.Option(None, "--max-len"),
    eval_examples: int = typer.Option(None, "--eval-examples"),
    checkpoint_every: shared.CheckpointEvery = None,
    seed: shared.Seed = 0,
    device: shared.TrainDevice = "auto",
    out: shared.RunDir = None,
    force: shared.ReplaceRun = False,
    resume: shared.Resume = False,
    per_layer: bool = typer.Option(
        False,
        "--layerwise",
        help="update each weight inside backward (no full set of gradients; no clipping)",
    ),
    parallel: str = typer.Option(
        "ddp", "--parallel", help="under torchrun: ddp (a copy per process) or fsdp2 (sharded, fully_shard)"
    ),
    list_optimizers: bool = typer.Option(False, "--list", help="list the optimizers and exit"),
) -> None:
    """Train every weight of MODEL on a task with a memory-lean optimizer; writes model/, run.json to --out.

    Example: weightsmith train minilm --optimizer galore --rank 32 --task rotten_tomatoes --out runs/galore

    On several GPUs: torchrun --nproc_per_node 2 -m weightsmith train ... --parallel fsdp2
    """
    if list_optimizers:
        _list()
        return
    missing = [n for n, v in (("MODEL", model), ("--task", task), ("--out", out)) if v is None]
    if missing:
        raise WeightsmithError(f"weightsmith train needs {', '.join(missing)} (see weightsmith train --help)")
    options = {
        **_parse_opts(opt),
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "projector": projector,
        "scale": scale,
        "weight_decay": weight_decay,
        "seed": seed if optimizer != "adamw" else None,
        "layerwise": True if per_layer else None,
        "targets": tuple(p.strip() for p in targets.split(",") if p.strip()) if targets else None,
    }
    config = build_optimizer(optimizer, options)
    from ..train import finetune

    # weight decay belongs to the optimizer here (options above), not to the loop's default AdamW
    args = train_args({k: v for k, v in locals().items() if k != "weight_decay"})
    result = finetune(
        model,
        task,
        "full",
        out=out,
        force=force,
        resume=resume,
        max_examples=max_examples,
        max_len=max_len,
        eval_examples=eval_examples,
        optimizer=config.create,
        args=args,
    )
    print_result(
        f"{optimizer} on {result.task} ({result.model})", result, ("optimizer", str(cfg.to_dict(config))), out
    )
