"""The side-thread warm-up of a method's start-up (compress/_warmup.py) and GPTQ's use of it."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from weightsmith.compress import GPTQ
from weightsmith.compress import gptq as gptq_module
from weightsmith.compress._warmup import WarmUp
from weightsmith.compress.gptq import gptq_quantize

torch.set_num_threads(1)


def test_warm_up_runs_once_at_a_time_and_never_raises(caplog):
    warm, release, ran = WarmUp("t"), threading.Event(), []
    first = warm.start(lambda: release.wait(5) and ran.append(1))
    assert first is not None and warm.start(lambda: ran.append(2)) is None  # one at a time
    release.set()
    warm.wait()
    assert ran == [1] and not first.is_alive()
    with caplog.at_level(logging.DEBUG, logger="weightsmith.compress._warmup"):
        failing = warm.start(lambda: 1 / 0)
        assert failing is not None
        warm.wait()
    assert "t warm-up failed: division by zero" in caplog.text
    WarmUp("idle").wait()  # nothing started: returns at once


def test_gptq_waits_for_a_running_warm_up(monkeypatch):
    """A real GPTQ call starts only once a warm-up still running has finished (they would otherwise compile
    and launch the same kernel at once)."""
    warm = WarmUp("gptq")
    monkeypatch.setattr(gptq_module, "WARM_UP", warm)
    done = []
    warm.start(lambda: (time.sleep(0.3), done.append(time.perf_counter())))
    W, X = torch.randn(8, 32), torch.randn(64, 32)
    gptq_quantize(W, X.T @ X, 4, 16)
    assert done and done[0] <= time.perf_counter()


def test_gptq_warm_up_only_on_cuda():
    assert GPTQ().warm_up(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_warm_up_on_the_gpu_runs_the_real_kernel(caplog):
    """The warm-up on the GPU finishes without a failure, leaves the caller's random state alone, and a GPTQ
    after it gives the codes of the eager loop."""
    state = torch.cuda.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger="weightsmith.compress._warmup"):
        thread = GPTQ(group_size=128).warm_up(torch.device("cuda"))
        assert thread is not None
        thread.join()
    assert "failed" not in caplog.text and torch.equal(state, torch.cuda.get_rng_state())
    W, X = torch.randn(32, 256, device="cuda"), torch.randn(512, 256, device="cuda")
    fused = gptq_quantize(W, X.T @ X, 4, 128)
    eager = gptq_quantize(W, X.T @ X, 4, 128, fused=False)
    assert torch.equal(fused.q, eager.q)


def test_warm_up_dispatches_to_the_methods_own(monkeypatch):
    """``weightsmith.compress.warm_up``: RTN through its kernel's priming, GPTQ through ``GPTQ.warm_up``,
    nothing for a method without a start-up or off CUDA."""
    from weightsmith.compress import HQQ, RTN, _rtn_choice, warm_up

    seen = []
    monkeypatch.setattr(_rtn_choice, "prime", lambda cfg, dev: seen.append(("rtn", dev.type)))
    monkeypatch.setattr(GPTQ, "warm_up", lambda self, dev: seen.append(("gptq", dev.type)))
    warm_up(RTN(), "cuda")
    warm_up(GPTQ(), "cuda:0")
    assert seen == [("rtn", "cuda"), ("gptq", "cuda")]
    assert warm_up(HQQ(), "cuda") is None and seen == [("rtn", "cuda"), ("gptq", "cuda")]
    monkeypatch.undo()
    assert warm_up(RTN(), "cpu") is None and warm_up(GPTQ(), "cpu") is None
