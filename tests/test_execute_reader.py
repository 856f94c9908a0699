"""The parallel reader (each byte read once, straight into its destination or one staging slot), positioned
reads that loop over short reads, and the byte budget that bounds what read-ahead and write-behind hold."""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith import execute
from weightsmith.errors import WeightsmithError
from weightsmith.execute import PREFETCH_BYTES, Reader, device_budget, stream
from weightsmith.store import DictStore, SafetensorsStore, ShardWriter, open_store

torch.set_num_threads(1)


def _model(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "emb": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "w": torch.randn(5, 3, generator=g),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(13, generator=g).to(torch.float16),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


class _Buffer(bytearray):
    """A bytearray that can be weakly referenced (to see when the tensor over it is freed)."""


def ours_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("weightsmith")]


@pytest.mark.parametrize("staged", [False, True])
def test_reader_reads_every_byte_once_in_odd_chunks(tmp_path: Path, staged: bool) -> None:
    stores = [open_store(_model(tmp_path / f"m{i}", i)) for i in range(3)]
    expect = [load_file(str(tmp_path / f"m{i}" / "model.safetensors")) for i in range(3)]
    total = 0
    with Reader("cpu", threads=3, chunk=7, staged=staged) as rd:  # 7 bytes: chunks cut elements in two
        for name in expect[0]:
            got = rd.read([(s, name) for s in stores])
            for t, ref in zip(got, [e[name] for e in expect], strict=True):
                assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref)
            total += sum(e[name].numel() * e[name].element_size() for e in expect)
        assert rd.bytes_read == total  # one read per byte: no read-then-copy inside the reader
        assert rd.bytes_copied == (total if staged else 0)  # staged: one copy out of a slot per byte
    assert not ours_alive()


def test_reader_falls_back_for_in_memory_stores_and_names_a_truncated_file(tmp_path: Path) -> None:
    mem = DictStore({"w": torch.ones(2, 2)}, "mem")
    with Reader("cpu") as rd:
        assert torch.equal(rd.read([(mem, "w")])[0], torch.ones(2, 2))
    f = _model(tmp_path / "m", 0) / "model.safetensors"
    store = open_store(f)
    assert isinstance(store, SafetensorsStore)
    os.truncate(f, f.stat().st_size - 8)  # the last tensor's bytes end early
    last = max(store, key=lambda n: store.span(n)[2])
    bad = rf"model\.safetensors: cannot read tensor '{last}'"
    with pytest.raises(WeightsmithError, match=bad), Reader("cpu", threads=2, chunk=5, staged=True) as rd:
        rd.read([(store, n) for n in store])
    assert not ours_alive()


def test_positioned_reads_loop_over_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(_model(tmp_path / "m", 1))
    assert isinstance(store, SafetensorsStore)
    ref = load_file(str(tmp_path / "m" / "model.safetensors"))["emb"]
    real = os.preadv

    def short(fd: int, bufs: list, offset: int) -> int:  # at most 5 bytes per call, as a large read gets
        return real(fd, [memoryview(bufs[0])[:5]], offset)

    monkeypatch.setattr(os, "preadv", short)
    assert torch.equal(store["emb"], ref)
    out = torch.empty(ref.numel() * 2 - 6, dtype=torch.uint8)
    store.read_into("emb", out, 6)
    assert torch.equal(out, ref.reshape(-1).view(torch.uint8)[6:])
    with pytest.raises(ValueError, match="outside tensor 'emb'"):
        store.read_into("emb", torch.empty(4, dtype=torch.uint8), ref.numel() * 2 - 2)


def test_device_budget_is_the_largest_footprint_within_free_memory() -> None:
    gpu = torch.device("cuda")  # no GPU needed: the free memory is given
    assert device_budget(gpu, footprint=3 << 30, free=40 << 30) == 3 << 30  # mergekit's peak: one item
    assert device_budget(gpu, footprint=3 << 30, free=4 << 30) == 2 << 30  # half of what is free
    assert device_budget(torch.device("cpu"), footprint=3 << 30) == PREFETCH_BYTES


