"""weightsmith analyze vs WeightWatcher 0.7.x, side by side on the same machine and the same matrices.

    python benchmarks/bench_analyze.py --model smollm2 --device cpu --threads 1 --ww-mp
    python benchmarks/bench_analyze.py --model llama1b --device cuda --sweep
    python benchmarks/bench_analyze.py --device cuda --size 1b --e2e --repeats 3 --out e2e.jsonl

``--e2e`` times the command line end to end, each run a fresh process (``python -m weightsmith analyze
DIR --device D --out F``: interpreter start, imports, reading the safetensors shards, the analysis and
the JSON written), in four settings: ``plain`` (``--no-farms --no-mp``), ``farms`` (``--no-mp``), ``mp``
(``--no-farms``) and ``defaults`` (FARMS and MP fit), beside WeightWatcher 0.7.x in a fresh process on
the same matrices (reading them included; its ``analyze()`` call is also timed alone). Every setting runs
``--repeats`` times after one untimed run that warms the page cache; the minimum and median are kept.
Ratios: ``farms_over_plain`` (goal <= 1.5), ``defaults_over_mp``, and WeightWatcher's time over ours.
``floor`` is ``profile_analyze.py --floor`` in a fresh process: Python start, importing torch, the CUDA
context, loading cuBLAS/cuSOLVER, reading every matrix to the device and its Gram + eigensolve, each timed
alone; ``speedup_floor_vs_ww_process`` is the most any ``weightsmith analyze`` on that machine could reach.

``smollm2`` is the packaged SmolLM2-135M; ``llama1b`` is a randomly initialised Llama-shaped 1.1B model
(hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000) written tensor by tensor
to sharded safetensors (never materialised as a model); ``smollm2-random`` has SmolLM2's shapes with
random weights (for machines without the packaged asset). ``--layers N`` keeps the 2-D weights of the first
N decoder layers (plus the embeddings unless ``--no-embeddings``).

Same work for both: every selected 2-D weight as one in-memory float32 state dict (loading timed for
neither), WeightWatcher's default ``analyze()`` (power-law fit and norm metrics, no MP fit) against
ours with ``mp_fit=False, farms=False``; with ``--ww-mp`` also WeightWatcher ``analyze(mp_fit=True)``
against ours with the MP fit. Extra columns: ours reading the safetensors store (loading timed), ours
with FARMS, and with ``--sweep`` every eigensolver precision x CUDA streams setting. One warm-up call
of each tool on a 64x128 matrix precedes the timing. Writes a JSON line per run to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import sys
import time
from pathlib import Path


def _threads(n: int | None) -> None:
    if n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(n)


SHAPES = {
    # hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
    "llama1b": (2048, 22, 5632, 32, 4, 32000, False),
    "smollm2-random": (576, 30, 1536, 9, 3, 49152, True),
    "tiny-random": (256, 2, 704, 4, 2, 2000, False),  # a smoke test of the benchmark itself
}


def build_llama(out: Path, model: str, seed: int = 0) -> Path:
    """Random-init Llama-shaped weights (std 0.02, norms 1), written shard by shard in bfloat16."""
    import torch

    from weightsmith.store import ShardWriter

    if (out / "model.safetensors.index.json").is_file():
        return out
    h, layers, inter, heads, kv, vocab, tied = SHAPES[model]
    hd = h // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    with ShardWriter(out, max_shard_bytes=1 << 30, force=True) as w:
        w.add("model.embed_tokens.weight", rand(vocab, h))
        for i in range(layers):
            p = f"model.layers.{i}."
            w.add(p + "self_attn.q_proj.weight", rand(heads * hd, h))
            w.add(p + "self_attn.k_proj.weight", rand(kv * hd, h))
            w.add(p + "self_attn.v_proj.weight", rand(kv * hd, h))
            w.add(p + "self_attn.o_proj.weight", rand(h, heads * hd))
            w.add(p + "mlp.gate_proj.weight", rand(inter, h))
            w.add(p + "mlp.up_proj.weight", rand(inter, h))
            w.add(p + "mlp.down_proj.weight", rand(h, inter))
            w.add(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
            w.add(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        w.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
        if not tied:
            w.add("lm_head.weight", rand(vocab, h))
    return out


def select_names(store, layers: int | None, embeddings: bool) -> list[str]:
    names = []
    for n in store:
        shape = store.meta(n).shape
        if len(shape) != 2 or min(shape) < 10:
            continue
        m = re.search(r"\.layers\.(\d+)\.", n)
        if m is None and not embeddings:
            continue
        if m is not None and layers is not None and int(m.group(1)) >= layers:
            continue
        names.append(n)
    return names


def run_ww(state: dict, mp_fit: bool = False) -> tuple[float, dict[str, dict[str, float]]]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    start = time.perf_counter()
    details = ww.WeightWatcher(model=state).analyze(mp_fit=mp_fit)
    seconds = time.perf_counter() - start
    cols = ("alpha", "xmin", "num_pl_spikes", "mp_softrank")
    out = {
        f"{r.name}.weight": {c: float(getattr(r, c)) for c in cols if hasattr(r, c)}
        for r in details.itertuples()
    }
    return seconds, out


def agreement(ours: dict[str, dict], ww: dict[str, dict], names: list[str]) -> dict[str, float | int | None]:
    """alpha within 1%, relative alpha differences, same xmin (1%) and tail size, MP soft rank (2%)."""
    rel, xmin_ok, tail_ok, mp_ok, mp_n = [], 0, 0, 0, 0
    for n in names:
        a, b = ours.get(n, {}), ww.get(n, {})
        if a.get("alpha") is None or not math.isfinite(b.get("alpha", math.nan)) or b["alpha"] <= 0:
            continue
        rel.append(abs(a["alpha"] - b["alpha"]) / b["alpha"])
        xmin_ok += abs(a["xmin"] - b["xmin"]) <= 0.01 * abs(b["xmin"])
        tail_ok += a["num_pl_spikes"] == b["num_pl_spikes"]
        if a.get("mp_softrank") is not None and math.isfinite(b.get("mp_softrank", math.nan)):
            mp_n += 1
            mp_ok += abs(a["mp_softrank"] - b["mp_softrank"]) <= 0.02 * b["mp_softrank"]
    rel.sort()
    return {
        "alphas_compared": len(rel),
        "alpha_within_1pct": sum(r <= 0.01 for r in rel),
        "alpha_median_rel_diff": rel[len(rel) // 2] if rel else None,
        "alpha_max_rel_diff": rel[-1] if rel else None,
        "xmin_within_1pct": xmin_ok,
        "same_tail_size": tail_ok,
        "mp_softrank_within_2pct": f"{mp_ok}/{mp_n}" if mp_n else None,
    }


SIZES = {"1b": "llama1b", "135m": "smollm2-random", "tiny": "tiny-random"}
E2E_SETTINGS = {
    "plain": ["--no-farms", "--no-mp"],
    "farms": ["--no-mp"],
    "mp": ["--no-farms"],
    "defaults": [],
}


def ww_child(model_dir: str) -> None:
    """Run in a fresh process: read every 2-D weight of ``model_dir`` as float32, WeightWatcher's
    default ``analyze()``; print one JSON line of seconds."""
    t0 = time.perf_counter()
    from weightsmith.store import open_store

    store = open_store(model_dir)
    state = {n: store[n].float() for n in select_names(store, None, True)}
    t1 = time.perf_counter()
    analysis_s, _ = run_ww(state)
    print(json.dumps({"read_s": t1 - t0, "analysis_s": analysis_s, "matrices": len(state)}), flush=True)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def bytecode_cached() -> dict[str, bool]:
    """Whether torch's and weightsmith's modules have compiled bytecode next to them (or under
    ``PYTHONPYCACHEPREFIX``). Without it every fresh process compiles them again (seconds, for both tools:
    a profile on the GPU machine once showed ~1000 modules compiled, 2.2 s), which an installed package
    would not pay."""
    import importlib.util

    out = {}
    for mod in ("torch", "torch.nn.modules.module", "weightsmith.analyze.run"):
        spec = importlib.util.find_spec(mod)
        origin = spec.origin if spec is not None else None
        out[mod] = bool(origin) and os.path.exists(importlib.util.cache_from_source(origin))  # type: ignore[arg-type]
    return out


def end_to_end(model_dir: Path, device: str, repeats: int, ww: bool, workdir: Path) -> dict[str, object]:
    """Fresh-process wall times of ``weightsmith analyze`` per setting and of WeightWatcher."""
    import statistics

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out: dict[str, object] = {"repeats": repeats, "bytecode_cached": bytecode_cached()}
    for name, flags in E2E_SETTINGS.items():
        cmd = [sys.executable, "-m", "weightsmith", "analyze", str(model_dir), "--device", device,
               "--out", str(workdir / f"e2e-{name}.json"), "--force", *flags]  # fmt: skip
        _timed(cmd, env)  # warms the page cache (and CUDA's kernel cache)
        times = [_timed(cmd, env)[0] for _ in range(repeats)]
        out[f"{name}_seconds"] = round(min(times), 2)
        out[f"{name}_median_seconds"] = round(statistics.median(times), 2)
        print(f"weightsmith analyze ({name}): {times}", flush=True)
    out["farms_over_plain"] = round(out["farms_seconds"] / out["plain_seconds"], 2)  # type: ignore[operator]
    # the floor: what a fresh process cannot avoid (profile_analyze.py --floor), timed the same way
    prof = [sys.executable, str(Path(__file__).with_name("profile_analyze.py")), "--model", model_dir.name,
            "--device", device, "--workdir", str(model_dir.parent), "--floor"]  # fmt: skip
    try:
        floor = json.loads(_timed(prof, env)[1].strip().splitlines()[-1])["floor"]
    except (SystemExit, ValueError, KeyError, IndexError) as exc:  # the floor is extra: keep the rest
        floor = {"error": str(exc)[-500:]}
    out["floor"] = floor
    print(f"floor (fresh process: torch, CUDA, read, eigensolves): {floor}", flush=True)
    out["defaults_over_mp"] = round(out["defaults_seconds"] / out["mp_seconds"], 2)  # type: ignore[operator]
    if ww:
        cmd = [sys.executable, __file__, "--ww-child", str(model_dir)]
        total, stdout = _timed(cmd, env)
        child = json.loads(stdout.strip().splitlines()[-1])
        out |= {"ww_process_seconds": round(total, 2), "ww_analysis_seconds": round(child["analysis_s"], 2),
                "ww_read_seconds": round(child["read_s"], 2), "ww_matrices": child["matrices"]}  # fmt: skip
        if "floor_read_hidden" in floor:
            out["speedup_floor_vs_ww_process"] = round(total / floor["floor_read_hidden"], 1)
        for name in E2E_SETTINGS:
            ours = out[f"{name}_seconds"]
            out[f"speedup_{name}_vs_ww_process"] = round(total / ours, 1)  # type: ignore[operator]
            out[f"speedup_{name}_vs_ww_analysis"] = round(child["analysis_s"] / ours, 1)  # type: ignore[operator]
        print(f"WeightWatcher: process {total:.1f} s, analyze() {child['analysis_s']:.1f} s", flush=True)
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ww-child":
        ww_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", *SHAPES], default=None)
    ap.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="1b: llama1b, 135m: smollm2-random, tiny"
    )
    ap.add_argument("--e2e", action="store_true", help="time the CLI end to end in fresh processes")
    ap.add_argument("--repeats", type=int, default=3, help="timed fresh-process runs per --e2e setting")
    ap.add_argument("--no-ww", action="store_true", help="with --e2e: leave WeightWatcher out")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both tools")
    ap.add_argument("--ww-mp", action="store_true", help="also time both tools with the MP fit")
    ap.add_argument("--sweep", action="store_true", help="time every precision x streams setting")
    ap.add_argument("--streams", type=int, default=None, help="CUDA streams for the main runs")
    ap.add_argument("--workdir", default="/tmp/weightsmith-bench")
    ap.add_argument("--out", default=None, help="append a JSON line with the results here")
    args = ap.parse_args()
    if (args.model is None) == (args.size is None):
        ap.error("give one of --model or --size")
    args.model = args.model or SIZES[args.size]
    _threads(args.threads)
    if args.e2e:
        if args.model == "smollm2":
            ap.error("--e2e builds a random model: use --size 1b or --size 135m")
        workdir = Path(args.workdir)
        model_dir = build_llama(workdir / args.model, args.model)
        device = "auto" if args.device == "auto" else args.device
        e2e: dict[str, object] = {"model": args.model, "device": device, "mode": "e2e"}
        e2e |= end_to_end(model_dir, device, args.repeats, not args.no_ww, workdir)
        print(json.dumps(e2e), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(e2e) + "\n")
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from weightsmith import models
    from weightsmith.analyze import analyze_weights
    from weightsmith.execute import resolve_device
    from weightsmith.select import Selector
    from weightsmith.store import DictStore, open_store

    dev = resolve_device(None if args.device == "auto" else args.device)
    cuda = dev.type == "cuda"
    if args.model == "smollm2":
        store = models.open_weights("smollm2")
    else:
        t = time.perf_counter()
        store = open_store(build_llama(Path(args.workdir) / args.model, args.model))
        print(f"built {args.model} safetensors in {time.perf_counter() - t:.1f} s", flush=True)
    names = select_names(store, args.layers, not args.no_embeddings)
    state = {n: store[n].float() for n in names}
    print(f"{args.model}: {len(names)} matrices on {dev}", flush=True)

    tiny = {"warm.weight": torch.randn(64, 128)}
    analyze_weights(DictStore(tiny), device=dev, farms=True)
    run_ww(tiny)

    def ours(src: object, **kw: object) -> tuple[float, dict[str, dict]]:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        kw.setdefault("streams", args.streams)
        res = analyze_weights(src, device=dev, keep_esd=False, **kw)  # type: ignore[arg-type]
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, {m["name"]: m for m in res.matrices}

    mem = DictStore(state)
    row: dict[str, object] = {
        "model": args.model,
        "device": str(dev),
        "matrices": len(names),
        "layers": args.layers,
    }
    ww_s, ww_res = run_ww(state)
    print(f"WeightWatcher (no MP): {ww_s:.2f} s", flush=True)
    same_s, same = ours(mem, mp_fit=False, farms=False)
    print(f"weightsmith (no MP): {same_s:.2f} s", flush=True)
    row |= {
        "ww_seconds": round(ww_s, 2),
        "ours_seconds": round(same_s, 3),
        "speedup": round(ww_s / same_s, 1),
    }
    row |= agreement(same, ww_res, names)
    chosen = Selector(predicate=set(names).__contains__)
    store_s, _ = ours(store, select=chosen, mp_fit=False, farms=False)
    mp_s, with_mp = ours(mem, mp_fit=True, farms=False)
    farms_s, _ = ours(mem, mp_fit=True, farms=True)
    row |= {"ours_from_store_seconds": round(store_s, 3), "ours_mp_seconds": round(mp_s, 3),
            "ours_mp_farms_seconds": round(farms_s, 3)}  # fmt: skip
    if args.ww_mp:
        wwmp_s, wwmp_res = run_ww(state, mp_fit=True)
        print(f"WeightWatcher (MP): {wwmp_s:.2f} s", flush=True)
        row |= {"ww_mp_seconds": round(wwmp_s, 2), "speedup_mp": round(wwmp_s / mp_s, 1)}
        row["mp_agreement"] = agreement(with_mp, wwmp_res, names)
    if args.sweep:
        sweep = {}
        for precision in ("float64", "float32"):
            for streams in (1, 4, 8) if cuda else (1,):
                try:
                    s_, r_ = ours(mem, mp_fit=False, farms=False, precision=precision, streams=streams)
                except RuntimeError as exc:
                    print(f"  {precision} streams={streams}: failed: {exc}", flush=True)
                    continue
                key = f"{precision}/streams={streams}"
                entry: dict[str, object] = {"seconds": round(s_, 3), "speedup": round(ww_s / s_, 1)}
                sweep[key] = entry | agreement(r_, ww_res, names)
                print(f"  {precision} streams={streams}: {s_:.3f} s", flush=True)
        row["sweep"] = sweep
    row["machine"] = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    row["threads"] = torch.get_num_threads()
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
