"""How many threads torch's CPU kernels use: the CPUs this process may run on, not the machine's.

torch sizes its intra-op pool from the machine's cores and OpenMP workers spin-wait at the end of each
parallel region. When another process keeps a core busy, a pool as wide as the machine stalls at every
barrier on the thread that lost its core: on a 2-core machine ``weightsmith analyze minilm`` went from
3.7 s to 24-62 s beside one spinning process, and back to 3.7 s with ``OMP_NUM_THREADS=1``
(benchmarks/RESULTS.md, "CPU threads"). So the count is taken from what the process may really use:

1. an explicit choice wins: ``configure(n)`` (the ``--threads`` option), else ``WEIGHTSMITH_THREADS``,
   else ``OMP_NUM_THREADS`` (torch already read it; it is left as it is);
2. otherwise ``min(CPUs in the affinity mask, cgroup v2 ``cpu.max`` quota rounded down, MAX_AUTO)``,
   less one when the machine is busy (its 1-minute load average reaches the CPUs available) and more
   than one CPU is available, so the pool never waits on a core another process holds.

The OpenMP spin-wait itself (``OMP_WAIT_POLICY``) is read when torch is loaded, before any of this runs;
set it in the environment to change it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import WeightsmithError

MAX_AUTO = 8  # beyond this, small-matrix work gains little and a shared machine loses more
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota if one is
    set (``"quota period"``, e.g. ``"150000 100000"`` is 1.5 CPUs, counted as 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _explicit() -> tuple[int, str] | None:
    for var in ("WEIGHTSMITH_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var)
        if value is None or value.strip() == "":
            continue
        try:
            n = int(value)
        except ValueError:
            raise WeightsmithError(f"{var}={value!r} is not a whole number of threads") from None
        if n < 1:
            raise WeightsmithError(f"{var}={value!r}: the thread count must be at least 1")
        return n, var
    return None


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """The automatic intra-op thread count for ``cpus`` available CPUs under a 1-minute ``load``."""
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    n = min(cpus, MAX_AUTO)
    if n > 1 and load >= cpus:  # every CPU already has a runnable process: leave one to them
        n -= 1
    return max(1, n)


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op thread count once, at program start (see the module docstring); returns it.
    ``threads`` is an explicit count (the ``--threads`` option) and wins over the environment."""
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise WeightsmithError(f"--threads must be an integer of at least 1 (got {threads!r})")
        n = threads
    else:
        explicit = _explicit()
        n = explicit[0] if explicit is not None else auto_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
