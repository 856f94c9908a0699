"""The one streaming executor: read-ahead within its budget, write-behind, errors naming the tensor, and
threads joined on every way out."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weightsmith.errors import WeightsmithError
from weightsmith.execute import ReadAhead, WriteBehind, map_weights, resolve_device, stream
from weightsmith.store import DictStore, ShardWriter, open_store

torch.set_num_threads(1)


def ours_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("weightsmith")]


def test_read_ahead_keeps_order_and_its_byte_budget():
    held, peak, lock = [0], [0], threading.Lock()

    def read(i: int) -> int:
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return i * i

    got = []
    with ReadAhead(range(20), read, size=lambda i: 10, budget=30) as reader:
        for i, value in reader:
            time.sleep(0.002)  # the reader runs ahead while we "work"
            got.append((i, value))
            with lock:
                held[0] -= 1
    assert got == [(i, i * i) for i in range(20)]
    assert peak[0] <= 3  # 30 bytes of 10-byte items, the one being worked on included
    assert not ours_alive()


def test_read_ahead_depth_and_oversized_items():
    reads: list[int] = []
    with ReadAhead(range(6), reads.append, size=lambda i: 100, budget=10, depth=1) as reader:
        for i, _ in reader:
            time.sleep(0.002)
            assert reads[-1] == i  # an item over the budget is read only when nothing else is held
    assert reads == list(range(6))


def test_read_ahead_errors_and_early_exit_join_the_thread():
    def read(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        return i

    with pytest.raises(ValueError, match="bad item 3"), ReadAhead(range(10), read) as reader:
        for _ in reader:
            pass
    assert not ours_alive()
    with ReadAhead(range(1000), lambda i: i) as reader:  # the caller stops early (an error of its own)
        for i, _ in reader:
            if i == 2:
                break
    assert not ours_alive()


def test_write_behind_casts_and_reports_errors(tmp_path):
    out = {}
    behind = WriteBehind(lambda n, t: out.__setitem__(n, t))
    behind.put("a", torch.ones(3), torch.bfloat16)
    behind.put("ids", torch.arange(3), torch.bfloat16)  # non-floating tensors are never cast
    behind.finish()
    assert out["a"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64

    def full(name: str, t: torch.Tensor) -> None:
        raise OSError(28, "No space left on device")

    behind = WriteBehind(full)
    behind.put("a", torch.ones(3))
    with pytest.raises(OSError, match="No space left"):
        for _ in range(10):
            behind.put("b", torch.ones(3))
        behind.finish()
    behind.close()
    assert not ours_alive()


def test_stream_names_the_tensor_and_the_store():
    a = DictStore({"x": torch.ones(2, 2), "y": torch.ones(2)}, "a.safetensors")
    b = DictStore({"x": torch.ones(2, 2), "y": torch.tensor([1.0, float("nan")])}, "b.safetensors")
    with pytest.raises(WeightsmithError, match=r"tensor 'y' in b\.safetensors contains NaN"):
        stream([a, b], lambda n, ts: ts[0], check_finite=True)
    with pytest.raises(WeightsmithError, match=r"merging tensor 'x' failed: boom"):
        stream([a, b], lambda n, ts: (_ for _ in ()).throw(RuntimeError("boom")), verb="merging")
    assert not ours_alive()


def test_stream_writes_chosen_results_and_copies_the_rest(tmp_path):
    a = DictStore({"w": torch.ones(4, 4), "ids": torch.arange(4), "b": torch.zeros(4)}, "a")
    c = DictStore({"w": 3 * torch.ones(4, 4), "ids": torch.arange(4), "b": torch.ones(4)}, "c")
    with ShardWriter(tmp_path / "out") as writer:
        stream([a, c], lambda n, ts: ts[0] + ts[1], chosen={"w"}, writer=writer, dtype=torch.float16)
    got = open_store(tmp_path / "out")
    assert torch.equal(got["w"], torch.full((4, 4), 4.0, dtype=torch.float16))
    assert torch.equal(got["b"], torch.zeros(4, dtype=torch.float16))  # copied from the first store, cast
    assert got["ids"].dtype == torch.int64


def test_map_weights_is_unchanged(tmp_path):
    a = DictStore({"w": torch.ones(3, 3), "v": torch.ones(3)})
    b = DictStore({"w": 2 * torch.ones(3, 3), "v": torch.ones(3)})
    sums = map_weights(lambda x, y: float((x + y).sum()), a, b)
    assert sums == {"w": 27.0, "v": 6.0}
    with pytest.raises(WeightsmithError, match="tensor 'w'"):
        map_weights(lambda x: x @ torch.ones(2, 2), a)
    assert map_weights(lambda x: float(x.sum()), a, prefetch_bytes=1 << 20) == {"w": 9.0, "v": 3.0}


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "banana"])
def test_bad_devices_are_named(device):
    with pytest.raises(WeightsmithError, match="device"):
        resolve_device(device)
