"""The side-thread warm-up of a method's start-up (compress/_warmup.py): keyed threads, the keys found warm,
the launches' turns, the bounded wait at exit, and GPTQ's use of it (RTN's: test_rtn_first_call.py)."""

from __future__ import annotations

import atexit
import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

from weightsmith.compress import GPTQ, _warmup
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


def test_keys_warm_beside_each_other_and_are_asked_without_waiting():
    """One running warm-up a key, several keys at once; ``running``/``is_warm``/``any_warm`` answer at once
    while a warm-up blocks; marking no key still records the shared start-up as paid."""
    warm, go = WarmUp("k"), threading.Event()
    a = warm.start(lambda: go.wait(5) and warm.mark_warm(["a"]), key="a")
    assert a is not None and warm.start(lambda: None, key="a") is None
    b = warm.start(lambda: go.wait(5) and warm.mark_warm(["b1", "b2"]), key="b")
    assert b is not None and warm.threads() == [a, b] and warm.running()
    assert not warm.is_warm("a") and not warm.any_warm()  # asked while both block: no wait
    go.set()
    warm.wait()
    assert not warm.running() and warm.is_warm("a") and warm.is_warm("b2") and not warm.is_warm("c")
    again = warm.start(lambda: None, key="a")  # finished: the key may warm again
    assert again is not None and warm.threads() == [a, b, again]
    fresh = WarmUp("empty")
    fresh.mark_warm([])
    assert fresh.any_warm() and not fresh.is_warm("a")


def test_in_turn_takes_turns_only_while_a_warm_up_runs():
    warm, go = WarmUp("turns"), threading.Event()

    def launch(n: int) -> int:
        return n + 1

    assert warm.in_turn(launch) is launch  # none running: called as it is
    warm.start(go.wait)
    turned = warm.in_turn(launch)
    assert turned is not launch and turned(1) == 2
    got: list[int] = []
    with warm.turn:  # the warm-up is launching: the caller waits for its turn
        caller = threading.Thread(target=lambda: got.append(turned(2)))
        caller.start()
        caller.join(0.2)
        assert caller.is_alive() and got == []
    caller.join()
    go.set()
    warm.wait()
    assert got == [3] and warm.in_turn(launch) is launch


def test_wait_is_bounded_in_all_and_registered_at_exit(monkeypatch, caplog):
    """``wait`` (also the exit hook of every WarmUp) gives up after WAIT_S in all, not a thread, and a
    warm-up calling it does not wait for itself."""
    hooks: list[object] = []
    monkeypatch.setattr(atexit, "register", hooks.append)
    monkeypatch.setattr(_warmup, "WAIT_S", 0.5)
    warm, stop = WarmUp("stuck"), threading.Event()
    assert hooks == [warm.wait]
    warm.start(lambda: stop.wait(10), key=1)
    warm.start(lambda: stop.wait(10), key=2)
    t0 = time.perf_counter()
    warm.wait()
    waited = time.perf_counter() - t0
    assert 0.45 <= waited < 0.9 and warm.running()  # a bound a thread would have waited 1.0 s
    stop.set()
    warm.wait()
    with caplog.at_level(logging.DEBUG, logger="weightsmith.compress._warmup"):
        own = warm.start(warm.wait)  # joining itself would raise (and be logged as a failure)
        assert own is not None
        own.join(2)
    assert not own.is_alive() and "failed" not in caplog.text


EXITING = """
import time
from weightsmith.compress._warmup import WarmUp
WarmUp("exit").start(lambda: (time.sleep(0.5), print("finished", flush=True)))
print("main done", flush=True)
"""


def test_a_process_exits_only_once_its_warm_up_finished():
    """The exit hook in a real process: the main thread ends at once, the daemon warm-up still finishes
    (without the join, the interpreter would drop it mid-sleep)."""
    run = subprocess.run([sys.executable, "-c", EXITING], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["main", "done", "finished"], run.stderr[-2000:]


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
