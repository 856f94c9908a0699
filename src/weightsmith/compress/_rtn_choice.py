"""Which RTN path runs on a GPU: the fused Triton kernel (compress/_rtn_triton.py) or the torch batches
(:func:`._datafree._batched`), chosen by cost, and the kernel warmed up in the background.

Both paths give the same codes, scales, zeros and ``Ŵ`` bit for bit ("Quantizing deep convolutional networks
for efficient inference: A whitepaper", Krishnamoorthi, 2018, eq. 2-4, ``q = clamp(rint(w / s + z), 0,
2^b − 1)``, ``ŵ = (q − z) · s``, done step for step in float32 by both; compress/_datafree.py says why);
only the error ``‖W − Ŵ‖_F / ‖W‖_F`` is summed in another order. So the choice is about time alone. For
``n`` weights (``B = 4 n`` bytes of float32 weight: both paths do float32 arithmetic, and their time follows
the weight count, not the dtype)::

    kernel  = start + B / KERNEL_GBPS      start = 0 when every kernel variant the run needs is warm
    batches = B / TORCH_GBPS

and the kernel runs when ``kernel < batches``. A fresh process pays :data:`COLD_START_S` before its first
launch (importing Triton, Triton hashing its own files for its cache key, the disk-cache lookup and module
load); a process where Triton is already warm pays :data:`VARIANT_START_S` for each variant it has not
launched yet (the kernel is specialised on dtype, group size, grid type and tile shape). With the measured
rates the kernel pays a cold start back from about 16 G weights; warm, it wins at any size.

:func:`prime` starts that start-up in a daemon thread before the model loads (a load takes seconds; the
start-up about half a second), so that by the time the weights are quantised the kernel is warm; a call that
ran the batches because the kernel was cold primes it after them (:func:`primed_after`), for the next call.
The thread, the warm variants and the launches' turns are the one warm-up mechanism of compress
(:class:`._warmup.WarmUp`, :data:`WARM_UP`): the main thread never waits for a priming, it only looks
(:func:`start_seconds`), and a priming still compiling at exit is joined, bounded, by it.
``WEIGHTSMITH_RTN_KERNEL=auto|triton|torch`` (or a config's ``kernel`` field, where the method has one)
forces either path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import WeightsmithError
from ..linalg import on_device
from ._warmup import WarmUp

ENV = "WEIGHTSMITH_RTN_KERNEL"
MODES = ("auto", "triton", "torch")
# Measured on an H200, the 154 decoder linears of a 1.1B Llama (0.97 G weights, 3.88 GB as float32), best of
# 3 in a warm process (bench_rtn_kernel.py; docs/compress.md "Where the model lives"): the torch batches take
# 0.0326 s (fp32; 0.0355 s bf16) and the fused kernel 0.0051 s (fp32; 0.0045 s bf16). In GB of float32 weight
# a second:
TORCH_GBPS = 119.0  # 3.88 GB / 0.0326 s
KERNEL_GBPS = 760.0  # 3.88 GB / 0.0051 s
# The kernel's first call in a fresh process (warm Triton disk cache), the same model through ws.compress:
# 0.498 s against 0.020 s from the second call (fp32), 0.469 against 0.013 s (bf16): about 0.45 s once a
# process (Triton's import 0.14-0.16 s, the rest its first launch; benchmarks/RESULTS.md, "RTN as one fused
# Triton kernel"). An empty Triton cache costs more (1.5 s): the estimate assumes a warm disk cache.
COLD_START_S = 0.45
# A variant not launched yet in a process where Triton is warm: the disk-cache lookup and module load, 0.11 s
# of the profiled 0.57 s first launch (the rest, 0.36 s of cache key and 0.10 s of gluon import, is once a
# process; run 28's cProfile of the first launch, docs/compress.md)
VARIANT_START_S = 0.11
# Where the rates above were measured: elsewhere (the CPU under Triton's interpreter, which the tests use)
# ``auto`` runs the kernel wherever it can
COSTED_DEVICES = ("cuda",)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# RTN's priming threads (keyed by method, device, grid and dtypes), the kernel variants launched in this
# process (keyed by :func:`variant`; any marked: Triton imported, its cache key computed and one launch
# checked) and the lock a priming holds around its launches (:func:`serialised`)
WARM_UP = WarmUp("rtn")


def _given(config: object | None) -> object | None:
    """The config's ``kernel`` option where it sets one (``auto`` defers to the variable)."""
    given = getattr(config, "kernel", None)
    return None if given is None or str(given).strip().lower() == "auto" else given


