"""All-gather, reduce-scatter and all-reduce bandwidth between this host's GPUs: the floor under FSDP2's and
DDP's collectives (bus bandwidth as nccl-tests reports it).

    torchrun --nproc_per_node 2 benchmarks/nccl_bandwidth.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def timed(fn: Callable[[], object], repeat: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if rank == 0:
        print(
            "peer access 0<->1:",
            torch.cuda.can_device_access_peer(0, 1),
            "NCCL_PROTO",
            os.environ.get("NCCL_PROTO"),
        )
    for mb in (50, 200, 1100):
        n = mb * 2**20 // 2
        shard = torch.randn(n // world, device="cuda", dtype=torch.bfloat16)
        full = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        gathered = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        part = torch.empty(n // world, device="cuda", dtype=torch.bfloat16)
        ops: dict[str, Callable[[], object]] = {
            "all_gather": lambda g=gathered, s=shard: dist.all_gather_into_tensor(g, s),
            "reduce_scatter": lambda p=part, f=full: dist.reduce_scatter_tensor(p, f),
            "all_reduce": lambda f=full: dist.all_reduce(f),
        }
        for name, fn in ops.items():
            dt = timed(fn)
            bus = (2 if name == "all_reduce" else 1) * (world - 1) / world * n * 2 / dt / 1e9
            if rank == 0:
                print(f"{name:15s} {mb:5d} MB  {dt * 1e3:8.2f} ms  bus {bus:6.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
