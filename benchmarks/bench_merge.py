"""Merge speed and memory, side by side with mergekit 0.1.5 on the same inputs and the same YAML.

    python benchmarks/bench_merge.py all DIR [--size 1b|mid|small] [--device cpu|cuda] [--json OUT.json]
                                             [--methods ties,task_arithmetic,slerp,model_stock,della,regmean]
                                             [--repeat N] [--tools mergekit,weightsmith] [--floors 1|0]
                                             [--read-floor]

``all`` generates a random Llama-shaped base and 4 "fine-tunes" (base + small Gaussian noise, bf16,
sharded safetensors with an index; tensors are drawn directly, no model is built) under DIR, then runs
each method over the checkpoints with mergekit and with weightsmith (reading the very same mergekit
YAML), each in its own subprocess so that peak RSS (ru_maxrss) is per run, plus the IO floors: ``read``
(every tensor of the 5 checkpoints through ``execute.Reader``, the executor's parallel positioned reads,
pinned staging on a GPU), ``read-serial`` (one tensor at a time into a fresh buffer, then ``.to(device)``:
the reading before issue 12) and ``read+write`` (``read`` and one model written), each with ``gb_per_s``;
``--read-floor`` runs the floors only. Both write 2 GB shards; the time of a run is the fastest of
``--repeat`` runs in that process (the machine may be shared), imports excluded; ``cpu_s`` is the least
CPU time (all threads) of those runs, steadier than wall time on a shared machine, and ``all_seconds`` /
``all_cpu_s`` list each.

- TIES (density 0.2) and task arithmetic over the 4 checkpoints, as the YAML of ``recipe``;
- SLERP (two models, per-layer t gradients), Model Stock (4 models) and DELLA (density 0.5, epsilon 0.1),
  bf16 in and out, the YAMLs of ``bench_merge_parity.configs``;
- RegMean (``merge_method: regmean`` on the 4 models, packaged text "hamlet"): mergekit has no RegMean, so
  its row is **mergekit's ``linear`` merge of the same 4 models** (a plain average: RegMean's fallback for
  every tensor it does not solve) and says so; ours reports its own split (setup: building the model;
  statistics: running each model and folding its Gram matrices; solve: the Cholesky solves; write: the
  streamed read, average and write of the rest). The generated folders get SmolLM2's tokenizer, so the
  vocabulary must hold it (``--size mid`` or ``1b``).

``opcm`` times one OPCM step on one Llama layer's matrices: economy SVD (ours) against the paper code's
full-SVD form.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # Llama-3.2-1B dims (1.24 B parameters, tied embeddings) and a small one for smoke runs
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256),
    "mid": dict(hidden=1024, inter=4096, layers=8, heads=16, kv=4, vocab=49152),  # 150 M, SmolLM2's vocab
    "small": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, vocab=4000),
}
METHODS = {"ties": {"density": 0.2}, "task_arithmetic": {}}  # the GTA rows of ``recipe``
PARITY = ("slerp", "model_stock", "della")  # the YAMLs of bench_merge_parity.configs
N_MODELS = 4
REGMEAN = {"data": "hamlet", "samples": 8, "seq_len": 64}  # per model: 8 windows of 64 tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    c = SIZES[size]
    h, i, hd = c["hidden"], c["inter"], c["hidden"] // c["heads"]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c["vocab"], h),
        "model.norm.weight": (h,),
    }
    for layer in range(c["layers"]):
        p = f"model.layers.{layer}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (c["kv"] * hd, h),
                p + "self_attn.v_proj.weight": (c["kv"] * hd, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return out


def generate(root: Path, size: str, shard_bytes: int = 10**9, device: str = "cpu") -> None:
    from safetensors.torch import save_file

    c = SIZES[size]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["hidden"],
        "intermediate_size": c["inter"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv"],
        "vocab_size": c["vocab"],
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    for j in range(N_MODELS + 1):
        d = root / ("base" if j == 0 else f"ft{j}")
        if (d / "model.safetensors.index.json").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        weight_map, shard, n, idx = {}, {}, 0, 0
        items = list(shapes(size).items())
        for k, (name, shape) in enumerate(items):
            g = torch.Generator(device).manual_seed(k)  # the base is the same in every checkpoint
            t = torch.randn(shape, generator=g, device=device) * 0.02
            if j:
                noise = torch.Generator(device).manual_seed(1000 * j + k)
                t += torch.randn(shape, generator=noise, device=device) * 0.002
            shard[name] = t.to(torch.bfloat16).cpu()
            n += shard[name].numel() * 2
            if n >= shard_bytes or k == len(items) - 1:
                idx += 1
                fname = f"model-{idx:05d}.safetensors"
                save_file(shard, str(d / fname), metadata={"format": "pt"})
                weight_map.update({x: fname for x in shard})
                shard, n = {}, 0
        (d / "config.json").write_text(json.dumps(cfg))
        index = {"metadata": {}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))


def add_tokenizer(root: Path) -> None:
    """Copy SmolLM2's tokenizer into every generated folder (RegMean runs the models on text)."""
    import shutil

    from weightsmith.models import resolve

    src = resolve("smollm2")
    vocab = json.loads((root / "base" / "config.json").read_text())["vocab_size"]
    if vocab < 49152:
        raise SystemExit(
            f"regmean needs a vocabulary of at least SmolLM2's 49152 tokens (got {vocab}): --size mid"
        )
    for j in range(N_MODELS + 1):
        for f in TOKENIZER_FILES:
            shutil.copy(src / f, root / ("base" if j == 0 else f"ft{j}") / f)


