"""Speed, memory and agreement of the mergekit-parity methods against mergekit 0.1.5, on the same YAML.

    python benchmarks/bench_merge_parity.py DIR [--size small|1b] [--device cpu|cuda] [--methods a,b]
                                                [--dtype bfloat16|float32] [--json OUT.json]

Generates (once) the random Llama-shaped base and 4 "fine-tunes" of ``bench_merge.py`` under DIR, then
for each method writes one mergekit YAML and runs it with mergekit and with weightsmith (the code path
of ``weightsmith merge FILE OUT``), each in its own subprocess so that peak RSS (ru_maxrss) is per run.
Reports seconds (the fastest of ``--repeat`` runs, imports excluded), peak RSS (and GPU peak), and the
largest |ours - mergekit| relative to max |mergekit| over all tensors (DELLA draws its random masks in
a different order, so its difference is not a parity number).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, generate  # noqa: E402


def configs(root: Path, size: str, dtype: str) -> dict[str, dict]:
    b, ft = str(root / "base"), [str(root / f"ft{j}") for j in range(1, 5)]
    layers = SIZES[size]["layers"]
    half = layers // 2
    common = {"dtype": dtype}
    return {
        "slerp": {
            **common,
            "merge_method": "slerp",
            "base_model": ft[0],
            "slices": [
                {
                    "sources": [
                        {"model": ft[0], "layer_range": [0, layers]},
                        {"model": ft[1], "layer_range": [0, layers]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "model_stock": {
            **common,
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": m} for m in ft],
        },
        "della": {
            **common,
            "merge_method": "della",
            "base_model": b,
            "models": [
                {"model": m, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for m in ft
            ],
            "parameters": {"lambda": 1.0},
        },
        "nuslerp": {
            **common,
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [
                {"model": ft[0], "parameters": {"weight": 0.4}},
                {"model": ft[1], "parameters": {"weight": 0.6}},
            ],
        },
        "passthrough": {
            **common,
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": ft[0], "layer_range": [0, half + 1]}]},
                {"sources": [{"model": ft[1], "layer_range": [half - 1, layers]}]},
            ],
        },
    }


def worker(tool: str, method: str, root: Path, device: str, size: str, dtype: str, repeat: int) -> None:
    """Runs in a subprocess; prints one JSON line."""
    import shutil

    if device == "cpu":
        torch.set_num_threads(1)
    os.environ["WEIGHTSMITH_PROGRESS"] = "0"
    cfg = configs(root, size, dtype)[method]
    out = root / f"out-{tool}-{method}"
    if tool == "mergekit":  # imports before the clock: the times are merge work, not start-up
        from bench_merge import mergekit_options
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge

        opts = mergekit_options(device)

        def once() -> None:
            run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    else:
        import yaml

        from weightsmith.merge.recipe import run

        path = root / f"{method}-{dtype}.yaml"
        path.write_text(yaml.safe_dump(cfg))

        def once() -> None:  # exactly what `weightsmith merge FILE OUT` runs
            run(path, out, device=device, shard_size=2 * 10**9)

    times = []
    for _ in range(repeat):  # the machine may be shared: report the fastest of `repeat` runs
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    print(
        json.dumps(
            {"tool": tool, "method": method, "seconds": seconds, "peak_rss_mb": peak, "gpu_peak_mb": gpu_peak}
        )
    )


def spawn(tool: str, method: str, root: Path, device: str, size: str, dtype: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, method, str(root), device, size, dtype, str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{tool} {method} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(root: Path, method: str) -> float:
    """Max |ours - mergekit| relative to max |mergekit| over all tensors (inf if the names differ)."""
    from weightsmith.store import open_store

    a, b = open_store(root / f"out-weightsmith-{method}"), open_store(root / f"out-mergekit-{method}")
    if sorted(a) != sorted(b):
        return float("inf")
    worst = 0.0
    for name in b:
        x, y = a[name].float(), b[name].float()
        worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12))
    return worst


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        tool, method, root, device, size, dtype, repeat = sys.argv[2:9]
        worker(tool, method, Path(root), device, size, dtype, int(repeat))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default="slerp,model_stock,della,nuslerp,passthrough")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and method; the fastest counts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    generate(args.dir, args.size, device="cuda" if args.device.startswith("cuda") else "cpu")
    rows = []
    for method in args.methods.split(","):
        for tool in ("mergekit", "weightsmith"):
            rows.append(spawn(tool, method, args.dir, args.device, args.size, args.dtype, args.repeat))
            print(json.dumps(rows[-1]), flush=True)
        rows[-1]["max_rel_diff_vs_mergekit"] = compare(args.dir, method)
        mk, ws = rows[-2], rows[-1]
        print(
            f"{method:12s} mergekit {mk['seconds']:7.2f} s {mk['peak_rss_mb']:8.0f} MB | weightsmith "
            f"{ws['seconds']:7.2f} s {ws['peak_rss_mb']:8.0f} MB | "
            f"speed-up {mk['seconds'] / ws['seconds']:.2f}x"
            f" | rel diff {ws['max_rel_diff_vs_mergekit']:.2e}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
