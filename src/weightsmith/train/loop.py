"""Fine-tuning loop: adapters, full fine-tuning or head-only training on a :mod:`weightsmith.tasks` task.

``finetune(model="minilm", task="rotten_tomatoes", adapter=LoRA(rank=8), epochs=1, seed=0, out="run")``
returns a :class:`TrainResult`. Linear warm-up then linear/cosine/constant decay (``LambdaLR``), gradient
accumulation, bf16 autocast on CUDA, evaluation after each epoch, and resumable checkpoints (each epoch and
every ``checkpoint_every`` optimizer steps). On the CPU a language-modelling batch runs in micro-batches of
``CPU_MICRO_TOKENS`` tokens (``micro_batch_tokens``; gradients summed, the same step), which bounds the
memory held for backward. Every option is checked before the model is loaded, and the
model's weights are checked for NaN/Inf (naming the tensor and file) before training starts.

**The optimizer is injected.** ``optimizer`` is an :data:`~weightsmith.train.optimizer.OptimizerFactory`,
``factory(named_trainable_parameters, lr) -> torch.optim.Optimizer``; any ``torch.optim.Optimizer`` works
(the default, :func:`~weightsmith.train.optimizer.adamw_factory`, is AdamW with ``weight_decay``). The loop
gives the classification head ``head_lr`` (head parameters sharing a group with others move to a copy of
that group), schedules every group's ``lr``, clips the global gradient norm (``max_grad_norm``), calls
``step()`` and checkpoints ``state_dict()``; ``--resume`` restores it bit for bit (weights-only loading, so
the state must be tensors and plain Python types). An optimizer implementing
:class:`~weightsmith.train.optimizer.UpdatesInBackward` (``step_in_backward(enabled)``) updates parameters
inside backward (per-layer updates): the loop then announces, before each backward pass, whether it ends an
optimizer step, and does not clip; its ``step()`` is still called after the pass (it finds no gradient left),
which keeps the scheduler's order check satisfied. Without that method nothing changes.

**Under torchrun** the model is spread with DDP (``parallel="ddp"``, the default) or sharded with FSDP2
(``parallel="fsdp2"``: ``fully_shard`` on each repeated block and on the whole model; a clear error outside a
process group). Checkpoints hold full tensors either way (FSDP2 shards are gathered on save and cut again on
load), so a run resumes bit-exactly and a checkpoint does not depend on the number of processes.

**Where the run is written** (``out``; :class:`~weightsmith.train.checkpoint.RunDir`): a new ``out`` is
created at the first checkpoint (a run killed earlier leaves nothing behind) and holds ``out/checkpoint``
until the run completes; ``--resume`` continues from it. With ``force`` over an existing ``out`` the run
works in a hidden staging directory and the old output stays untouched until the new one is complete,
then they are swapped; such a run, interrupted or diverged, leaves the old output as it was and cannot be
resumed. The finished output is always swapped in whole: ``adapter/`` (native or PEFT format) or
``model/`` (full fine-tuning), ``head.safetensors`` (classification head), ``run.json`` (what was
trained, how, and the result). Ctrl-C removes every staging directory, and so does SIGTERM once
``weightsmith.staging.install_signal_handlers()`` has run (the CLI runs it); a later run removes the
staging of a killed one.

A non-finite loss, gradient norm or trained weight stops training before it reaches a checkpoint; the last
good checkpoint is kept and the message says where.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .. import config as cfg
from .. import distributed
from ..adapters.lora_group import learn_siblings
from ..errors import WeightsmithError
from ..progress import bar as progress_bar
from ..progress import log
from ..tasks import Task, get_task
from .checkpoint import CHECKPOINT, RunDir, load_checkpoint, read_meta, snapshot
from .cuda_graph import TrainerGraph, check_trainer_option
from .optimizer import OptimizerFactory, adamw_factory, describe, separate_head, updates_in_backward
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
    # Forward/backward a batch in micro-batches of at most this many tokens (gradients summed, so the
    # step is the same up to float rounding; dropout draws other masks). None: CPU_MICRO_TOKENS for
    # language modelling on the CPU (bounds activation and logit memory), otherwise the whole batch.
    micro_batch_tokens: int | None = None
    # How a multi-process (torchrun) run spreads the model: "ddp" (a copy in every process, gradients
    # all-reduced) or "fsdp2" (parameters, gradients and element-wise optimizer state sharded by rows).
    parallel: str = "ddp"
    # Replay each batch's forward and backward as one CUDA graph (train/cuda_graph.py; CUDA only).
    cuda_graphs: bool = False


# Default micro-batch on the CPU: a causal LM keeps ~50 kB of activations per token per layer for the
# backward pass plus the fp32 logits (vocab * 4 bytes per token), so LoRA on SmolLM2-135M at batch
# 32 x 128 tokens peaked at 10.4 GB RSS; with 512 tokens a pass, 2.3 GB (benchmarks/bench_memory.py).
CPU_MICRO_TOKENS = 512


SCHEDULES = ("linear", "cosine", "constant")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_args(args: TrainArgs) -> None:
    """Refuse a bad option up front (before any model is loaded), naming the command-line option."""

    def need(ok: bool, option: str, what: str, value: Any) -> None:
        if not ok:
            raise WeightsmithError(f"{option} must be {what} (got {value!r})")

    for name in ("epochs", "batch_size", "grad_accum"):
        v = getattr(args, name)
        need(_is_int(v) and v >= 1, f"--{name.replace('_', '-')}", "an integer of at least 1", v)
    for name in ("max_steps", "checkpoint_every", "micro_batch_tokens"):
        v = getattr(args, name)
        ok = v is None or (_is_int(v) and v >= 1)
        need(ok, f"--{name.replace('_', '-')}", "an integer of at least 1", v)
    need(args.lr is None or (_is_real(args.lr) and args.lr > 0), "--lr", "a positive number", args.lr)
    need(_is_real(args.head_lr) and args.head_lr > 0, "--head-lr", "a positive number", args.head_lr)
    need(_is_real(args.warmup) and 0 <= args.warmup < 1, "--warmup", "a fraction in [0, 1)", args.warmup)
    wd = args.weight_decay
    need(_is_real(wd) and wd >= 0, "--weight-decay", "at least 0", wd)
    need(
        args.max_grad_norm is None or (_is_real(args.max_grad_norm) and args.max_grad_norm > 0),
        "max_grad_norm",
        "a positive number or None",
        args.max_grad_norm,
    )
    need(_is_int(args.seed) and args.seed >= 0, "--seed", "an integer of at least 0", args.seed)
    need(args.schedule in SCHEDULES, "--schedule", " or ".join(SCHEDULES), args.schedule)
    need(
        args.parallel in distributed.PARALLEL, "--parallel", " or ".join(distributed.PARALLEL), args.parallel
    )
    need(isinstance(args.bf16, bool), "bf16", "True or False", args.bf16)
    check_device(args.device)
    check_trainer_option(args)


def check_device(device: Any) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N an existing GPU)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return
    usage = "use auto, cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise WeightsmithError(f"--device {device!r} is not a device; {usage}") from None
    if dev.type not in ("cpu", "cuda"):
        raise WeightsmithError(f"--device {device}: weightsmith trains on the CPU or CUDA GPUs; {usage}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsmithError(f"--device {device}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeightsmithError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def train_args(args: TrainArgs | None = None, **overrides: Any) -> TrainArgs:
    """``args`` with keyword ``overrides`` (TrainArgs fields), checked."""
    fields = [f.name for f in dataclasses.fields(TrainArgs)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise WeightsmithError(
            f"finetune has no training option '{unknown[0]}'; options: {', '.join(fields)}"
        )
    out = dataclasses.replace(args or TrainArgs(), **overrides)
    check_args(out)
    return out


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


def _weight_file(model_dir: Path, name: str) -> str:
    """The safetensors file of ``model_dir`` that holds the tensor a module calls ``name`` (for messages)."""
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as fh:
                keys = list(fh.keys())
        except Exception:  # an unreadable shard: keep looking, the message still names the directory
            continue
        if any(k == name or k.endswith("." + name) or name.endswith("." + k) for k in keys):
            return str(f)
    return str(model_dir)


def _check_weights(task: Task, model: nn.Module) -> None:
    """Refuse a model with NaN/Inf weights before training, naming the tensor and the file it came from."""
    backbone = task.backbone(model)
    for name, tensor in backbone.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            from .. import models

            bad = int((~torch.isfinite(tensor)).sum())
            try:
                where = _weight_file(models.resolve(task.model_spec), name)
            except WeightsmithError:
                where = task.model_spec
            raise WeightsmithError(
                f"model {task.model_spec}: tensor '{name}' in {where} has {bad} NaN/Inf value(s) "
                f"of {tensor.numel()}; training cannot start from it (repair or re-download the weights)"
            )


def _check_model(spec: str) -> None:
    """The model exists as a directory with ``config.json`` (checked before any output is touched)."""
    from .. import models

    path = models.resolve(spec)
    if not (path / "config.json").is_file():
        raise WeightsmithError(f"model {spec}: {path} is not a model directory (no config.json)")


def _check_full_saveable(spec: str) -> None:
    """Full fine-tuning saves a Hugging Face checkpoint, which has no place for a ``--format weightsmith``
    model's factors: refuse before training rather than write a model that does not reload."""
    from .. import models

    if models.compressed_format(models.resolve(spec)) == "weightsmith":
        raise WeightsmithError(
            f"model {spec}: a --format weightsmith compress output cannot be fully fine-tuned into a Hugging "
            "Face checkpoint; use --method lrc (its low-rank factors) or an adapter method"
        )


