"""Where analyze's time goes: stage by stage per batch, the fixed costs of a fresh process, and solvers.

    python benchmarks/profile_analyze.py --model smollm2 --device cpu --threads 1
    python benchmarks/profile_analyze.py --model llama1b --device cuda --precision float32 --streams 4
    python benchmarks/profile_analyze.py --model llama1b --device cuda --floor --solvers

Stages per same-shaped batch: read (store to host, or on CUDA to the device as ``analyze_weights`` reads:
``batches.read_device``), to_device (stack as float32 on the device), esd (Gram + symmetric eigensolver),
powerlaw (KS-optimal xmin fit), metrics, mp (Marchenko-Pastur fit), farms.

``--floor`` (run it in a fresh process, first) times what no analysis can avoid, in order: importing torch,
creating the CUDA context, loading cuBLAS/cuSOLVER (a 2x2 eigensolve and a GEMM), reading every matrix to
the device, and the Gram + eigensolve of every matrix with the default solver; their sum (``floor_total``;
``floor_read_hidden`` without the reading, which a real run overlaps with the eigensolves) is the floor of
``weightsmith analyze --no-farms --no-mp`` end to end (Python's own start included). ``--solvers``
then times the eigensolves of all plain Gram matrices and of all FARMS windows (the default ``FarmsConfig``)
for CUDA streams 1, 2, 4, 8, 16 and with MAGMA instead of cuSOLVER. The model choices and ``--workdir`` are
those of bench_analyze.py (which builds the random ones).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from bench_analyze import _threads, build_llama


def since_process_start() -> float:
    """Seconds since this process was created (Linux ``/proc``; 10 ms resolution), interpreter start
    included."""
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "smollm2-random", "llama1b", "tiny-random"], required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--streams", type=int, default=None)
    ap.add_argument("--floor", action="store_true", help="fixed costs of a fresh process (run it fresh)")
    ap.add_argument("--solvers", action="store_true", help="eigensolver streams x library sweep (CUDA)")
    ap.add_argument("--workdir", default="/tmp/weightsmith-bench")
    ap.add_argument("--out", default=None, help="append the JSON line here")
    args = ap.parse_args()
    _threads(args.threads)
    before_torch = since_process_start()
    t = time.perf_counter()
    import torch

    import_torch = time.perf_counter() - t
    if args.threads:
        torch.set_num_threads(args.threads)
    from weightsmith import models
    from weightsmith.analyze.batches import candidate_matrices, shape_batches
    from weightsmith.analyze.run import eig_dtype
    from weightsmith.execute import resolve_device
    from weightsmith.store import open_store

    dev = resolve_device(None if args.device == "auto" else args.device)
    dtype = eig_dtype(args.precision, dev)
    streams = args.streams or (4 if dev.type == "cuda" else 1)
    if args.model == "smollm2":
        store = models.open_weights("smollm2")
    else:
        store = open_store(build_llama(Path(args.workdir) / args.model, args.model))
    names, _ = candidate_matrices(store, None)
    batches = list(shape_batches(store, names, (1 << 30) if dev.type == "cuda" else (1 << 27)))
    row: dict[str, object] = {
        "model": args.model,
        "device": str(dev),
        "dtype": str(dtype),
        "streams": streams,
    }
    if args.floor:
        row["floor"] = floor(store, batches, dev, dtype, streams, before_torch, import_torch)
    else:
        row["stages"] = stages(store, batches, dev, dtype, streams)
    if args.solvers and dev.type == "cuda":
        row["solvers"] = solvers(store, batches, dev, dtype)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _sync(dev: object) -> None:
    import torch

    if getattr(dev, "type", "") == "cuda":
        torch.cuda.synchronize()


def floor(store, batches, dev, dtype, streams: int, before: float, import_torch: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds of each unavoidable step, in the order a fresh ``weightsmith analyze`` meets them."""
    import torch

    from weightsmith.analyze.batches import read_device, read_host, to_device_batch
    from weightsmith.analyze.spectrum import esd

    out = {"python_start": round(before, 3), "import_torch": round(import_torch, 3)}
    cuda = dev.type == "cuda"
    t = time.perf_counter()
    if cuda:
        torch.empty(1, device=dev)
        _sync(dev)
    out["cuda_context"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    a = torch.eye(2, device=dev, dtype=dtype)
    torch.linalg.eigvalsh(a @ a)
    _sync(dev)
    out["load_linalg_libraries"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    held = [read_device(store, m, dev) if cuda else read_host(store, m) for _, m in batches]
    _sync(dev)
    out["read_to_device"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    mats = [to_device_batch(h, dev) for h in held]
    _sync(dev)
    out["cast_and_stack"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    for W in mats:
        esd(W, dtype, streams)
    _sync(dev)
    out["gram_and_eigensolve"] = round(time.perf_counter() - t, 3)
    out["floor_total"] = round(sum(out.values()), 3)
    # reading overlaps the eigensolves in a real run (a read-ahead thread)
    out["floor_read_hidden"] = round(
        out["floor_total"] - min(out["read_to_device"], out["gram_and_eigensolve"]), 3
    )
    out["matrices"] = sum(len(m) for _, m in batches)
    return out


def stages(store, batches, dev, dtype, streams: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch

    from weightsmith.analyze.batches import read_device, read_host, short_side_first, to_device_batch
    from weightsmith.analyze.farms import farms_alpha
    from weightsmith.analyze.mp import marchenko_pastur_fit
    from weightsmith.analyze.powerlaw import fit_power_law
    from weightsmith.analyze.spectrum import esd, norm_metrics

    cuda = dev.type == "cuda"
    totals: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn, *a, **kw):  # type: ignore[no-untyped-def]
        _sync(dev)
        t = time.perf_counter()
        out = fn(*a, **kw)
        _sync(dev)
        totals[stage] += time.perf_counter() - t
        return out

    esd(torch.randn(2, 32, 64, device=dev), dtype, streams)  # warm-up: solver handles, stream pool
    for (M, N), members in batches:
        if cuda:
            host = timed("read", read_device, store, members, dev)
            W = timed("to_device", to_device_batch, host, dev)
            evals = timed("esd", esd, W, dtype, streams)
        else:
            host = timed("read", read_host, store, members)
            mats = [short_side_first(t) for t in host]
            evals = timed("esd", lambda m=mats: torch.stack([esd(w, dtype) for w in m]))
            W = timed("to_device", lambda m=mats: torch.stack([w.float() for w in m]))
        ev = evals.double()
        fit = timed("powerlaw", fit_power_law, ev)
        timed("metrics", norm_metrics, ev, fit.alpha)
        timed("mp", marchenko_pastur_fit, ev, N, M)
        timed("farms", farms_alpha, W, None, dtype, streams)
    return {k: round(v, 3) for k, v in totals.items()}


def solvers(store, batches, dev, dtype) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Eigensolve seconds of every plain Gram matrix and every FARMS window, per solver setting."""
    import torch

    from weightsmith.analyze.batches import read_device, to_device_batch
    from weightsmith.analyze.farms import FarmsConfig, window_grid
    from weightsmith.linalg import gram_eigvalsh

    plain, windows = [], []
    for _, members in batches:
        W = to_device_batch(read_device(store, members, dev), dev)
        plain.append(W)
        r, c, rs, cs = window_grid(W.shape[-2], W.shape[-1], FarmsConfig())
        windows.append(torch.stack([W[:, i : i + r, j : j + c] for i in rs for j in cs], 1).flatten(0, 1))
    out: dict[str, dict[str, float]] = {}
    for lib in ("cusolver", "magma"):
        try:
            torch.backends.cuda.preferred_linalg_library(lib)
        except RuntimeError as exc:
            out[lib] = {"error": str(exc)[:200]}  # type: ignore[dict-item]
            continue
        for streams in (1, 2, 4, 8, 16) if lib == "cusolver" else (1,):
            key = f"{lib}/streams={streams}"
            try:
                gram_eigvalsh(plain[0][:2], dtype, streams)  # warm-up of this setting
                row = {}
                for what, mats in (("plain", plain), ("farms_windows", windows)):
                    _sync(dev)
                    t = time.perf_counter()
                    for W in mats:
                        gram_eigvalsh(W, dtype, streams)
                    _sync(dev)
                    row[what] = round(time.perf_counter() - t, 3)
                out[key] = row
            except RuntimeError as exc:
                out[key] = {"error": str(exc)[:200]}  # type: ignore[dict-item]
            print(key, out[key], flush=True)
    torch.backends.cuda.preferred_linalg_library("default")
    return out


if __name__ == "__main__":
    main()
