"""A method's one-time start-up (Triton's import and first launch, cuSOLVER's and cuBLAS's library loads) run
in a side thread while the model loads, so that the first real call in a fresh process does not pay it
(docs/design.md, "A start-up cost is part of a path's cost"). One mechanism for every method
(docs/compress-first-call.md, "One warm-up"): GPTQ warms its block kernel, RTN primes its fused kernel's
variants (compress/_rtn_choice.py).

The CLI starts a warm-up before ``load_model`` (a load is I/O and copies that release the GIL), never beside a
running quantisation (the thread would take the GIL from its launches). A method either waits for it
(:meth:`WarmUp.wait`, GPTQ) before its own first launch, or only looks (:meth:`WarmUp.is_warm`, RTN) and
takes turns with it around launches (:meth:`WarmUp.in_turn`), so the two never compile or launch the same
kernel at once. A failure in the thread is logged at debug level and changes nothing: the real call pays the
start-up as before. At exit, warm-ups still running are joined for at most :data:`WAIT_S` in all.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
WAIT_S = 60.0  # the longest a real call or the exit waits for running warm-ups (an empty Triton cache)
T = TypeVar("T")
R = TypeVar("R")


class WarmUp:
    """A method's warm-ups: side threads started by :meth:`start`, one running at a time per ``key`` (what
    it warms, e.g. a kernel's variants: several keys may warm at once), awaited by :meth:`wait`; the keys
    found warm (:meth:`mark_warm`), asked without waiting (:meth:`is_warm`); and :attr:`turn`, the lock a
    warm-up holds around its launches, which the main thread takes too while one runs (:meth:`in_turn`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.turn = threading.Lock()
        self._threads: list[tuple[Hashable, threading.Thread]] = []
        self._warm: set[Hashable] = set()
        self._paid = threading.Event()
        self._lock = threading.Lock()  # guards _threads and _warm
        # at exit, a warm-up still in Triton's compiler (C++, outside the GIL) finishes first: tearing the
        # interpreter and the CUDA context down under it could crash the process after its work is done
        atexit.register(self.wait)

    def start(self, fn: Callable[[], object], key: Hashable = None) -> threading.Thread | None:
        """Run ``fn`` in a daemon thread; None when a warm-up of ``key`` is running already."""
        with self._lock:
            if any(k == key and t.is_alive() for k, t in self._threads):
                return None
            thread = threading.Thread(target=self._run, args=(fn,), name=f"warm-{self.name}", daemon=True)
            self._threads.append((key, thread))
            thread.start()
            return thread

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # a warm-up never fails the run: the real call starts up as before
            log.debug("%s warm-up failed: %s", self.name, exc)

    def threads(self) -> list[threading.Thread]:
        """Every warm-up thread started, oldest first (finished ones too)."""
        with self._lock:
            return [t for _, t in self._threads]

    def running(self) -> bool:
        """Whether any warm-up is running now (no waiting)."""
        return any(t.is_alive() for t in self.threads())

    def wait(self) -> None:
        """Return once no warm-up is running, waiting at most :data:`WAIT_S` in all; immediate when none
        runs. A warm-up thread calling it does not wait for itself."""
        deadline = time.monotonic() + WAIT_S
        for thread in self.threads():
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def mark_warm(self, keys: Iterable[Hashable]) -> None:
        """Record ``keys`` as warm in this process, and the start-up they share (an import, a cache key) as
        paid (:meth:`any_warm`), even when ``keys`` is empty."""
        with self._lock:
            self._warm.update(keys)
        self._paid.set()

    def is_warm(self, key: Hashable) -> bool:
        """Whether ``key`` was marked warm (no waiting)."""
        with self._lock:
            return key in self._warm

    def any_warm(self) -> bool:
        """Whether anything was marked warm: the start-up every key shares is paid (no waiting)."""
        return self._paid.is_set()

    def in_turn(self, fn: Callable[[T], R]) -> Callable[[T], R]:
        """``fn`` as it is when no warm-up runs, else a version that takes :attr:`turn` around each call, so
        that its launches and a running warm-up's never overlap (Triton's first launch in a process, its jit
        cache and lazily built driver, is not meant to run from two threads at once)."""
        if not self.running():
            return fn

        def in_turn(arg: T) -> R:
            with self.turn:
                return fn(arg)

        return in_turn


def warm_up(config: object, device: str | torch.device) -> threading.Thread | None:
    """Start ``config``'s one-time start-up on ``device`` in a side thread; call it before loading the model,
    as ``weightsmith compress`` does. RTN: its fused kernel (:func:`._rtn_choice.prime`); GPTQ: its block
    kernel and cuSOLVER (``GPTQ.warm_up``). Returns the thread, or None where the method has no start-up to
    warm there (another method, a device that is not CUDA, Triton missing) or the same warm-up is running
    already."""
    dev = torch.device(device)
    if callable(getattr(config, "fused_quantize", None)):
        from ._rtn_choice import prime

        return prime(config, dev)
    method_warm_up = getattr(config, "warm_up", None)
    return method_warm_up(dev) if callable(method_warm_up) else None