def size_of(root: Path) -> str:
    """The SIZES name of the checkpoints generated under ``root``."""
    cfg = json.loads((root / "base" / "config.json").read_text())
    for name, c in SIZES.items():
        if (c["hidden"], c["layers"], c["vocab"]) == (
            cfg["hidden_size"],
            cfg["num_hidden_layers"],
            cfg["vocab_size"],
        ):
            return name
    raise SystemExit(f"{root}: checkpoints of no known size")


def config(root: Path, method: str, tool: str = "weightsmith") -> dict:
    """The mergekit YAML (as a mapping) both tools read for ``method``; for ``regmean`` mergekit gets the
    ``linear`` merge of the same models (it has no RegMean)."""
    models = [str(root / f"ft{j}") for j in range(1, N_MODELS + 1)]
    if method in PARITY:
        from bench_merge_parity import configs

        return configs(root, size_of(root), "bfloat16")[method]
    if method == "regmean":
        if tool == "mergekit":
            return {
                "merge_method": "linear",
                "dtype": "bfloat16",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
            }
        return {
            "merge_method": "regmean",
            "dtype": "bfloat16",
            "models": [{"model": m} for m in models],
            "parameters": dict(REGMEAN),
        }
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [{"model": m, "parameters": {"weight": 1.0, **METHODS[method]}} for m in models],
    }


def recipe(root: Path, method: str, tool: str = "weightsmith") -> Path:
    import yaml

    path = root / f"{method}-{tool}.yaml"
    path.write_text(yaml.safe_dump(config(root, method, tool)))
    return path


CHECKPOINTS = ["base"] + [f"ft{j}" for j in range(1, N_MODELS + 1)]


def _load(store: object, name: str, device: str) -> torch.Tensor:
    """One tensor as weightsmith read it before the parallel reader: a positioned read into a fresh host
    buffer, then (on a GPU) a copy from that pageable buffer."""
    t = store[name]  # type: ignore[index]
    return t.to(device)


def input_bytes(root: Path) -> int:
    from weightsmith.store import open_store

    total = 0
    for d in CHECKPOINTS:
        s = open_store(root / d)
        total += sum(s.meta(n).nbytes for n in s)
    return total


def read_floor(root: Path, device: str, threads: int | None = None) -> dict[str, float]:
    """Read every tensor of the 5 checkpoints as a merge reads them (``execute.Reader``: each name's
    tensors of every checkpoint at once, in chunks, by parallel positioned reads; on a GPU through pinned
    staging slots), dropping each name's tensors before the next. Returns the bytes read and copied."""
    from weightsmith.execute import Reader
    from weightsmith.store import open_store

    stores = [open_store(root / d) for d in CHECKPOINTS]
    with Reader(device, threads=threads) as rd:
        for name in stores[0]:
            rd.read([(s, name) for s in stores])
    return {"bytes": float(rd.bytes_read), "bytes_staged": float(rd.bytes_copied), "threads": rd.threads}


def mergekit_options(device: str) -> object:
    """mergekit's options for a timed run: no tokenizer copy or model card, 2 GB shards, seed 0, one CPU
    thread on CPU, tensors read straight to the GPU on CUDA."""
    from mergekit.options import MergeOptions

    gpu = dict(cuda=True, read_to_gpu=True) if device == "cuda" else dict(num_threads=1)
    return MergeOptions(
        quiet=True,
        copy_tokenizer=False,
        write_model_card=False,
        out_shard_size=2 * 10**9,
        random_seed=0,
        **gpu,
    )


