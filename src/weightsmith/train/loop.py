"""Fine-tuning loop: adapters, full fine-tuning or head-only training on a :mod:`weightsmith.tasks` task.

``finetune(model="minilm", task="rotten_tomatoes", adapter=LoRA(rank=8), epochs=1, seed=0, out="run")``
returns a :class:`TrainResult`. AdamW, linear warm-up then linear/cosine/constant decay, gradient
accumulation, bf16 autocast on CUDA, evaluation after each epoch, and resumable checkpoints written
atomically to ``OUT/checkpoint`` (each epoch and every ``checkpoint_every`` optimizer steps). A
non-finite loss or gradient stops training with a clear error; the last good checkpoint is kept.

Output directory (``out``): ``adapter/`` (native or PEFT format) or ``model/`` (full fine-tuning),
``head.safetensors`` (classification head), ``run.json`` (what was trained, how, and the result).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as cfg
from .. import distributed
from ..errors import WeightsmithError
from ..progress import bar as progress_bar
from ..progress import log
from ..store import prepare_output
from ..tasks import Task, get_task
from .checkpoint import META_FILE, load_checkpoint, save_checkpoint
from .runs import FULL, HEAD, write_outputs

# Learning rates used when none is given for the built-in modes; adapter methods carry their own
# (``AdapterConfig.default_lr``), so a new method edits no shared file.
DEFAULT_LR: dict[str, float] = {FULL: 5e-5, HEAD: 5e-3}


@dataclass(frozen=True)
class TrainArgs:
    """Optimisation settings (everything except the model, task and adapter)."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float | None = None  # None: DEFAULT_LR for the method
    head_lr: float = 2e-3
    batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.06  # fraction of the optimizer steps
    schedule: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    checkpoint_every: int | None = None  # optimizer steps; a checkpoint is also written every epoch


@dataclass
class TrainResult:
    """What a run produced: the test metric, cost, and per-epoch validation history."""

    model: str
    task: str
    method: str
    metric_name: str
    metric: float  # on the test split (classification) or held-out text (LM)
    val_history: list[float]
    trainable_params: int
    total_params: int
    steps: int
    wall_time_s: float
    peak_memory_mb: float
    memory_kind: str  # "cuda" (max allocated) or "cpu-rss" (process peak RSS)
    train_time_s: float  # wall time minus the per-epoch evaluations
    lr: float
    seed: int
    loss_history: list[float] = field(default_factory=list)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingDiverged(WeightsmithError):
    """The loss or gradient became NaN/Inf; the last good checkpoint (if any) is kept."""


# --------------------------------------------------------------------------------------------- setup


def method_name(adapter: Any) -> str:
    if adapter is None or adapter == HEAD:
        return HEAD
    if adapter == FULL:
        return FULL
    return str(type(adapter).method)


def _attach(task: Task, model: nn.Module, adapter: Any, targets: Any, batch_size: int, device: Any) -> None:
    """Freeze/unfreeze and attach the adapter. The head is always trainable."""
    method = method_name(adapter)
    backbone = task.backbone(model)
    for p in model.parameters():
        p.requires_grad_(method == FULL)
    if method not in (FULL, HEAD):
        from .. import adapters

        calibration = None
        if adapter.needs_calibration():
            calibration = [
                {k: v.to(device) for k, v in b.items() if k != "labels"}
                for _, b in zip(range(4), task.batches(0, 0, batch_size), strict=False)
            ]
        if targets is None:
            targets = task.default_targets
        adapters.adapt(backbone, adapter, targets=targets, calibration=calibration)
    head = task.head(model)
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


