"""Resumable checkpoints, and where a run keeps them so that a finished run is never lost.

A checkpoint is a directory ``checkpoint/``: the trainable state (``state.safetensors``), the optimizer,
scheduler and RNG state, each process's RNG in a multi-process run (``optim.pt``: ``torch.save``, read back
with ``torch.load(weights_only=True)``, so optimizer state must be tensors and plain Python types) and
``meta.json`` (where the run stands). It is
built through :mod:`weightsmith.staging` and swapped in whole. Under FSDP2 every tensor is saved gathered
(full), and cut back into shards on load, so the files are those of a one-process run.

:class:`RunDir` decides where a run works (the rule is also in ``docs/adapters.md``):

- ``OUT`` exists and ``force``: the run works in a hidden staging directory beside ``OUT`` (its checkpoints
  inside). The old ``OUT`` stays untouched until the new output is complete, then the two are swapped. A run
  that is interrupted or diverges leaves the old ``OUT`` as it was and its staging is removed, so such a run
  cannot be resumed (to keep checkpoints of a rerun, give it a new ``--out``).
- ``OUT`` does not exist: the run works in ``OUT`` itself but creates it only at its first checkpoint, so a
  run killed before then leaves nothing that blocks the rerun; one killed later leaves ``OUT/checkpoint``.
- ``resume``: ``OUT`` holds the checkpoint of an unfinished run; the run continues there.

In the last two cases the finished output is built in a staging directory and swapped over ``OUT`` (which
then holds only the checkpoint), so ``OUT`` is either a resumable checkpoint or a complete run, never half
of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .. import distributed, staging
from ..errors import WeightsmithError

CHECKPOINT = "checkpoint"
STATE_FILE, OPTIM_FILE, META_FILE = "state.safetensors", "optim.pt", "meta.json"
RUN_FILE = "run.json"


def snapshot(
    model: nn.Module, keys: list[str], opt: Any, sched: Any, world: distributed.World
) -> dict | None:
    """What a checkpoint holds: the tensors ``keys`` of ``model``, the optimizer, scheduler and RNG states.

    Every process of a multi-process run calls it (under FSDP2 the sharded tensors are gathered into full
    ones, a collective; each process's RNG state is collected so that a resumed run draws what the
    uninterrupted one would have drawn); the main process gets the snapshot, the others ``None``. The
    paths of the optimizer-state tensors that were sharded are kept (``"sharded"``), so that
    :func:`load_checkpoint` cuts them back into shards."""
    state = model.state_dict()
    tensors, _ = distributed.gather({k: state[k] for k in keys}, world.main)
    optim, sharded = distributed.gather(opt.state_dict(), world.main)
    rngs = distributed.all_gather_object(torch.get_rng_state(), world)
    cuda = torch.cuda.is_available()
    cuda_rngs = distributed.all_gather_object(torch.cuda.get_rng_state(), world) if cuda else None
    if not world.main:
        return None
    extra: dict[str, Any] = {"optimizer": optim, "sharded": sharded, "scheduler": sched.state_dict(),
                             "rng": rngs[0]}  # fmt: skip
    if world.size > 1:
        extra["rng_ranks"] = rngs
    if cuda:
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        if world.size > 1:
            extra["cuda_rng_ranks"] = cuda_rngs
    return {"tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, "extra": extra}


def save_checkpoint(ckpt: Path, snap: dict, meta: dict) -> None:
    """Write the checkpoint directory ``ckpt`` whole from a :func:`snapshot` (an older one is replaced only
    once this is complete)."""
    with staging.staged_dir(ckpt, force=True) as tmp:
        save_file(snap["tensors"], str(tmp / STATE_FILE))
        torch.save(snap["extra"], tmp / OPTIM_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((ckpt / META_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise WeightsmithError(
            f"{ckpt / META_FILE}: unreadable checkpoint ({exc}); start again with --force"
        ) from exc


def load_checkpoint(ckpt: Path, model: nn.Module, keys: list[str], opt: Any, sched: Any) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the saved ``meta``."""
    try:
        state = load_file(str(ckpt / STATE_FILE))
        extra = torch.load(ckpt / OPTIM_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file: the user's to fix, not a bug
        raise WeightsmithError(f"{ckpt}: unreadable checkpoint ({exc}); start again with --force") from exc
    missing = sorted(set(keys) - set(state))
    if missing:
        raise WeightsmithError(
            f"{ckpt}: checkpoint lacks '{missing[0]}' ({len(missing)} tensors); "
            "it was written for another method or model; start again with --force"
        )
    live = model.state_dict()
    model.load_state_dict(
        {k: distributed.shard_like(v, live[k]) if k in live else v for k, v in state.items()}, strict=False
    )
    opt.load_state_dict(extra["optimizer"])
    _keep_saved_dtypes(opt, extra["optimizer"])
    _reshard(opt, extra.get("sharded", []))
    sched.load_state_dict(extra["scheduler"])
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rngs = extra.get("rng_ranks")
    torch.set_rng_state(rngs[rank] if rngs and len(rngs) == size else extra["rng"])
    if torch.cuda.is_available():
        cuda_rngs = extra.get("cuda_rng_ranks")
        if cuda_rngs and len(cuda_rngs) == size:
            torch.cuda.set_rng_state(cuda_rngs[rank])
        elif "cuda_rng" in extra:
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return read_meta(ckpt)


def _reshard(opt: Any, paths: list[list[Any]]) -> None:
    """Cut the optimizer-state tensors that were sharded when saved (``paths`` from :func:`snapshot`:
    ``["state", index, key, ...]``) back into this process's shard, laid out as their parameter."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for path in paths:
        if len(path) < 3 or path[0] != "state":
            continue
        p = params[path[1]]
        node = opt.state[p]
        for key in path[2:-1]:
            node = node[key]
        node[path[-1]] = distributed.shard_like(node[path[-1]], p)


def _keep_saved_dtypes(opt: Any, saved: dict[str, Any]) -> None:
    """Undo ``Optimizer.load_state_dict``'s casts: it turns every state tensor of a floating-point
    parameter (integer indices, float64 accumulators) into the parameter's dtype. The state comes back
    exactly as saved."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def restore(live: Any, kept: Any) -> Any:
        if isinstance(kept, torch.Tensor) and isinstance(live, torch.Tensor):
            return kept.to(live.device) if kept.dtype != live.dtype else live
        if isinstance(kept, dict) and isinstance(live, dict):
            return {k: restore(v, kept[k]) if k in kept else v for k, v in live.items()}
        if isinstance(kept, (list, tuple)) and isinstance(live, (list, tuple)) and len(kept) == len(live):
            return type(live)(restore(v, k) for v, k in zip(live, kept, strict=True))
        return live

    for index, kept in saved.get("state", {}).items():
        if isinstance(index, int) and 0 <= index < len(params) and params[index] in opt.state:
            p = params[index]
            opt.state[p] = restore(opt.state[p], kept)


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class RunDir:
    """Where one run keeps its checkpoints and builds its output (see the module docstring).

    Construct it before loading the model: it validates ``out`` (existing output without ``force``, a live
    run writing it, ``resume`` without a checkpoint) and touches nothing unless ``force`` replaces an output.
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False, resume: bool = False) -> None:
        self.requested = Path(out)
        self.final = staging.final_path(out)
        self.resume = resume
        self._swap: staging.Staging | None = None
        self._ours: tuple[int, int] | None = None  # OUT's identity once this run works in it
        if resume:
            self._open_for_resume()
            return
        if self.final.exists() and not force:
            step = self._unfinished_step()
            if step is not None:
                raise WeightsmithError(
                    f"output {out} holds the checkpoint of an unfinished run (step {step}); "
                    "pass --resume to continue it (same options) or --force to start over"
                )
        staging.check_output(out, force, directory=True)  # refusals, stale staging, a live writer
        if self.final.exists():
            self._swap = staging.Staging(out, force=True, directory=True)

    def _unfinished_step(self) -> int | None:
        ckpt = self.final / CHECKPOINT
        if not (ckpt / META_FILE).is_file():
            return None
        return int(read_meta(ckpt).get("step", 0))

    def _open_for_resume(self) -> None:
        out = self.requested
        if not self.final.is_dir():
            raise WeightsmithError(f"--resume: {out} does not exist; there is no run to resume")
        staging.clean_stale(self.final / CHECKPOINT)  # puts back a checkpoint a killed swap moved aside
        pid = staging.live_writer(self.final) or staging.live_writer(self.final / CHECKPOINT)
        if pid is not None:
            raise WeightsmithError(f"--resume: another weightsmith run (pid {pid}) is writing {out}")
        if not (self.final / CHECKPOINT / META_FILE).is_file():
            why = " (it is a finished run)" if (self.final / RUN_FILE).is_file() else ""
            raise WeightsmithError(f"--resume: {out} has no checkpoint to resume from{why}")
        self._ours = _ident(self.final)

    @property
    def swapping(self) -> bool:
        """True when an old output is kept until this run completes (``force`` over an existing output)."""
        return self._swap is not None

    @property
    def checkpoint(self) -> Path:
        return (self._swap.path if self._swap is not None else self.final) / CHECKPOINT

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / META_FILE).is_file()

    def save(self, snap: dict, meta: dict) -> None:
        """Write the checkpoint from a :func:`snapshot`."""
        if self._swap is None:
            self._claim()
        save_checkpoint(self.checkpoint, snap, meta)

    def _claim(self) -> None:
        """Working in OUT itself: create it at the first checkpoint; later, check it is still this run's."""
        if self._ours is None:
            try:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                self.final.mkdir()
            except FileExistsError:
                raise self._taken() from None
            except OSError as exc:
                raise staging.user_error(exc, self.requested, "creating") from exc
            self._ours = _ident(self.final)
        elif _ident(self.final) != self._ours or (self.final / RUN_FILE).exists():
            raise self._taken()

    def _taken(self) -> WeightsmithError:
        return WeightsmithError(
            f"output {self.requested} was created or changed by someone else while this run worked "
            "(another run?); it was left as it is and this run stopped"
        )

    def finish(self, write: Callable[[Path], None]) -> Path:
        """Build the finished output with ``write(directory)`` and swap it in whole."""
        if self._swap is not None:
            write(self._swap.path)
            return self._swap.commit()
        if self._ours is not None and (_ident(self.final) != self._ours or (self.final / RUN_FILE).exists()):
            raise self._taken()
        # replace OUT only when it is this run's own checkpoint directory; never one that appeared meanwhile
        with staging.staged_dir(self.requested, force=self._ours is not None) as tmp:
            write(tmp)
        return self.final

    def abort(self) -> None:
        """After an error or interrupt: drop the staging of a ``force`` run (the old output stays)."""
        if self._swap is not None:
            self._swap.abort()
