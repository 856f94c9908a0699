"""Per-layer updates inside backward equal ordinary stepping (with gradient accumulation); GaLore under
DistributedDataParallel and GaLore / Q-GaLore / APOLLO under FSDP2 (2 gloo processes on CPU) equal one process
on the whole batch. Under FSDP2, GaLore with the randomized SVD (also with lazy refresh), random and DCT
projectors runs on the row shards (projector from all-reduced small products, moments sharded) and still
equals one process; Q-GaLore and APOLLO gather the gradient."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightsmith.errors import WeightsmithError
from weightsmith.optim import GaLoreAdamW, galore_param_groups, is_layerwise, layerwise
from weightsmith.train.optimizer import updates_in_backward

torch.set_num_threads(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 4))


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 16, generator=g) for _ in range(n)]


def _opt(model: torch.nn.Module, cls: type = GaLoreAdamW) -> GaLoreAdamW:
    groups = galore_param_groups(
        model.named_parameters(), rank=3, update_proj_gap=2, scale=0.5, projector="rsvd"
    )
    return cls(groups, lr=1e-2, weight_decay=0.01)


def test_updates_in_backward_equal_stepping_with_accumulation():
    accum, steps = 2, 5
    ref, lw = _model(), _model()
    opt_ref = _opt(ref)
    opt_lw = _opt(lw, layerwise(GaLoreAdamW))
    assert updates_in_backward(opt_lw) and is_layerwise(opt_lw) and not updates_in_backward(opt_ref)
    data = _batches(steps * accum)
    for s in range(steps):
        for k in range(accum):
            x = data[s * accum + k]
            (ref(x).square().mean() / accum).backward()
            opt_lw.step_in_backward(k == accum - 1)
            (lw(x).square().mean() / accum).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in lw.parameters())  # freed inside backward
    for p, q in zip(ref.parameters(), lw.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(ref[0].weight, _model()[0].weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(fn, out: str) -> None:
    """Two gloo processes; one retry when a worker dies by a signal (on a loaded 2-core machine gloo has,
    rarely, aborted a worker at start-up or teardown). Wrong results still fail: assertions check the output.
    """
    for attempt in range(2):
        try:
            mp.spawn(fn, args=(2, _free_port(), out), nprocs=2, join=True)
            return
        except mp.ProcessExitedException:
            if attempt:
                raise


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _opt(model)
        for x in _batches(4):
            half = x.chunk(world)[rank]
            ddp(half).square().mean().backward()  # DDP averages the two halves' gradients
            opt.step()
            opt.zero_grad(set_to_none=True)
        lw = layerwise(GaLoreAdamW)
        try:
            _opt(_model(), lw).step_in_backward(True)
            refused = False
        except WeightsmithError:
            refused = True
        if rank == 0:
            torch.save({"params": [p.detach() for p in model.parameters()], "refused": refused}, out)
    finally:
        dist.barrier()  # no rank tears down gloo while its peer still uses the connection
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ddp_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "ddp.pt")
    _spawn(_ddp_worker, out)
    got = torch.load(out, weights_only=True)
    single = _model()
    opt = _opt(single)
    for x in _batches(4):
        single(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, q in zip(single.parameters(), got["params"], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-5)
    assert got["refused"], "per-layer updates must refuse a multi-process group"


class _Count:
    """Counts the all-reduces and the gathers of whole DTensors while it is entered."""

    def __enter__(self) -> _Count:
        from torch.distributed.tensor import DTensor

        self.reduces, self.gathers = 0, 0
        self._saved = dist.all_reduce, DTensor.full_tensor

        def all_reduce(*args, **kwargs):
            self.reduces += 1
            return self._saved[0](*args, **kwargs)

        def full_tensor(t, *args, **kwargs):
            self.gathers += 1
            return self._saved[1](t, *args, **kwargs)

        dist.all_reduce, DTensor.full_tensor = all_reduce, full_tensor  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.distributed.tensor import DTensor

        dist.all_reduce, DTensor.full_tensor = self._saved  # type: ignore[method-assign]


def _steps_counted(
    model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, world: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Four steps on this rank's share of each batch: the full parameters after them, and the all-reduces
    and gathers each optimizer step made ([steps, 2])."""
    counts = []
    for x in _batches(4):
        model(x.chunk(world)[rank]).square().mean().backward()
        with _Count() as count:
            opt.step()
        counts.append([count.reduces, count.gathers])
        opt.zero_grad(set_to_none=True)
    return [p.full_tensor().detach() for p in model.parameters()], torch.tensor(counts)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from weightsmith import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for label, config in _FSDP_CONFIGS.items():
            model = _model()
            distributed.shard(model, [model[0], model[2]])
            opt = config.create(list(model.named_parameters()), 1e-2)
            results[label], results[f"{label}/collectives"] = _steps_counted(model, opt, rank, world)
            if label in _ROW_SHARDED:  # computed on the row shards: no gathered gradient, sharded moments
                inner = opt.state[model[0].weight]["inner"]
                results[f"{label}/sharded"] = torch.tensor(type(inner["mu"]).__name__ == "DTensor")
        # several weights of one shape: their left projections share one all-reduce a step, and a refresh
        # sums each stage of the range finder once per shape, not once per weight
        model = _Branches()
        distributed.shard(model, [*model.left, *model.right])
        opt = _BRANCHES.create(list(model.named_parameters()), 1e-2)
        results["branches"], results["branches/collectives"] = _steps_counted(model, opt, rank, world)
        # clipping from the local shards and one all-reduce: the norm of the whole-batch gradient
        model = _model()
        distributed.shard(model, [model[0], model[2]])
        model(_batches(1)[0].chunk(world)[rank]).square().mean().backward()
        with _Count() as count:
            norm = distributed.clip_grad_norm(model.parameters(), 0.05)
        results["clip/norm"] = norm
        results["clip/grads"] = [p.grad.full_tensor() for p in model.parameters()]
        results["clip/collectives"] = torch.tensor([count.reduces, count.gathers])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.barrier()  # no rank tears down gloo while its peer still uses the connection
        dist.destroy_process_group()


