"""A method's one-time start-up (Triton's import and first launch, cuSOLVER's and cuBLAS's library loads) run
in a side thread while the model loads, so that the first real call in a fresh process does not pay it
(docs/design.md, "A start-up cost is part of a path's cost").

The CLI starts it before ``load_model`` (a load is I/O and copies that release the GIL); the method waits for
it (:meth:`WarmUp.wait`) before its own first launch, so the two never compile or launch the same kernel at
once. A failure in the thread is logged at debug level and changes nothing: the real call pays the start-up
as before.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
WAIT_S = 60.0  # the longest a real call waits for a warm-up still running (an empty Triton cache compiles)


class WarmUp:
    """One warm-up at a time for one method, started by :meth:`start`, awaited by :meth:`wait`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # at exit, a warm-up still in Triton's compiler (C++, outside the GIL) finishes first: tearing the
        # interpreter and the CUDA context down under it could crash the process after its work is done
        atexit.register(self.wait)

    def start(self, fn: Callable[[], object]) -> threading.Thread | None:
        """Run ``fn`` in a daemon thread; None when one is running already."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return None
            thread = threading.Thread(target=self._run, args=(fn,), name=f"warm-{self.name}", daemon=True)
            self._thread = thread
            thread.start()
            return thread

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # a warm-up never fails the run: the real call starts up as before
            log.debug("%s warm-up failed: %s", self.name, exc)

    def wait(self) -> None:
        """Return once no warm-up is running (at most :data:`WAIT_S`); immediate when none was started."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(WAIT_S)


def warm_up(config: object, device: str | torch.device) -> threading.Thread | None:
    """Start ``config``'s one-time start-up on ``device`` in a side thread; call it before loading the model,
    as ``weightsmith compress`` does. RTN: its fused kernel (:func:`._rtn_choice.prime`); GPTQ: its block
    kernel and cuSOLVER (``GPTQ.warm_up``). Returns the thread, or None where the method has no start-up to
    warm there (another method, a device that is not CUDA, Triton missing)."""
    dev = torch.device(device)
    if callable(getattr(config, "fused_quantize", None)):
        from ._rtn_choice import prime

        return prime(config, dev)
    method_warm_up = getattr(config, "warm_up", None)
    return method_warm_up(dev) if callable(method_warm_up) else None