def _option(config: object | None) -> str:
    """Where the mode comes from, as the user set it: the config's ``kernel`` option, else the variable."""
    return "option kernel" if _given(config) is not None else ENV


def kernel_mode(config: object | None = None) -> str:
    """``auto``, ``triton`` or ``torch``: the config's ``kernel`` field where it sets one, else
    ``$WEIGHTSMITH_RTN_KERNEL``, else ``auto``."""
    given = _given(config)
    raw = given if given is not None else os.environ.get(ENV, "auto")
    mode = str(raw).strip().lower()
    if mode not in MODES:
        raise WeightsmithError(f"{_option(config)}={raw!r}: use one of {', '.join(MODES)}")
    return mode


def triton_installed() -> bool:
    """Whether Triton would import, without importing it (a quarter of a second)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def variant(W: Tensor, group_size: int, symmetric: bool, bits: int) -> tuple[object, ...]:
    """What the kernel is compiled for when it quantises ``W``: its device, dtype, the grid type, whether it
    writes codes (:func:`._grid.exact_dtype`), the group length's specialisation, the launch's tile shape
    (:func:`._rtn_triton.launch_shape`) and the weight's 16-byte alignment. Imports Triton: call it only
    once Triton is warm or about to run."""
    from ._grid import exact_dtype
    from ._rtn_triton import launch_shape

    g = group_size or W.shape[-1]
    block_r, chunk, _ = launch_shape(max(1, W.numel() // g), g)
    # Triton specialises an integer argument on its divisibility by 16 (and on being 1), not its value
    return (
        str(W.device),
        W.dtype,
        bool(symmetric),
        not exact_dtype(bits, symmetric, W.dtype),
        g % 16 == 0,
        g == 1,
        block_r,
        chunk,
        W.data_ptr() % 16 == 0,
    )


def _grid(config: object) -> tuple[int, bool, int]:
    """The config's group size, grid type and bits: what :func:`variant` keys on besides the weight."""
    return (
        int(getattr(config, "group_size", 0)),
        bool(getattr(config, "symmetric", False)),
        int(getattr(config, "bits", 4)),
    )


def start_seconds(weights: Sequence[Tensor], config: object) -> float:
    """The kernel's start-up still to pay before it quantises ``weights`` in this process (seconds): 0 when
    every variant they need is warm, :data:`COLD_START_S` when Triton is not warm yet (then nothing here
    imports it), else :data:`VARIANT_START_S` a variant not launched yet."""
    if not WARM_UP.any_warm():
        return COLD_START_S
    grid = _grid(config)
    cold = {k for k in (variant(W, *grid) for W in weights) if not WARM_UP.is_warm(k)}
    return VARIANT_START_S * len(cold)


def kernel_pays(weights: Sequence[Tensor], config: object) -> bool:
    """Whether the fused kernel, with the start-up it still needs, beats the torch batches on ``weights``
    (the module docstring's cost model)."""
    gb = 4 * sum(W.numel() for W in weights) / 1e9
    return start_seconds(weights, config) + gb / KERNEL_GBPS < gb / TORCH_GBPS


def choose(config: object, dev: torch.device, weights: Sequence[Tensor] | None = None) -> bool:
    """Whether the fused kernel quantises ``weights`` (the weights of a resident run on ``dev``) rather than
    the torch batches: forced by :func:`kernel_mode`, else by cost on a device of :data:`COSTED_DEVICES`
    (:func:`kernel_pays`); with ``weights=None`` or on another device, wherever Triton imports. ``triton``
    forced where Triton does not import is an error naming the option."""
    mode = kernel_mode(config)
    if mode == "torch":
        return False
    if not triton_installed():
        if mode == "triton":
            raise WeightsmithError(f"{_option(config)}=triton needs triton (pip install triton)")
        return False
    if mode == "auto" and weights is not None and dev.type in COSTED_DEVICES:
        here = [W for W in weights if W.device.type == dev.type]
        if not kernel_pays(here, config):
            return False
    from ._rtn_triton import available  # imports Triton: only once the kernel is chosen

    if not available() and mode == "triton":
        raise WeightsmithError(f"{_option(config)}=triton: triton is installed but does not import")
    return available()


