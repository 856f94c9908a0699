"""Where analyze's time goes, stage by stage (synchronised timers), on one device.

    python benchmarks/profile_analyze.py --model smollm2 --device cpu --threads 1
    python benchmarks/profile_analyze.py --model llama1b --device cuda --precision float32 --streams 4

Stages per same-shaped batch: read (store to host), to_device (stack as float32 on the device),
esd (Gram + symmetric eigensolver), powerlaw (KS-optimal xmin fit), metrics, mp (Marchenko-Pastur fit),
farms. The model choices and ``--workdir`` are those of bench_analyze.py (which builds the random ones).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from bench_analyze import _threads, build_llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "smollm2-random", "llama1b"], required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--streams", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/weightsmith-bench")
    args = ap.parse_args()
    _threads(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from weightsmith import models
    from weightsmith.analyze.batches import (
        candidate_matrices,
        read_host,
        shape_batches,
        short_side_first,
        to_device_batch,
    )
    from weightsmith.analyze.farms import farms_alpha
    from weightsmith.analyze.mp import marchenko_pastur_fit
    from weightsmith.analyze.powerlaw import fit_power_law
    from weightsmith.analyze.run import eig_dtype
    from weightsmith.analyze.spectrum import esd, norm_metrics
    from weightsmith.execute import resolve_device
    from weightsmith.store import open_store

    dev = resolve_device(None if args.device == "auto" else args.device)
    cuda = dev.type == "cuda"
    dtype = eig_dtype(args.precision, dev)
    streams = args.streams or (4 if cuda else 1)
    if args.model == "smollm2":
        store = models.open_weights("smollm2")
    else:
        store = open_store(build_llama(Path(args.workdir) / args.model, args.model))
    names, _ = candidate_matrices(store, None)
    totals: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn, *a, **kw):  # type: ignore[no-untyped-def]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*a, **kw)
        if cuda:
            torch.cuda.synchronize()
        totals[stage] += time.perf_counter() - t
        return out

    esd(torch.randn(2, 32, 64, device=dev), dtype, streams)  # warm-up: solver handles, stream pool
    for (M, N), members in shape_batches(store, names, (1 << 30) if cuda else (1 << 27)):
        host = timed("read", read_host, store, members, cuda)
        if cuda:
            W = timed("to_device", to_device_batch, host, dev)
            evals = timed("esd", esd, W, dtype, streams)
        else:
            mats = [short_side_first(t) for t in host]
            evals = timed("esd", lambda m=mats: torch.stack([esd(w, dtype) for w in m]))
            W = timed("to_device", lambda m=mats: torch.stack([w.float() for w in m]))
        ev = evals.double()
        fit = timed("powerlaw", fit_power_law, ev)
        timed("metrics", norm_metrics, ev, fit.alpha)
        timed("mp", marchenko_pastur_fit, ev, N, M)
        timed("farms", farms_alpha, W, None, dtype, streams)
    row = {"model": args.model, "device": str(dev), "dtype": str(dtype), "streams": streams}
    row |= {k: round(v, 3) for k, v in totals.items()}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