def regmean_split(root: Path, out: Path, device: str) -> dict[str, float]:
    """``weightsmith merge`` of the RegMean YAML, step by step as ``RegMean.run`` takes them, timed: setup
    (the recipe and one model instance), statistics (each model run on its data, Gram sums folded),
    solve (the Cholesky factorisations and solves, timed inside the write) and write (the rest of it)."""
    from weightsmith.merge import _dataaware
    from weightsmith.merge.recipe import load_recipe
    from weightsmith.merge.regmean import RegMeanStats

    t0 = time.perf_counter()
    r = load_recipe(recipe(root, "regmean"))
    cfg = r.method
    stores, _, model, tok = _dataaware.open_checked(r, "regmean", False, "the Gram matrices weigh the models")
    t1 = time.perf_counter()
    acc = RegMeanStats(cfg)
    for store, source in zip(stores, cfg.sources(len(stores)), strict=True):
        _dataaware.load_weights(model, store, str(store.source))
        acc.add(model, _dataaware.load_batches(tok, source, cfg, single=True), device=device)
    del model  # as RegMean.run: the write needs only the sums
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    solving = [0.0]
    solve = acc.solve

    def timed_solve(name: str, mean: torch.Tensor) -> torch.Tensor:
        s0 = time.perf_counter()
        x = solve(name, mean)
        if x.is_cuda:
            torch.cuda.synchronize()
        solving[0] += time.perf_counter() - s0
        return x

    acc.solve = timed_solve  # type: ignore[method-assign]
    kw = {"dtype": r.dtype, "device": device, "shard_size": 2 * 10**9}
    _dataaware.write_merged(r, stores, acc.merge_one, out, "regmean", kw)
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "stats_s": t2 - t1, "solve_s": solving[0], "write_s": t3 - t2 - solving[0]}


def worker(tool: str, method: str, root: Path, device: str, repeat: int = 1) -> None:
    """Runs in a subprocess; prints one JSON line (the fastest of ``repeat`` runs)."""
    import shutil

    if device == "cpu":
        torch.set_num_threads(1)
    os.environ["WEIGHTSMITH_PROGRESS"] = "0"
    out = root / f"out-{tool}-{method}"
    # import the tool before the clock starts: at small sizes Python imports (~2 s) would dominate
    if tool == "mergekit":
        import mergekit.merge  # noqa: F401
    else:
        import weightsmith.merge  # noqa: F401
    extra: dict[str, object] = {}
    if tool == "mergekit" and method == "regmean":
        extra["note"] = "mergekit has no RegMean: this row is mergekit's linear merge of the same 4 models"

    def once() -> dict[str, float]:
        if tool == "read-serial":  # the reading before issue 12's reader: one tensor at a time
            from weightsmith.store import open_store

            total = 0
            for d in CHECKPOINTS:
                s = open_store(root / d)
                for name in s:
                    total += _load(s, name, device).numel()
            return {"bytes": float(input_bytes(root))}
        if tool == "read":  # the executor's reader: every name's 5 tensors, chunks read in parallel
            return read_floor(root, device)
        if tool == "read+write":  # the IO floor of any merge: read every input, write one model
            from weightsmith.execute import Reader
            from weightsmith.store import ShardWriter, open_store

            stores = [open_store(root / d) for d in CHECKPOINTS]
            with Reader(device) as rd, ShardWriter(out, max_shard_bytes=2 * 10**9) as w:
                for name in stores[0]:
                    ts = rd.read([(s, name) for s in stores])
                    w.add(name, ts[0])
            return {"bytes": float(input_bytes(root))}
        elif tool == "mergekit":
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge

            cfg = MergeConfiguration.model_validate(config(root, method, tool))
            run_merge(cfg, str(out), mergekit_options(device))
        elif method == "regmean":
            return regmean_split(root, out, device)
        else:
            from weightsmith.merge.recipe import run

            run(recipe(root, method), out, device=device, shard_size=2 * 10**9)
        return {}

    def cpu() -> float:  # CPU seconds of every thread of this process: steadier than wall time when shared
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    times, cpus = [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        c0, t0 = cpu(), time.perf_counter()
        split = once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpus.append(cpu() - c0)
        if times[-1] == min(times):
            extra.update(split)
    extra["cpu_s"], extra["all_cpu_s"] = min(cpus), cpus
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    row = {"tool": tool, "method": method, "seconds": min(times), "all_seconds": times}
    if "bytes" in extra:
        extra["gb_per_s"] = extra["bytes"] / min(times) / 1e9  # type: ignore[operator]
    print(json.dumps({**row, "peak_rss_mb": peak, "gpu_peak_mb": gpu_peak, **extra}))


def spawn(tool: str, method: str, root: Path, device: str, repeat: int = 1) -> dict:
    cmd = [sys.executable, __file__, "worker", tool, method, str(root), device, str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{tool} {method} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(root: Path, method: str) -> float:
    """Max |ours - mergekit| relative to max |mergekit| over all tensors."""
    from weightsmith.store import open_store

    a, b = open_store(root / f"out-weightsmith-{method}"), open_store(root / f"out-mergekit-{method}")
    worst = 0.0
    for name in b:
        x, y = a[name].float(), b[name].float()
        worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12))
    return worst


