"""Data-parallel training across processes started by ``torchrun``: one process per GPU (NCCL), or
several CPU processes (gloo). Without ``WORLD_SIZE`` in the environment everything is single-process.

Two ways to spread a model (``PARALLEL``): ``ddp`` keeps a whole copy in every process and all-reduces the
gradients (:func:`wrap`); ``fsdp2`` shards parameters, gradients and element-wise optimizer state by rows
with ``torch.distributed.fsdp.fully_shard`` (:func:`shard`; "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel", Zhao et al., 2023, in its per-parameter DTensor form). Under FSDP2 the checkpoint
helpers here gather every sharded tensor into a full one (:func:`gather`, a collective: every process calls
it in the same order) and slice a full tensor back into the local shard on load (:func:`shard_like`, no
communication), so a checkpoint is one set of full tensors whatever the number of processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

from .errors import WeightsmithError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
from .execute import resolve_device


def is_dtensor(x: Any) -> TypeGuard[DTensor]:
    """Whether ``x`` is an FSDP2/DTensor shard. Before ``torch.distributed.tensor`` is imported no DTensor can
    exist, so commands that never shard skip importing it (it costs most of a second at start-up)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


PARALLEL = ("ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init(device: str | torch.device | None) -> tuple[World, torch.device]:
    """The process's place in the job and its device (``cuda:LOCAL_RANK`` under torchrun on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if size == 1:
        return World(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), dev


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` in one process; a DistributedDataParallel view of it (gradients all-reduced) in many."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def require_group(what: str = "FSDP2 (fully_shard)") -> None:
    """Refuse ``what`` outside a process group (a run not started by torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise WeightsmithError(
            f"{what} needs a process group: start the run under torchrun "
            "(python -m torch.distributed.run --nproc_per_node N ...), or use --parallel ddp"
        )


def shard(
    model: torch.nn.Module,
    blocks: Iterable[torch.nn.Module] | None = None,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each of ``blocks`` (e.g. the transformer layers), then the whole model, so that
    parameters, gradients and element-wise optimizer state are split by rows across the processes
    (:mod:`weightsmith.optim` computes its projections from the row shards).

    Each block frees its gathered parameters after its forward and gathers them again for its backward
    (ZeRO-3), except the last block, whose backward comes right after its forward, and the rest of the
    model (embeddings, head: FSDP2's default for the root); ``reshard_after_forward=False`` keeps every
    block's gathered parameters until its backward (one all-gather a step instead of two; ZeRO-2's memory).
    ``param_dtype`` / ``reduce_dtype`` are FSDP2's ``MixedPrecisionPolicy`` (compute in ``param_dtype``,
    gradients reduced in ``reduce_dtype``); None keeps the parameters' own dtype for both."""
    require_group()
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    sharded = list(blocks or [])
    for i, block in enumerate(sharded):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(sharded) - 1, mp_policy=mp)
    fully_shard(model, reshard_after_forward=None if reshard_after_forward else False, mp_policy=mp)
    # Explicit prefetch: block i+1's all-gather is issued while block i computes (forward), block i-1's
    # while block i's gradients are computed (backward), so communication hides behind compute instead of
    # waiting in each block's pre-forward hook.
    for i, block in enumerate(sharded):
        if i + 1 < len(sharded):
            block.set_modules_to_forward_prefetch([sharded[i + 1]])  # type: ignore[operator]
        if i > 0:
            block.set_modules_to_backward_prefetch([sharded[i - 1]])  # type: ignore[operator]
    return model


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` in place so that their global 2-norm is at most ``max_norm`` and
    return the norm before scaling, a float32 tensor on the gradients' device (as
    ``torch.nn.utils.clip_grad_norm_`` with ``norm_type=2``: ``g <- g * min(1, max_norm / (||g|| + 1e-6))``).

    Under FSDP2 the squared norms of the local shards are summed and all-reduced once (``||g||^2 = sum over
    processes of ||g_i||^2``; gradients that are not sharded are the same in every process and are added
    after the sum) and the scaling runs on the local shards, instead of DTensor's dispatch per gradient and
    op. No host synchronisation."""
    shards: list[torch.Tensor] = []
    whole: list[torch.Tensor] = []
    group = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        if not is_dtensor(g):
            whole.append(g)
            continue
        if g.device_mesh.ndim != 1 or not g.placements[0].is_shard():
            raise WeightsmithError(
                f"clip_grad_norm: a gradient of shape {tuple(g.shape)} is laid out as {g.placements} on a "
                f"{g.device_mesh.ndim}-D mesh; only FSDP2's gradients sharded on a 1-D mesh are supported"
            )
        group = g.device_mesh.get_group()
        shards.append(g.to_local())
    grads = shards + whole
    if not grads:
        return torch.zeros(())
    device = grads[0].device

    def squares(ts: list[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), device=device)
        norms = torch._foreach_norm(ts, 2.0, dtype=torch.float32)
        return torch.stack([n.to(device) for n in norms]).square().sum()

    total = squares(shards)
    if group is not None:
        dist.all_reduce(total, group=group)
    norm = (total + squares(whole)).sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for dev, gs in by_device.items():
        torch._foreach_mul_(gs, coef.to(dev))
    return norm


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters."""
    return any(is_dtensor(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: all-gathered when it is a DTensor (a collective), as a plain tensor."""
    if not is_dtensor(t):
        return t
    out = t.full_tensor()
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.wait() if isinstance(out, AsyncCollectiveTensor) else out


def gather(tree: Any, keep: bool = True) -> tuple[Any, list[list[Any]]]:
    """``tree`` (nested dicts, lists, tuples) with every DTensor replaced by its full tensor, and the paths
    of the tensors so replaced. A collective under FSDP2: every process calls it on a tree of the same
    structure. With ``keep=False`` the values are gathered (so that the peers' collectives complete) but
    dropped; the tree returned is then ``None``."""
    paths: list[list[Any]] = []

    def walk(x: Any, path: list[Any]) -> Any:
        if is_dtensor(x):
            paths.append(path)
            whole = full(x)
            return whole if keep else None
        if isinstance(x, dict):
            return {k: walk(v, [*path, k]) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, [*path, i]) for i, v in enumerate(x))
        return x

    out = walk(tree, [])
    return (out if keep else None), paths


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (the tensor itself when it is not sharded)."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: sliced to this process's shard when ``like`` is a DTensor (no
    communication: every process holds ``full``), otherwise ``full`` itself."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(like.to_local().device), like.device_mesh, like.placements, src_data_rank=None
    )


def all_gather_object(obj: Any, world: World) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def unshard_for_export(model: torch.nn.Module) -> None:
    """After training under FSDP2: replace every sharded parameter by its full tensor (a collective), so
    that code that knows nothing of DTensors (``save_pretrained``, adapter writers) can write the model.
    Tied parameters stay tied. The model must not be trained afterwards (FSDP's hooks expect shards)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # sharded state: FSDP's state-dict hooks then leave the modules alone
        if isinstance(module, FSDPModule):
            module.reshard()
    done: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}  # the old one kept: ids stay unique
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if is_dtensor(p):
                if id(p) not in done:
                    whole = torch.nn.Parameter(full(p).detach(), requires_grad=p.requires_grad)
                    done[id(p)] = (p, whole)
                module._parameters[name] = done[id(p)][1]