def _schedule(args: TrainArgs, total: int) -> Any:
    warm = int(round(args.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if args.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        if args.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return max(0.0, 1.0 - frac)

    return factor


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu-rss"


# ---------------------------------------------------------------------------------------- checkpoint


def _resume_keys(model: nn.Module, base_keys: set[str]) -> list[str]:
    """State to checkpoint: trainable parameters plus every tensor the adapter added (masks, ...)."""
    trainable = set(_trainable(model))

    def new(k: str) -> bool:  # adapted layers keep the original module as ``<layer>.base``
        return k not in base_keys and k.replace(".base.", ".", 1) not in base_keys

    return [k for k in model.state_dict() if k in trainable or new(k)]


# ------------------------------------------------------------------------------------------ the loop


def _batches_from(task: Task, epoch: int, seed: int, bs: int, skip: int) -> Iterator[tuple[int, dict]]:
    for i, batch in enumerate(task.batches(epoch, seed, bs)):
        if i >= skip:
            yield i, batch


def finetune(
    model: str | None = None,
    task: str | Task = "rotten_tomatoes",
    adapter: Any = None,
    *,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    resume: bool = False,
    targets: Any = None,
    format: str = "native",
    max_examples: int | None = None,
    max_len: int | None = None,
    eval_examples: int | None = None,
    args: TrainArgs | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``adapter`` (a registered adapter config, ``"full"``, or ``None``/``"head"`` for the head
    alone) on ``task`` starting from ``model`` (default: the task's model). Keyword ``overrides`` are
    :class:`TrainArgs` fields (``epochs=2, lr=1e-3, seed=1, ...``)."""
    args = dataclasses.replace(args or TrainArgs(), **overrides)
    if format not in ("native", "peft"):
        raise WeightsmithError(f"--format must be 'native' or 'peft' (got '{format}')")
    if args.schedule not in ("linear", "cosine", "constant"):
        raise WeightsmithError(f"schedule must be linear, cosine or constant (got '{args.schedule}')")
    if args.batch_size < 1 or args.grad_accum < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise WeightsmithError("batch size, gradient accumulation and max steps must be at least 1")
    t = task if isinstance(task, Task) else get_task(task, model, max_examples, max_len, eval_examples)
    if isinstance(adapter, str) and adapter not in (FULL, HEAD):
        from .. import adapters  # noqa: F401  (registers the methods)

        adapter = cfg.config_from_dict({"method": adapter}, "adapter")
    method = method_name(adapter)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(method) or adapter.default_lr
    head_lr = lr if method == HEAD else args.head_lr  # head-only training: --lr is the head's rate
    world, device = distributed.init(args.device)

    out_dir = Path(out) if out is not None else None
    meta_run = {
        "model": t.model_spec,
        "task": t.name,
        "max_examples": t.max_examples,
        "max_len": t.max_len,
        "eval_examples": t.eval_examples,
        "adapter": _adapter_dict(adapter),
        "targets": targets if targets is None or isinstance(targets, (str, list, tuple)) else repr(targets),
        "format": format,
        "args": {**dataclasses.asdict(args), "lr": lr},
    }
    ckpt = out_dir / "checkpoint" if out_dir is not None else None
    if out_dir is not None:
        if resume:
            if ckpt is None or not (ckpt / META_FILE).is_file():
                raise WeightsmithError(f"--resume: {out_dir} has no checkpoint to resume from")
        elif world.main:
            prepare_output(out_dir, force)

    torch.manual_seed(args.seed)
    net, tok = t.build()
    t.prepare(tok)
    base_keys = set(net.state_dict())
    net.to(device)  # adapters are created on the device (SVD/LU inits and calibration run there)
    _attach(t, net, adapter, targets, args.batch_size, device)
    if out_dir is not None and not resume and world.main:  # the old output goes once the new run started
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    world.barrier()
    trained = distributed.wrap(net, world, device)  # all-reduces gradients across processes
    params = _trainable(net)
    head = t.head(net)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups = [
        {"params": [p for p in params.values() if id(p) not in head_ids], "lr": lr},
        {"params": [p for p in params.values() if id(p) in head_ids], "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    # Under data parallelism each process takes every world.size-th batch, so one optimizer step sees
    # world.size * batch_size * grad_accum examples; a trailing partial group of batches is dropped.
    per_epoch = math.ceil(t.batches_per_epoch(args.batch_size) // world.size / args.grad_accum)
    total = args.max_steps if args.max_steps is not None else args.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(args, total))
    keys = _resume_keys(net, base_keys)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "val": [],
        "loss": [],
        "elapsed": 0.0,
        "run": meta_run,
    }
    if resume and ckpt is not None:
        saved = json.loads((ckpt / META_FILE).read_text())
        if saved.get("run") != json.loads(json.dumps(meta_run)):
            raise WeightsmithError(
                f"--resume: {out_dir} was started with other settings; "
                "use the same options as the first run, or --force to start over"
            )
        state = load_checkpoint(ckpt, net, keys, opt, sched)
        log(f"resuming {out_dir} at step {state['step']} (epoch {state['epoch'] + 1})")

    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in net.parameters())
    use_bf16 = args.bf16 and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter() - float(state["elapsed"])
    step, epoch = int(state["step"]), int(state["epoch"])
    net.train()

    def checkpoint(next_epoch: int, next_batch: int) -> None:
        if out_dir is None or not world.main:
            return
        state.update(step=step, epoch=next_epoch, batch=next_batch, elapsed=time.perf_counter() - start)
        save_checkpoint(out_dir, net, keys, opt, sched, state)

    with progress_bar() as bar:
        job = bar.add_task(f"{method} · {t.name}", total=total, completed=step, status="")
        while step < total and epoch < epochs:
            n_batches = t.batches_per_epoch(args.batch_size) // world.size * world.size
            micro, running = 0, 0.0
            for i, batch in _batches_from(t, epoch, args.seed, args.batch_size, int(state["batch"])):
                if i >= n_batches:
                    break
                if i % world.size != world.rank:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = t.loss(trained, batch)
                reg = _regularization(net, method)
                total_loss = (loss + reg) / args.grad_accum
                if not torch.isfinite(total_loss):
                    _diverged(out_dir, step, epoch, f"loss is {float(loss)}")
                total_loss.backward()
                running += float(loss.detach())
                micro += 1
                if micro % args.grad_accum and i + world.size < n_batches:
                    continue
                norm = nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm or float("inf"))
                if not torch.isfinite(norm):
                    _diverged(out_dir, step, epoch, f"gradient norm is {float(norm)}")
                opt.step()
                sched.step()
                _adapter_step(net, method, step, total)
                opt.zero_grad(set_to_none=True)
                step += 1
                state["loss"].append(round(running / micro, 6))
                bar.update(job, completed=step, status=f"loss {running / micro:.4f}")
                micro, running = 0, 0.0
                if step >= total:
                    break
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    checkpoint(epoch, i + 1)
            t_eval = time.perf_counter()
            val = t.evaluate(net, tok, "val", device)
            state["eval_time"] = float(state.get("eval_time", 0.0)) + time.perf_counter() - t_eval
            state["val"].append(val)
            state["batch"] = 0
            log(f"epoch {epoch + 1}/{epochs}: val {t.metric_name} {val:.4f}")
            epoch += 1
            checkpoint(epoch, 0)

    wall = time.perf_counter() - start
    metric = t.evaluate(net, tok, "test", device) if t.kind == "classification" else state["val"][-1]
    peak, kind = _peak_memory(device)
    result = TrainResult(
        t.model_spec,
        t.name,
        method,
        t.metric_name,
        float(metric),
        list(state["val"]),
        n_trainable,
        n_total,
        step,
        wall,
        peak,
        kind,
        wall - float(state.get("eval_time", 0.0)),
        lr,
        args.seed,
        list(state["loss"]),
        str(out_dir) if out_dir is not None else None,
    )
    if out_dir is not None and world.main:
        write_outputs(out_dir, t, net, tok, method, format, {**meta_run, "result": result.to_dict()})
    world.barrier()
    return result


def _regularization(model: nn.Module, method: str) -> torch.Tensor | float:
    if method in (FULL, HEAD):
        return 0.0
    from .. import adapters

    return adapters.adapter_regularization(model)


def _adapter_step(model: nn.Module, method: str, step: int, total: int) -> None:
    if method not in (FULL, HEAD):
        from .. import adapters

        adapters.adapter_step(model, step, total)


def _diverged(out_dir: Path | None, step: int, epoch: int, what: str) -> None:
    ckpt = out_dir / "checkpoint" if out_dir is not None else None
    if ckpt is not None and (ckpt / META_FILE).is_file():
        saved = json.loads((ckpt / META_FILE).read_text())["step"]
        kept = f"the last good checkpoint ({ckpt}, step {saved}) is kept: lower --lr and rerun with --resume"
    else:
        kept = "no checkpoint had been written yet; lower --lr (or set --checkpoint-every) and start again"
    raise TrainingDiverged(f"training stopped at step {step + 1} (epoch {epoch + 1}): {what}; {kept}")


def _adapter_dict(adapter: Any) -> dict[str, Any]:
    name = method_name(adapter)
    return {"method": name} if name in (FULL, HEAD) else cfg.to_dict(adapter)