def opcm_bench(device: str, hidden: int = 2048, inter: int = 8192, kv: int = 512) -> dict:
    from weightsmith.merge.opcm import project_out, split_rank

    def full(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        r = split_rank(S, alpha)
        P = U.mT @ tau @ Vh.mT
        i = torch.arange(min(P.shape), device=P.device)
        P[i, i] = 0
        P[:r, :r] = 0
        return U @ P @ Vh

    g = torch.Generator().manual_seed(0)
    mats = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]
    pairs = [(torch.randn(s, generator=g).to(device), torch.randn(s, generator=g).to(device)) for s in mats]
    res = {}
    for name, fn in (("full_svd", full), ("economy", project_out)):
        fn(*pairs[1], 0.5)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = [fn(d, t, 0.5) for d, t in pairs]
        if device == "cuda":
            torch.cuda.synchronize()
        res[name] = (time.perf_counter() - t0, outs)

    def rel(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
        return max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(xs, ys, strict=True))

    ref = [full(d.double(), t.double(), 0.5) for d, t in pairs]  # float64: the exact answer
    err = rel(res["economy"][1], res["full_svd"][1])
    errs = {"economy_vs_fp64": rel(res["economy"][1], ref), "full_svd_vs_fp64": rel(res["full_svd"][1], ref)}
    return {
        "shapes": mats,
        "full_svd_s": res["full_svd"][0],
        "economy_s": res["economy"][0],
        "max_rel_err": err,
        **errs,
    }


def main() -> None:
    mode = sys.argv[1]
    if mode == "worker":
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
        return
    floors_only = "--read-floor" in sys.argv  # a flag: the read floors and nothing else
    argv = [a for a in sys.argv if a != "--read-floor"]
    args = dict(zip(argv[3::2], argv[4::2], strict=False))
    device = args.get("--device", "cpu")
    if mode == "opcm":
        if device == "cpu":
            torch.set_num_threads(1)
        dims = dict(hidden=1024, inter=2816, kv=256) if args.get("--size") == "small" else {}
        print(json.dumps(opcm_bench(device, **dims)))
        return
    root = Path(sys.argv[2])
    t0 = time.perf_counter()
    generate(root, args.get("--size", "1b"), device=device)
    results = {
        "device": device,
        "size": args.get("--size", "1b"),
        "generate_s": time.perf_counter() - t0,
        "runs": [],
    }
    repeat = int(args.get("--repeat", "1"))
    methods = args.get("--methods", ",".join(METHODS)).split(",")
    if "regmean" in methods:
        add_tokenizer(root)
    if args.get("--floors", "1") == "1" or floors_only:
        for floor in ("read-serial", "read", "read+write"):
            results["runs"].append(spawn(floor, "inputs", root, device, repeat))
            print(json.dumps(results["runs"][-1]), flush=True)
    if floors_only:
        methods = []
    tools = args.get("--tools", "mergekit,weightsmith").split(",")
    for method in methods:
        for tool in tools:
            results["runs"].append(spawn(tool, method, root, device, repeat))
            print(json.dumps(results["runs"][-1]), flush=True)
        if len(tools) == 2:
            mk, ws = results["runs"][-2:]
            what = "vs mergekit linear (it has no RegMean)" if method == "regmean" else "vs mergekit"
            print(
                f"{method}: {what}: {mk['seconds'] / ws['seconds']:.2f}x faster, peak RSS "
                f"{ws['peak_rss_mb']:.0f} vs {mk['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        if args.get("--compare", "1") == "1" and len(tools) == 2 and method != "regmean":
            results[f"{method}_max_rel_diff"] = compare(root, method)
            print(method, "max rel diff", results[f"{method}_max_rel_diff"], flush=True)
    if "--json" in args:
        Path(args["--json"]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
