"""Where the first GPTQ compress in a process spends its extra time, phase by phase (synchronised), with the
warm-up started before the model is built (as the CLI does), against a second call: the random 1.1B float32
Llama of bench_compress.py in host memory, 4 bits, group 128, act order, 64 x 512 packaged-Hamlet tokens.

    PYTHONPATH=src python benchmarks/gptq_cold.py
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gptq_profile as profile  # noqa: E402

from weightsmith.compress import (  # noqa: E402
    GPTQ,
    _core,  # noqa: E402
    calibration_batches,
    warm_up,
)


def main() -> None:
    logging.disable(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = GPTQ(bits=4, group_size=128, act_order=True)
    t0 = time.perf_counter()
    warm_up(cfg, "cuda")  # before the model exists, as the CLI starts it before the load
    full = _core.calibration_text("hamlet")
    base, tok = profile.random_llama("1b", full)
    base = base.cpu()
    cut = full.rfind("\n", 0, int(len(full) * 0.9)) + 1
    text = Path(tempfile.mkdtemp()) / "calib.txt"
    text.write_text(full[:cut], encoding="utf-8")
    calib = calibration_batches(tok, str(text), 64, 512)
    print(f"setup {time.perf_counter() - t0:.1f} s")
    dev = torch.device("cuda")
    runs: list[tuple[float, dict[str, float]]] = []
    for _ in range(2):
        model = copy.deepcopy(base)
        phases = profile.Phases(dev)
        profile.instrument(phases)
        t = time.perf_counter()
        try:
            _core.compress(model, cfg, calib=calib, device=dev)
        finally:
            phases.restore()
        runs.append((time.perf_counter() - t, dict(phases.time)))
    (first, a), (second, b) = runs
    print(f"total first {first:.2f} s, second {second:.2f} s")
    for label in sorted(a, key=lambda k: b.get(k, 0.0) - a[k]):
        x, y = a[label], b.get(label, 0.0)
        print(f"{label:60s} first {x:.3f} second {y:.3f} extra {x - y:.3f}")


if __name__ == "__main__":
    main()