@pytest.mark.parametrize("progress", ["0", "1"])  # a progress bar must not keep an item alive either
def test_stream_holds_inputs_and_unwritten_results_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: str
) -> None:
    """A fake device budget on the CPU: every tensor the reader allocates and every result is tracked
    until its storage is freed; the live bytes never exceed the budget (the largest item's inputs and
    result, as :func:`device_budget` sizes it on a GPU), though read-ahead and a slow write-behind run."""
    monkeypatch.setenv("WEIGHTSMITH_PROGRESS", progress)
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (8,), (256, 64), (64, 64), (8,), (64, 256), (64, 64), (8,)] * 2
    names = [f"t{i}" for i in range(len(sizes))]
    stores = []
    for j in range(3):
        (tmp_path / f"m{j}").mkdir()
        tensors = {n: torch.randn(s, generator=g) for n, s in zip(names, sizes, strict=True)}
        save_file(tensors, str(tmp_path / f"m{j}" / "model.safetensors"))
        stores.append(open_store(tmp_path / f"m{j}"))
    live, peak, lock = [0], [0], threading.Lock()

    def release(n: int) -> None:
        with lock:
            live[0] -= n

    def tracked(nbytes: int) -> torch.Tensor:
        """Bytes whose life is their storage's: the buffer is freed with the last tensor viewing it."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = _Buffer(nbytes)
        with lock:
            live[0] += nbytes
            peak[0] = max(peak[0], live[0])
        weakref.finalize(buf, release, nbytes)
        return torch.frombuffer(buf, dtype=torch.uint8)

    monkeypatch.setattr(Reader, "_empty", lambda self, nbytes: tracked(nbytes))

    def merge(name: str, ts: list[torch.Tensor]) -> torch.Tensor:
        time.sleep(0.003)  # the reader runs ahead meanwhile
        out = tracked(ts[0].numel() * 4).view(torch.float32).reshape(ts[0].shape)
        return torch.add(ts[0], ts[1], out=out).sub_(ts[2])

    big = 3 * 256 * 64 * 4 + 256 * 64 * 4  # the largest item: 3 inputs and its result
    with ShardWriter(tmp_path / "out") as writer:
        add = writer.add

        def slow_add(name: str, t: torch.Tensor) -> None:  # results queue up behind a slow disk
            time.sleep(0.004)
            add(name, t)

        stream(stores, merge, writer=cast(ShardWriter, SimpleNamespace(add=slow_add)), prefetch_bytes=big)
    assert peak[0] == big  # the largest item is read when nothing else is held, and nothing more
    assert live[0] == 0
    got, a, b, c = (
        load_file(str(p))
        for p in [tmp_path / "out" / "model.safetensors"]
        + [tmp_path / f"m{j}" / "model.safetensors" for j in range(3)]
    )
    assert all(torch.equal(got[n], a[n] + b[n] - c[n]) for n in names)


def test_write_behind_gives_back_what_it_held_on_every_way_out() -> None:
    budget = execute.ByteBudget(1 << 20)
    behind = execute.WriteBehind(lambda n, t: None, budget=budget)
    behind.put("a", torch.ones(4))
    behind.finish()
    assert budget.held == 0 and budget.peak == 16

    def full(name: str, t: torch.Tensor) -> None:
        raise OSError(28, "No space left on device")

    behind = execute.WriteBehind(full, budget=budget)
    with pytest.raises(OSError):
        for _ in range(5):
            behind.put("b", torch.ones(4))
        behind.finish()
    behind.close()
    assert budget.held == 0
    assert not ours_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reader_on_cuda_stages_through_pinned_slots_and_matches_the_store(tmp_path: Path) -> None:
    stores = [open_store(_model(tmp_path / f"m{i}", i)) for i in range(3)]
    with Reader("cuda", threads=4, chunk=7) as rd:
        for name in stores[0]:
            got = rd.read([(s, name) for s in stores])
            torch.cuda.current_stream().synchronize()
            for t, s in zip(got, stores, strict=True):
                assert t.is_cuda and torch.equal(t.cpu(), s[name])
        assert rd.bytes_read == rd.bytes_copied > 0
    a, b = (open_store(_model(tmp_path / f"n{i}", i)) for i in range(2))
    with ShardWriter(tmp_path / "out") as writer:
        stream([a, b], lambda n, ts: ts[0] + ts[1], writer=writer, device="cuda", check_finite=True)
    got = open_store(tmp_path / "out")
    assert all(torch.equal(got[n], a[n] + b[n]) for n in a)


def test_reader_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_READ_THREADS", "3")
    with Reader("cpu") as rd:
        assert rd.threads == 3
    monkeypatch.setenv("WEIGHTSMITH_READ_THREADS", "many")
    with pytest.raises(WeightsmithError, match="WEIGHTSMITH_READ_THREADS='many'"):
        Reader("cpu")