def _adapter_config(adapter: Any) -> Any:
    if isinstance(adapter, str) and adapter not in (FULL, HEAD):
        from .. import adapters  # noqa: F401  (registers the methods)

        return cfg.config_from_dict({"method": adapter}, "adapter")
    return adapter


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
    optimizer: OptimizerFactory | None = None,
    args: TrainArgs | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``adapter`` (a registered adapter config, ``"full"``, or ``None``/``"head"`` for the head
    alone) on ``task`` starting from ``model`` (default: the task's model) with the optimizer built by
    ``optimizer`` (default: AdamW; see the module docstring). Keyword ``overrides`` are :class:`TrainArgs`
    fields (``epochs=2, lr=1e-3, seed=1, ...``)."""
    args = train_args(args, **overrides)
    if format not in ("native", "peft"):
        raise WeightsmithError(f"--format must be 'native' or 'peft' (got '{format}')")
    if resume and force:
        raise WeightsmithError("--resume and --force exclude each other")
    if (resume or force) and out is None:
        raise WeightsmithError("--resume and --force need an output directory (--out)")
    if optimizer is not None and args.weight_decay:
        raise WeightsmithError("--weight-decay belongs to the default AdamW; set it in the optimizer factory")
    t = task if isinstance(task, Task) else get_task(task, model, max_examples, max_len, eval_examples)
    _check_model(t.model_spec)
    adapter = _adapter_config(adapter)
    method = method_name(adapter)
    if method == FULL:
        _check_full_saveable(t.model_spec)
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(method) or adapter.default_lr
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
    world, device = distributed.init(args.device)
    if args.parallel == "fsdp2":
        distributed.require_group("--parallel fsdp2 (FSDP2, fully_shard)")
    run_dir = RunDir(out, force, resume) if out is not None and world.main else None
    ckpt = Path(out) / CHECKPOINT if resume and out is not None else None
    if resume and run_dir is not None:
        ckpt = run_dir.checkpoint
        saved = read_meta(ckpt).get("run", {})
        changed = _differences(_comparable(saved), _comparable(_plain(meta_run)))
        if changed:
            raise WeightsmithError(
                f"--resume: {out} was started with other settings ({'; '.join(changed[:4])}); "
                "use the same options as the first run, or --force to start over"
            )
    try:
        result = _train(
            t, adapter, targets, args, lr, device, world, optimizer, run_dir, ckpt, meta_run, format
        )
    except BaseException:
        if run_dir is not None:
            run_dir.abort()
        raise
    result.out = str(out) if out is not None else None
    return result


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the first: not the optimizer (checked apart) nor the
    parallelism (a checkpoint holds full tensors, so DDP and FSDP2 runs resume each other) nor
    ``cuda_graphs`` (a graphed step computes what the eager one does)."""
    args = {k: v for k, v in run.get("args", {}).items() if k not in ("parallel", "cuda_graphs")}
    return {**{k: v for k, v in run.items() if k != "optimizer"}, "args": args}


def _differences(then: Any, now: Any, where: str = "") -> list[str]:
    """``key: then -> now`` for every setting that differs (nested keys dotted)."""
    if isinstance(then, dict) and isinstance(now, dict):
        keys = [*then, *(k for k in now if k not in then)]
        return [d for k in keys for d in _differences(then.get(k), now.get(k), f"{where}{k}.")]
    return [] if then == now else [f"{where.rstrip('.')}: {then!r} -> {now!r}"]


def _train(
    t: Task,
    adapter: Any,
    targets: Any,
    args: TrainArgs,
    lr: float,
    device: torch.device,
    world: distributed.World,
    factory: OptimizerFactory | None,
    run_dir: RunDir | None,
    ckpt: Path | None,
    meta_run: dict[str, Any],
    fmt: str,
) -> TrainResult:
    method = method_name(adapter)
    head_lr = lr if method == HEAD else args.head_lr  # head-only training: --lr is the head's rate
    torch.manual_seed(args.seed)
    net, tok = t.build()
    _check_weights(t, net)
    t.prepare(tok)
    base_keys = set(net.state_dict())
    net.to(device)  # adapters are created on the device (SVD/LU inits and calibration run there)
    _attach(t, net, adapter, targets, args.batch_size, device)
    world.barrier()
    sharded = args.parallel == "fsdp2"
    if sharded:  # FSDP2: each repeated block, then the rest, sharded by rows across the processes
        from ..layers import decoder_blocks

        trained = distributed.shard(net, decoder_blocks(t.backbone(net))[1])
    else:
        trained = distributed.wrap(net, world, device)  # all-reduces gradients across processes
    params = _trainable(net)
    head = t.head(net)
    if factory is None:
        factory = functools.partial(adamw_factory, weight_decay=args.weight_decay)
    opt = factory(list(params.items()), lr)
    separate_head(opt, [p for p in head.parameters() if p.requires_grad] if head is not None else [], head_lr)
    in_backward = updates_in_backward(opt)
    if in_backward and args.max_grad_norm is not None:
        log(f"{type(opt).__name__} updates inside backward: max_grad_norm is not applied", markup=False)
    meta_run = {**meta_run, "optimizer": describe(opt)}
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
    if ckpt is not None:
        saved = read_meta(ckpt).get("run", {})
        if saved.get("optimizer") != _plain(meta_run["optimizer"]):
            raise WeightsmithError(
                f"--resume: {ckpt.parent} was trained with optimizer {saved.get('optimizer')}, "
                f"not {meta_run['optimizer']}; use the same optimizer, or --force to start over"
            )
        state = load_checkpoint(ckpt, net, keys, opt, sched)
        log(f"resuming {ckpt.parent} at step {state['step']} (epoch {state['epoch'] + 1})", markup=False)

    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in net.parameters())
    use_bf16 = args.bf16 and device.type == "cuda"
    micro_tokens = args.micro_batch_tokens
    if micro_tokens is None and device.type == "cpu" and t.kind == "lm":
        micro_tokens = CPU_MICRO_TOKENS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphed = (  # --cuda-graphs: each batch's forward and backward as one CUDA graph
        TrainerGraph(net, functools.partial(t.loss, trained), lambda: _regularization(net, method), t.kind,
                     use_bf16, world.size, in_backward,
                     lambda v: _diverged(run_dir, step, epoch, f"loss is {v}"))
        if args.cuda_graphs else None
    )  # fmt: skip
    start = time.perf_counter() - float(state["elapsed"])
    step, epoch = int(state["step"]), int(state["epoch"])

    def probe() -> None:  # one forward that changes nothing (lora_group.learn_siblings)
        first = next(iter(t.batches(0, args.seed, args.batch_size)), None)
        if first is not None:
            piece = {k: v.to(device) for k, v in t.split(first, micro_tokens)[0][0].items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                t.logits(trained, piece)

    # adapted layers that read one input (q/k/v, gate/up) learn to run as one node before the first step,
    # in every process alike: a resumed run then computes what an uninterrupted one does
    learn_siblings(net, probe)
    net.train()

    def checkpoint(next_epoch: int, next_batch: int) -> None:
        # every process of a multi-process run takes part (FSDP2 gathers shards; the RNG states are
        # collected), so that all of them also stop together on a non-finite weight
        if run_dir is None and world.size == 1:
            return
        local = (
            n for n, p in params.items() if not bool(torch.isfinite(distributed.local(p.detach())).all())
        )
        bad = next((b for b in distributed.all_gather_object(next(local, None), world) if b), None)
        if bad is not None:
            _diverged(run_dir, step - 1, epoch, f"parameter '{bad}' is not finite after the update")
        state.update(step=step, epoch=next_epoch, batch=next_batch, elapsed=time.perf_counter() - start)
        snap = snapshot(net, keys, opt, sched, world)
        if run_dir is not None and snap is not None:
            run_dir.save(snap, state)

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
                ends_step = (micro + 1) % args.grad_accum == 0 or i + world.size >= n_batches
                pieces = t.split(batch, micro_tokens) if graphed is None else []
                loss_sum = 0.0 if graphed is None else graphed.backward(batch)
                for j, (piece, weight) in enumerate(pieces):
                    piece = {k: v.to(device) for k, v in piece.items()}
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                        loss = t.loss(trained, piece)
                    last = j == len(pieces) - 1
                    # the regularizer joins the last micro-batch, once per batch as before
                    total_loss = (
                        loss * weight + (_regularization(net, method) if last else 0.0)
                    ) / args.grad_accum
                    if not torch.isfinite(total_loss.detach()):
                        _diverged(run_dir, step, epoch, f"loss is {float(loss.detach())}")
                    if in_backward:
                        opt.step_in_backward(ends_step and last)  # type: ignore[attr-defined]
                    total_loss.backward()
                    loss_sum += float(loss.detach()) * weight
                    del loss, total_loss, piece  # free this micro-batch's graph before the next
                running += loss_sum
                micro += 1
                if not ends_step:
                    continue
                if not in_backward:
                    # under FSDP2: the norm from the local shards and one all-reduce (no DTensor dispatch)
                    clip = distributed.clip_grad_norm if sharded else nn.utils.clip_grad_norm_
                    norm = clip(list(params.values()), args.max_grad_norm or float("inf"))
                    if not torch.isfinite(norm):
                        _diverged(run_dir, step, epoch, f"gradient norm is {float(distributed.local(norm))}")
                # updates inside backward have consumed every gradient: step() finds none and does nothing,
                # but the learning-rate scheduler sees the optimizer stepped before it (no order warning)
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
            log(f"epoch {epoch + 1}/{epochs}: val {t.metric_name} {val:.4f}", markup=False)
            epoch += 1
            checkpoint(epoch, 0)

    wall = time.perf_counter() - start
    metric = t.evaluate(net, tok, "test", device) if t.kind == "classification" else state["val"][-1]
    if sharded:
        distributed.unshard_for_export(net)  # the writers below see whole tensors
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
        str(run_dir.requested) if run_dir is not None else None,  # every process: set by finetune
    )
    if run_dir is not None:
        run = {**meta_run, "result": result.to_dict()}
        run_dir.finish(lambda d: write_outputs(d, t, net, tok, method, fmt, run))
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


def _diverged(run_dir: RunDir | None, step: int, epoch: int, what: str) -> NoReturn:
    where = f"training stopped at step {step + 1} (epoch {epoch + 1}): {what}"
    if run_dir is None:
        raise TrainingDiverged(f"{where}; lower --lr and start again")
    if run_dir.swapping:
        raise TrainingDiverged(
            f"{where}; the previous output {run_dir.requested} is unchanged and this run's checkpoints "
            "were discarded with it: lower --lr and start again"
        )
    if run_dir.has_checkpoint():
        saved = read_meta(run_dir.checkpoint).get("step")
        raise TrainingDiverged(
            f"{where}; the last good checkpoint ({run_dir.checkpoint}, step {saved}) is kept: "
            "--resume continues from it with the same options, --force starts over (e.g. with a lower --lr)"
        )
    raise TrainingDiverged(
        f"{where}; no checkpoint had been written yet, so nothing was written to {run_dir.requested}: "
        "lower --lr (or set --checkpoint-every) and start again"
    )


def _adapter_dict(adapter: Any) -> dict[str, Any]:
    name = method_name(adapter)
    return {"method": name} if name in (FULL, HEAD) else cfg.to_dict(adapter)
