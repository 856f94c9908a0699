"""Merge speed and memory, side by side with mergekit 0.1.5 on the same inputs and the same YAML.

    python benchmarks/bench_merge.py all DIR [--size 1b] [--device cpu|cuda] [--json OUT.json]

``all`` generates a random Llama-shaped base and 4 "fine-tunes" (base + small Gaussian noise, bf16,
sharded safetensors with an index; tensors are drawn directly, no model is built) under DIR, then runs
TIES (density 0.2) and task arithmetic over the 4 checkpoints with mergekit and with weightsmith (reading
the very same mergekit YAML), each in its own subprocess so that peak RSS (ru_maxrss) is per run, plus
a read-only pass over the inputs (the IO floor). Both write 2 GB shards. ``opcm`` times one OPCM step
on one Llama layer's matrices: economy SVD (ours) against the paper code's full-SVD form.
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
    "small": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, vocab=4000),
}
METHODS = {"ties": {"density": 0.2}, "task_arithmetic": {}}
N_MODELS = 4


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


def recipe(root: Path, method: str) -> Path:
    import yaml

    cfg = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{j}"), "parameters": {"weight": 1.0, **METHODS[method]}}
            for j in range(1, N_MODELS + 1)
        ],
    }
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _load(store: object, name: str, device: str) -> torch.Tensor:
    """Read one tensor for real: safetensors may hand back a lazily memory-mapped tensor on CPU."""
    t = store[name]  # type: ignore[index]
    return t.to(device) if device != "cpu" else t.clone()


def worker(tool: str, method: str, root: Path, device: str) -> None:
    """Runs in a subprocess; prints one JSON line."""
    import shutil

    if device == "cpu":
        torch.set_num_threads(1)
    os.environ["WEIGHTSMITH_PROGRESS"] = "0"
    out = root / f"out-{tool}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    # import the tool before the clock starts: at small sizes Python imports (~2 s) would dominate
    if tool == "mergekit":
        import mergekit.merge  # noqa: F401
    else:
        import weightsmith.merge  # noqa: F401
    t0 = time.perf_counter()
    if tool == "read":
        from weightsmith.store import open_store

        total = 0
        for d in ["base"] + [f"ft{j}" for j in range(1, N_MODELS + 1)]:
            s = open_store(root / d)
            for name in s:
                total += _load(s, name, device).numel()
        if device == "cuda":
            torch.cuda.synchronize()
    elif tool == "read+write":  # the IO floor of any merge: read every input, write one model
        from weightsmith.store import ShardWriter, open_store

        stores = [open_store(root / d) for d in ["base"] + [f"ft{j}" for j in range(1, N_MODELS + 1)]]
        with ShardWriter(out, max_shard_bytes=2 * 10**9) as w:
            for name in stores[0]:
                ts = [_load(s, name, device) for s in stores]
                w.add(name, ts[0])
    elif tool == "mergekit":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe(root, method).read_text()))
        gpu = dict(cuda=True, read_to_gpu=True) if device == "cuda" else dict(num_threads=1)
        opts = MergeOptions(
            quiet=True, copy_tokenizer=False, write_model_card=False, out_shard_size=2 * 10**9, **gpu
        )
        run_merge(cfg, str(out), opts)
    else:
        from weightsmith.merge.recipe import run

        run(recipe(root, method), out, device=device, shard_size=2 * 10**9)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    print(
        json.dumps(
            {"tool": tool, "method": method, "seconds": seconds, "peak_rss_mb": peak, "gpu_peak_mb": gpu_peak}
        )
    )


def spawn(tool: str, method: str, root: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "worker", tool, method, str(root), device]
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
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5])
        return
    args = dict(zip(sys.argv[3::2], sys.argv[4::2], strict=False))
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
    for floor in ("read", "read+write"):
        results["runs"].append(spawn(floor, "inputs", root, device))
        print(json.dumps(results["runs"][-1]), flush=True)
    methods = args.get("--methods", ",".join(METHODS)).split(",")
    tools = args.get("--tools", "mergekit,weightsmith").split(",")
    for method in methods:
        for tool in tools:
            results["runs"].append(spawn(tool, method, root, device))
            print(json.dumps(results["runs"][-1]), flush=True)
        if args.get("--compare", "1") == "1" and len(tools) == 2:
            results[f"{method}_max_rel_diff"] = compare(root, method)
            print(method, "max rel diff", results[f"{method}_max_rel_diff"], flush=True)
    if "--json" in args:
        Path(args["--json"]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
