"""Data-parallel calibration: ``torchrun --nproc_per_node 2 -m weightsmith compress`` (two gloo CPU processes)
splits the calibration windows, sums the statistics and gives the one-process result; rank 0 writes once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from weightsmith.compress import AWQ, GPTQ, calibration_batches, compress, load_compressed
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model

torch.set_num_threads(1)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTSMITH_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "weightsmith", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _one_process(tiny_dir, config, samples: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The same windows in one process, batched as the two processes batch their halves (4 windows each):
    the block inputs are then the same to the bit, and a sum of two per-process statistics is one addition.
    (Batched differently, GPTQ and AWQ change at float level: one process with 8-window batches differs from
    4-window batches by ~3 % relative on this random tiny model's MLP weights, from near-ties in AWQ's clip
    search and GPTQ's error feedback, so that is no reference for a data-parallel run.)"""
    net, tok = load_model(tiny_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (another test may have changed it in this process)
    try:
        calib = calibration_batches(tok, "hamlet", samples, seq_len, batch_size=samples // 2)
        compress(net, config, calib=calib)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sum(k.startswith("model.layers.") and k.endswith("proj.weight") for k in ref) == 14
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_processes_equal_one_and_write_once(tiny_dir, tmp_path):
    out = tmp_path / "q"
    args = "--method gptq --bits 4 --group-size 32 --samples 8 --seq-len 32 --device cpu --out"
    r = _torchrun(["compress", str(tiny_dir), *args.split(), str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # one output, no staging leftovers
    assert r.stdout.count("written to") == 1  # only rank 0 writes and reports
    got = load_compressed(out).state_dict()
    _compare(got, _one_process(tiny_dir, GPTQ(bits=4, group_size=32), samples=8, seq_len=32))


@pytest.mark.slow
def test_recipe_under_torchrun_gathers_awq_rows_and_a_failing_step_writes_nothing(tiny_dir, tmp_path):
    """AWQ keeps 192 captured input rows, gathered in rank order (rank 0 holds only 128); the recipe's
    second step fails on every rank (fewer windows than processes) after the first has written."""
    (tmp_path / "r.yaml").write_text(
        f"model: {tiny_dir}\n"
        "steps:\n"
        "  - compress: {method: awq, bits: 3, group_size: 32, n_grid: 5, rows: 192, samples: 8, seq_len: 32,"
        " out: awq}\n"
        "  - compress: {method: gptq, group_size: 32, samples: 1, seq_len: 32, out: gptq}\n"
    )
    r = _torchrun(["recipe", str(tmp_path / "r.yaml")])
    assert r.returncode != 0
    assert "step 2 (compress): --samples 1: fewer calibration windows than the 2" in " ".join(
        r.stderr.split()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "r.yaml"]
    got = load_compressed(tmp_path / "awq").state_dict()
    _compare(
        got, _one_process(tiny_dir, AWQ(bits=3, group_size=32, n_grid=5, rows=192), samples=8, seq_len=32)
    )


def test_shares_of_the_windows_are_the_one_process_windows(tiny_dir):
    _, tok = load_model(tiny_dir)
    whole = torch.cat([b["input_ids"] for b in calibration_batches(tok, "hamlet", 5, 16, batch_size=2)])
    parts = [
        torch.cat(
            [b["input_ids"] for b in calibration_batches(tok, "hamlet", 5, 16, 2, rank=r, world_size=3)]
        )
        for r in range(3)
    ]
    assert [len(p) for p in parts] == [1, 2, 2]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(WeightsmithError, match="--samples 2: fewer calibration windows than the 3"):
        calibration_batches(tok, "hamlet", 2, 16, rank=0, world_size=3)


def test_methods_with_their_own_calibration_passes_are_refused_under_torchrun(tiny_dir, tmp_path):
    from weightsmith.compress import FWSVD, RTN, BitStack
    from weightsmith.compress.step import CompressStep
    from weightsmith.distributed import World

    assert GPTQ().data_parallel() and AWQ().data_parallel() and RTN().data_parallel()
    assert not FWSVD().data_parallel() and not BitStack().data_parallel()
    step = CompressStep.build({"method": "fwsvd"}, tmp_path / "f", samples=2, seq_len=16)
    net, tok = load_model(tiny_dir)
    with pytest.raises(WeightsmithError, match="--method fwsvd: its calibration does not run data-parallel"):
        step.execute(net, tok, torch.device("cpu"), World(rank=0, size=2))
    assert list(tmp_path.iterdir()) == []
