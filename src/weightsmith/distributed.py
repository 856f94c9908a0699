"""Data-parallel training across processes started by ``torchrun``: one process per GPU (NCCL), or
several CPU processes (gloo). Without ``WORLD_SIZE`` in the environment everything is single-process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import WeightsmithError
from .execute import resolve_device


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


def shard(model: torch.nn.Module, blocks: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each of ``blocks`` (e.g. the transformer layers), then the whole model, so that
    parameters, gradients and element-wise optimizer state are split by rows across the processes
    (:mod:`weightsmith.optim` gathers one weight's gradient at a time for its projections)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise WeightsmithError(
            "FSDP2 (fully_shard) needs a process group: start the run under torchrun "
            "(python -m torch.distributed.run --nproc_per_node N ...)"
        )
    from torch.distributed.fsdp import fully_shard

    for block in blocks or []:
        fully_shard(block)
    fully_shard(model)
    return model