def serialised(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` (the kernel's entry) as it is when no priming thread is running, else a version that takes
    turns with it (:meth:`._warmup.WarmUp.in_turn`). The main thread then waits for the prime's launch, which
    only happens where the kernel was forced or the model is large enough to pay a start-up anyway."""
    return WARM_UP.in_turn(fn)


def launched(runs: Iterator[T], weights: Sequence[Tensor], config: object, dev: torch.device) -> Iterator[T]:
    """``runs`` (the fused path's) passed through; once they are all done, the variants of the weights the
    kernel took are marked warm, so that a later call in this process knows it pays no start-up."""
    yield from runs
    from ._rtn_triton import fusable

    grid = _grid(config)
    WARM_UP.mark_warm(variant(W, *grid) for W in weights if fusable(W, dev))


def primed_after(
    runs: Iterator[T], weights: Sequence[Tensor], config: object, dev: torch.device
) -> Iterator[T]:
    """``runs`` (the torch batches', chosen by cost because the kernel was cold) passed through; once they
    are done, the kernel is primed in the background for the dtypes of ``weights`` (where it would run and
    no priming is under way), so that a later call in this process finds it warm. The thread starts after
    the quantisation, never beside it: it would take the GIL from the batches' launches (docs/compress-
    first-call.md)."""
    yield from runs
    # prime() checks the rest (a fused kernel, mode, Triton)
    if not WARM_UP.running() and dev.type in COSTED_DEVICES:
        prime(config, dev, sorted({W.dtype for W in weights if W.device.type == dev.type}, key=str))


def _probe(group_size: int, dtype: torch.dtype, dev: torch.device) -> Tensor:
    """A tiny weight whose launch is the variant a real weight of that group size gets: as many group rows
    as a program takes (per channel: 2048 columns, the longest chunk). Drawn from its own generator, so the
    caller's random state is untouched."""
    from ._rtn_triton import launch_shape

    g = group_size or 2048
    block_r, _, _ = launch_shape(1 << 20, g)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(block_r, g, generator=gen).to(dev, dtype)


def _prime(config: Any, dev: torch.device, dtypes: Sequence[torch.dtype]) -> None:
    """The priming thread's work: import Triton, compile and launch the kernel once a dtype on a tiny weight
    and check its ``Ŵ`` against the torch path's; mark the variant warm only when equal. A failure (raised:
    :class:`._warmup.WarmUp` logs it at debug level; or a ``Ŵ`` that differs: logged here) leaves the variant
    cold (the torch batches keep running)."""
    from ._rtn_triton import DTYPES

    grid = _grid(config)
    with on_device(dev):
        for dtype in (d for d in dtypes if d in DTYPES):
            W = _probe(grid[0], dtype, dev)
            key = variant(W, *grid)
            _, W_hat = config.batched_quantize(W.to(torch.float32, copy=True)[None])  # torch's Ŵ
            with WARM_UP.turn:
                _, err = config.fused_quantize([W])  # overwrites W with its Ŵ in dtype
            # this thread's own stream (the device's default one here): waits for these launches only
            if not (torch.equal(W, W_hat[0].to(dtype)) and bool(torch.isfinite(err).all())):
                log.debug("RTN kernel priming on %s, %s: Ŵ differs from the torch path's", dev, dtype)
                return
            WARM_UP.mark_warm([key])


def prime(
    config: object,
    device: str | torch.device,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
) -> threading.Thread | None:
    """Warm the fused RTN kernel for ``config`` (its bits, group size and grid) on ``device`` in a daemon
    thread of :data:`WARM_UP`, one tiny launch a dtype of ``dtypes``; return the thread, or None where the
    kernel would not run (no ``fused_quantize``, a device outside ``_datafree.FUSED_DEVICES``, ``torch``
    forced, no Triton) or the same priming (device, grid, dtypes) is running already. Start it before
    loading the model: the kernel's start-up (about 0.45 s) then hides behind the load. CUDA work in the
    thread goes to that thread's current stream of ``device`` (the default stream: the probe touches only
    its own tensors); errors in it are logged at debug level and leave the kernel cold."""
    from ._datafree import FUSED_DEVICES

    dev = torch.device(device)
    has = callable(getattr(config, "fused_quantize", None)) and callable(
        getattr(config, "batched_quantize", None)
    )
    if not has or dev.type not in FUSED_DEVICES or kernel_mode(config) == "torch" or not triton_installed():
        return None
    dtypes = tuple(dtypes)
    key = (type(config).__qualname__, str(dev), _grid(config), dtypes)
    return WARM_UP.start(lambda: _prime(config, dev, dtypes), key)
