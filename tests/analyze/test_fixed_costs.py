"""The fixed costs of an analysis: CUDA warm-up, reading to the device without pinned memory, the solver
streams. The CUDA tests run only where CUDA is (the GPU machine: ``pytest tests/analyze/test_fixed_costs.py``)
and check the CUDA path against the CPU's float64 numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightsmith import linalg
from weightsmith.analyze import FarmsConfig, analyze_weights
from weightsmith.analyze.batches import read_host, to_device_batch
from weightsmith.store import DictStore, open_store

torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)

    def mat(m: int, n: int) -> torch.Tensor:
        spike = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
        return torch.randn(m, n, generator=g) / n**0.5 + 0.3 * spike

    bad = mat(64, 160)
    bad[1, 2] = float("nan")
    return {
        **{f"layers.{i}.up.weight": mat(160, 64).to(torch.bfloat16) for i in range(5)},
        **{f"layers.{i}.down.weight": mat(64, 160) for i in range(3)},
        "layers.9.bad.weight": bad,
        "layers.9.norm.weight": torch.ones(64),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_warm_up_is_a_no_op_without_cuda() -> None:
    linalg.warm_up_cuda("cpu")
    linalg.warm_up_cuda("cuda")
    assert linalg._WARMING == {} and linalg._POOL == {}


def test_warm_up_runs_once_in_the_background_and_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The orchestration of ``warm_up_cuda`` (one thread per device and stream count, joined by the
    first eigensolve), with the CUDA work replaced by a recorder."""
    import threading
    import time

    calls: list[tuple[int, int, str]] = []

    def fake_pool(index: int, streams: int) -> None:
        time.sleep(0.2)
        calls.append((index, streams, threading.current_thread().name))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(linalg, "_solver_pool", fake_pool)
    monkeypatch.setattr(linalg, "_WARMING", {})
    linalg.warm_up_cuda("cuda", 4)
    linalg.warm_up_cuda(torch.device("cuda", 0), 4)  # already warming: no second thread
    linalg.warm_up_cuda("cuda:1", 2)
    assert sorted(linalg._WARMING) == [(0, 4), (1, 2)] and calls == []
    linalg._wait_warm_up(0)
    assert (0, 4, "weightsmith-cuda-warm-up") in calls and list(linalg._WARMING) == [(1, 2)]
    linalg._wait_warm_up(1)
    assert len(calls) == 2 and linalg._WARMING == {}


def test_host_batches_are_stacked_short_side_first_in_float32() -> None:
    w = _weights()
    host = read_host(DictStore(w), ["layers.0.up.weight", "layers.0.down.weight"])
    W = to_device_batch(host, torch.device("cpu"))
    assert W.shape == (2, 64, 160) and W.dtype == torch.float32
    torch.testing.assert_close(W[0], w["layers.0.up.weight"].float().T)


@cuda
@pytest.mark.parametrize("streams", [1, 4])
def test_cuda_from_safetensors_matches_cpu(tmp_path: Path, streams: int) -> None:
    """Read to the device without pinning (``read_device``), eigensolves over streams (``out=`` slices,
    no record_stream), the CUDA warm-up thread: the same records as on CPU (float64 on both, so that
    round-off cannot move a KS-optimal xmin)."""
    save_file(_weights(), tmp_path / "m.safetensors")
    store = open_store(tmp_path / "m.safetensors")
    f64 = FarmsConfig(precision="float64")
    ref = {m["name"]: m for m in analyze_weights(store, device="cpu", farms_config=f64).matrices}
    for _ in range(2):  # the second run reuses the solver pool and the copy stream
        res = analyze_weights(
            store,
            device="cuda",
            streams=streams,
            max_batch_bytes=3 * 64 * 160 * 4,
            precision="float64",
            farms_config=f64,
        )
        got = {m["name"]: m for m in res.matrices}
        assert got.keys() == ref.keys()
        assert [s["name"] for s in res.skipped] == ["layers.9.bad.weight", "layers.9.norm.weight"]
        for name, m in got.items():
            for key in (
                "alpha",
                "log_norm",
                "log_spectral_norm",
                "stable_rank",
                "farms_alpha",
                "mp_softrank",
            ):
                assert m[key] == pytest.approx(ref[name][key], rel=1e-6), (name, key)
            assert m["num_pl_spikes"] == ref[name]["num_pl_spikes"], name
    assert res.device == "cuda"


@cuda
def test_cuda_store_of_device_tensors_is_not_copied() -> None:
    w = {k: v.cuda() for k, v in _weights().items()}
    ref = {
        m["name"]: m
        for m in analyze_weights(DictStore({k: v.cpu() for k, v in w.items()}), device="cpu").matrices
    }
    got = analyze_weights(DictStore(w), device="cuda:0", precision="float64", farms=False).matrices
    assert {m["name"] for m in got} == set(ref)
    for m in got:
        assert m["alpha"] == pytest.approx(ref[m["name"]]["alpha"], rel=1e-6)