class _Branches(torch.nn.Module):
    """Three 4 x 16 weights (left-projected) and two 40 x 16 ones (right-projected) side by side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = torch.nn.ModuleList(torch.nn.Linear(16, 4) for _ in range(3))
        self.right = torch.nn.ModuleList(torch.nn.Linear(16, 40) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in [*self.left, *self.right]], dim=1)


def _fsdp_configs() -> dict:
    from weightsmith.optim import configs

    every = ("re:^[02]\\.",)
    return {
        "galore-rsvd": configs.GaLore(rank=3, update_proj_gap=2, projector="rsvd", targets=every),
        "galore-rsvd-lazy": configs.GaLore(rank=3, update_proj_gap=1, lazy_threshold=0.3, targets=every),
        "galore-random": configs.GaLore(rank=3, update_proj_gap=2, projector="random", targets=every),
        "galore-dct": configs.GaLore(rank=3, update_proj_gap=2, projector="dct", targets=every),
        "q-galore": configs.QGaLore(rank=3, update_proj_gap=1, targets=every),
        "apollo": configs.APOLLO(rank=3, update_proj_gap=2, targets=every),
    }


_FSDP_CONFIGS = _fsdp_configs()


def _branches_config():
    from weightsmith.optim import configs

    return configs.GaLore(rank=3, update_proj_gap=2, projector="rsvd", targets=("re:^(left|right)\\.",))


_BRANCHES = _branches_config()
_ROW_SHARDED = ("galore-rsvd", "galore-rsvd-lazy", "galore-random", "galore-dct")


@pytest.mark.timeout(240)
def test_fsdp2_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "fsdp.pt")
    _spawn(_fsdp_worker, out)
    got = torch.load(out, weights_only=True)
    for label, config in _FSDP_CONFIGS.items():
        single = _model()
        opt = config.create(list(single.named_parameters()), 1e-2)
        for x in _batches(4):
            single(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, q in zip(single.parameters(), got[label], strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-5, msg=label)
        reduces, gathers = got[f"{label}/collectives"].T.tolist()
        if label in _ROW_SHARDED:
            assert bool(got[f"{label}/sharded"]), label
            assert gathers == [0, 0, 0, 0], label  # no gradient or weight is gathered
    # the left-projected weight (4 x 24) sums its projection over the row shards: one all-reduce a step;
    # a refresh (steps 0 and 2) sums each stage of the batched range finder once for both weights
    rsvd = got["galore-rsvd/collectives"][:, 0].tolist()
    assert rsvd[1] == rsvd[3] == 1 and max(rsvd) <= 12, rsvd
    assert got["galore-random/collectives"][:, 0].tolist() == [1, 1, 1, 1]
    # Q-GaLore and APOLLO gather the gradient and the weight of both projected matrices every step
    assert got["q-galore/collectives"][:, 1].tolist() == [4, 4, 4, 4]
    single = _Branches()
    opt = _BRANCHES.create(list(single.named_parameters()), 1e-2)
    for x in _batches(4):
        single(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, q in zip(single.parameters(), got["branches"], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-5, msg="branches")
    # one all-reduce a plain step (3 left weights); a cold refresh: 2 shapes x 4 stages + the step's one; a
    # warm one: 2 shapes x 3 stages + the warm start's left products + the step's one (one per weight: 23, 21)
    assert got["branches/collectives"].tolist() == [[9, 0], [1, 0], [8, 0], [1, 0]]
    # clipping: the norm of the whole-batch gradient (FSDP2 averages the halves), one all-reduce, no gather
    single = _model()
    single(_batches(1)[0]).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(single.parameters(), 0.05)
    torch.testing.assert_close(got["clip/norm"], norm, rtol=1e-5, atol=0)
    assert float(norm) > 0.05 and got["clip/collectives"].tolist() == [1, 0]
    for p, g in zip(single.parameters(), got["clip/grads"], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_fsdp2_without_process_group_is_refused():
    from weightsmith import distributed

    with pytest.raises(WeightsmithError, match="FSDP2 .* needs a process group"):
        distributed.shard(_model())


def test_clip_grad_norm_one_process_equals_torch():
    from weightsmith import distributed

    for max_norm in (0.05, 1e3):  # clipped, and left alone
        ours, ref = _model(), _model()
        for m in (ours, ref):
            m(_batches(1)[0]).square().mean().backward()
        norm = distributed.clip_grad_norm(ours.parameters(), max_norm)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
