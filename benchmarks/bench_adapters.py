"""Adapter training-step speed and peak memory: weightsmith vs PEFT, side by side on one GPU.

Setup (the issue's anchor): a 1.1B Llama-shaped model (hidden 2048, 16 layers, intermediate 5632,
32 heads / 4 KV heads, vocab 32000, random init, bf16), batch 4 x 1024 tokens, adapters on
q,k,v,o,gate,up,down, AdamW, causal-LM loss. Median step time over the measured steps, and peak
allocated GPU memory (model included). Every registered weightsmith method is run; PEFT is run
for the methods it has.

The floor (``torch floor``) is the same step with every weight frozen: the frozen model's forward and the
backward through its activations (what any adapter step must pay). ``--libs weightsmith-compile`` (and
``peft-compile``) run the step with the adapted model under ``torch.compile``; ``weightsmith-graph``,
``torch-graph`` (floor and full fine-tuning) and ``peft-graph`` replay the whole step (forward, backward,
AdamW with ``capturable=True``) as one CUDA graph (``weightsmith.train.cuda_graph.GraphedStep``).

    PYTHONPATH=src python3 benchmarks/bench_adapters.py --out results.jsonl          # GPU
    PYTHONPATH=src python3 benchmarks/bench_adapters.py --tiny --steps 2 --warmup 1  # CPU smoke run
    PYTHONPATH=src python3 benchmarks/bench_adapters.py --methods lora,dora --steps 6 --warmup 3 \
        --libs torch,torch-graph,weightsmith,weightsmith-graph                       # GPU, CUDA graphs
    python3 benchmarks/bench_adapters.py --report results.jsonl > benchmarks/results/adapters-speed.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# weightsmith configs for the benchmark (method -> kwargs); methods not listed use their defaults
FUSED_ADAMW = False  # --adamw fused
OURS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 16, "alpha": 32},
    "dora": {"rank": 16, "alpha": 32},
    "pissa": {"rank": 16, "alpha": 32, "niter": 2},
    "adalora": {"init_rank": 16, "target_rank": 8},
    "vera": {"rank": 256},
    "randlora": {"rank": 32},
    "bone": {"rank": 64},
    "hra": {"rank": 8},
}
COMPILE_MODE: str | None = None  # --compile-mode (e.g. "reduce-overhead": CUDA graphs)
GRAPH_LAST: set[str] = set()  # methods whose capture may fail run last (none now)
SKIP = {"eva": "data-driven init (one SVD of calibration activations per layer); its adapter is LoRA's"}


def peft_configs() -> dict[str, Callable[[], Any]]:
    import peft

    t = list(TARGETS)
    return {
        "lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=t),
        "dora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=t, use_dora=True),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=t),
        "randlora": lambda: peft.RandLoraConfig(r=32, target_modules=t),
        "bone": lambda: peft.MissConfig(r=64, target_modules=t),
        "hra": lambda: peft.HRAConfig(r=8, target_modules=t),
        "adalora": lambda: peft.AdaLoraConfig(init_r=16, target_r=8, total_step=1000, target_modules=t),
    }


def build_base(tiny: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip
    else:
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632,
                          num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(
        "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    ):  # random init is slow on CPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.cpu().eval()  # each run copies it to the GPU


def run(
    base: torch.nn.Module,
    lib: str,
    method: str,
    device: str,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    profile: bool = False,
) -> dict[str, Any]:
    from weightsmith import adapters
    from weightsmith.adapters.lora_group import learn_siblings

    model = copy.deepcopy(base).to(device)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    t0 = time.perf_counter()
    hook: Callable[[int], None] = lambda step: None  # noqa: E731
    compiled = lib.endswith("-compile")
    graphed = lib.endswith("-graph")
    if graphed and device != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    suffix = lib[lib.find("-") :] if "-" in lib else ""
    lib = lib.removesuffix("-compile").removesuffix("-graph")
    if method == "full":
        net = model
    elif method == "floor":
        net = model.requires_grad_(False)
        # backward through every activation, no weight gradient: the cost an adapter step cannot avoid
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    elif lib == "peft":
        import peft

        net = peft.get_peft_model(model, peft_configs()[method]())
        if method == "adalora":
            hook = lambda step: net.base_model.update_and_allocate(step)  # noqa: E731
    else:
        cfg = adapters.registered_adapters()[method](**OURS.get(method, {}))
        adapters.adapt(model, cfg, targets=",".join(TARGETS))
        net = model
        # as the trainer does: layers that read one input learn to run as one node before the first step
        learn_siblings(model, lambda: model(input_ids=ids))
        hook = lambda step: adapters.adapter_step(net, step, 1000)  # noqa: E731
    if device == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    params = [p for p in net.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    # capturable: the step count lives on the GPU, so the optimizer step can be part of a CUDA graph
    # fused (--adamw fused): one multi-tensor kernel for the whole update, for every library alike
    fused = FUSED_ADAMW or None
    opt = torch.optim.AdamW(params, lr=1e-5, capturable=graphed, fused=fused) if params else None
    if compiled:
        # many adapted layers call one function with inputs that differ in requires_grad: allow the variants
        torch._dynamo.config.recompile_limit = 64
    fwd = torch.compile(net, mode=COMPILE_MODE) if compiled else net
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []

    def loss_of(_m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        loss = fwd(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if lib == "weightsmith" and method != "full":
            loss = loss + adapters.adapter_regularization(net)
        return loss  # type: ignore[no-any-return]

    if graphed:
        from weightsmith.train.cuda_graph import GraphedStep, unpacked_sequences

        def graph_loss(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            with unpacked_sequences():  # no host read of the position ids; SDPA keeps its causal kernels
                return loss_of(m, batch)

        gstep = GraphedStep(net, opt, graph_loss, {"input_ids": ids})
        warmup = max(warmup, gstep.warmup + 2)  # eager warm-up calls and the capture are not timed

    def one(step: int) -> torch.Tensor:
        if graphed:
            loss = gstep({"input_ids": ids})
            hook(step)  # eager, between replays (AdaLoRA's budget); the graph zeroes the gradients
            return loss  # type: ignore[return-value]
        loss = loss_of(net, {"input_ids": ids})
        loss.backward()
        if opt is not None:
            opt.step()
        hook(step)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        return loss

    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = one(step)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            one(warmup + steps)
            torch.cuda.synchronize()
        kernels = [
            e
            for e in p.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000
        print(f"== profile {lib} {method}: {len(kernels)} kernels, {busy:.2f} ms of kernel time", flush=True)
        print(
            p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60),
            flush=True,
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    out = {
        "lib": lib + suffix, "method": method,
        "step_ms": 1000 * statistics.median(times), "peak_gib": peak,
        "trainable": n_train, "init_s": init_s, "loss": float(loss.detach()),
        "finite": bool(torch.isfinite(loss)),
    }  # fmt: skip
    if graphed:
        out["graphs"] = gstep.captured
    return out  # the model and optimizer go with this frame; main() collects them


def report(path: Path, device_name: str | None = None) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta = next((r for r in rows if "device" in r), {})
    res = {(r["lib"], r["method"]): r for r in rows if "method" in r}
    lines = [
        "# Adapter training step: weightsmith vs PEFT",
        "",
        f"Device: {device_name or meta.get('device', '?')}; torch {meta.get('torch', '?')}, "
        f"peft {meta.get('peft', '?')}, transformers {meta.get('transformers', '?')}.",
        "Model: Llama-shaped 1.1B (hidden 2048, 16 layers, intermediate 5632, 32/4 heads, vocab 32000), "
        "random "
        "init, bf16; batch 4 x 1024 tokens; adapters on q,k,v,o,gate,up,down; AdamW; median step time over "
        f"{meta.get('steps', '?')} steps after {meta.get('warmup', '?')} warm-up; "
        "peak = max allocated GPU memory "
        "(model included). Produced by `benchmarks/bench_adapters.py`.",
        "",
        "| method | weightsmith ms | compiled ms | CUDA graph ms | PEFT ms | PEFT compiled ms "
        "| PEFT / ws (speed-up) | ws / floor | ws / our LoRA | ws GiB | PEFT GiB | trainable (ws) "
        "| trainable (PEFT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def best(lib: str, m: str) -> dict[str, Any] | None:
        runs = [r for s in ("", "-compile", "-graph") if (r := res.get((lib + s, m))) is not None]
        return min(runs, key=lambda r: r["step_ms"]) if runs else None

    floor = best("torch", "floor")

    def f(r: dict[str, Any] | None, key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[key]) if r is not None and key in r else "-"

    lora_best = best("weightsmith", "lora")
    methods = sorted({m for _, m in res}, key=lambda m: (m not in ("floor", "full"), m != "lora", m))
    for m in methods:
        if m in ("floor", "full"):
            t, g = res.get(("torch", m)), res.get(("torch-graph", m))
            name = "frozen floor" if m == "floor" else "full fine-tuning"
            lines.append(
                f"| {name} | {f(t, 'step_ms')} | - | {f(g, 'step_ms')} | - | - | - | - | - "
                f"| {f(best('torch', m), 'peak_gib')} | - | - | - |"
            )
            continue
        w, p = best("weightsmith", m), best("peft", m)
        speed = f"{p['step_ms'] / w['step_ms']:.2f}x" if w and p else "-"
        rel = f"{w['step_ms'] / lora_best['step_ms']:.2f}" if w and lora_best else "-"
        over = f"{w['step_ms'] / floor['step_ms']:.2f}" if w and floor else "-"
        lines.append(
            f"| {m} | {f(res.get(('weightsmith', m)), 'step_ms')} "
            f"| {f(res.get(('weightsmith-compile', m)), 'step_ms')} "
            f"| {f(res.get(('weightsmith-graph', m)), 'step_ms')} | {f(res.get(('peft', m)), 'step_ms')} "
            f"| {f(res.get(('peft-compile', m)), 'step_ms')} | {speed} | {over} | {rel} "
            f"| {f(w, 'peak_gib')} | {f(p, 'peak_gib')} "
            f"| {f(w, 'trainable', '{:,}')} | {f(p, 'trainable', '{:,}')} |"
        )
    lines.append("")
    lines.append(
        "Ratios use each library's fastest of eager, compiled and CUDA graph (the floor too); "
        "the floor row's peak memory is that of its fastest run."
    )
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "Not run:"] + [f"- {r['lib']} {r['skipped']}: {r['why']}" for r in skipped]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--libs", default="torch,peft,weightsmith")
    ap.add_argument("--methods", default="", help="comma list (default: all)")
    ap.add_argument(
        "--deadline", type=float, default=1e9, help="stop starting new runs after this many seconds"
    )
    ap.add_argument("--out", type=Path, default=Path("adapters-speed.jsonl"))
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--no-group", action="store_true", help="LoRA: no grouped node for q/k/v and gate/up")
    ap.add_argument("--adamw", choices=("foreach", "fused"), default="foreach", help="AdamW implementation")
    ap.add_argument("--profile", default="", help="comma list of lib:method to profile one step of")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the -compile libraries")
    args = ap.parse_args()
    global COMPILE_MODE
    COMPILE_MODE = args.compile_mode
    if args.report is not None:
        sys.stdout.write(report(args.report))
        return
    torch.set_num_threads(4 if torch.cuda.is_available() else 1)
    import peft
    import transformers

    from weightsmith import adapters

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    seq = 32 if args.tiny else args.seq
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__,
        "steps": args.steps, "warmup": args.warmup,
    }  # fmt: skip
    global FUSED_ADAMW
    FUSED_ADAMW = args.adamw == "fused"
    meta["adamw"] = args.adamw
    if args.no_group:
        from weightsmith.adapters import lora_group

        lora_group.GROUP_SIBLINGS = False
        meta["group_siblings"] = False
    start = time.perf_counter()
    base = build_base(args.tiny)
    wanted = set(filter(None, args.methods.split(",")))
    plan: list[tuple[str, str]] = []
    libs = args.libs.split(",")
    for lib in libs:
        if lib.split("-")[0] == "torch":
            plan += [(lib, "floor"), (lib, "full")]
        if lib.startswith("peft"):
            plan += [(lib, m) for m in peft_configs()]
        if lib.startswith("weightsmith"):
            # a failed capture (BOFT: torch.linalg.solve syncs) goes last, after every graph that can work
            last = GRAPH_LAST if lib.endswith("-graph") else set()
            plan += [(lib, m) for m in sorted(adapters.registered_adapters(), key=lambda m: (m in last, m))]
    with args.out.open("a") as fh:
        fh.write(json.dumps(meta) + "\n")
        for lib, method in plan:
            if wanted and method not in wanted and not lib.startswith("torch"):
                continue
            if lib.startswith("weightsmith") and method in SKIP:
                fh.write(json.dumps({"lib": lib, "skipped": method, "why": SKIP[method]}) + "\n")
                continue
            if time.perf_counter() - start > args.deadline:
                fh.write(json.dumps({"lib": lib, "skipped": method, "why": "time budget of the run"}) + "\n")
                continue
            try:
                prof = f"{lib}:{method}" in args.profile.split(",")
                r = run(base, lib, method, device, args.steps, args.warmup, args.batch, seq, prof)
            except Exception as exc:  # record and go on: one failing method must not hide the others
                r = {"lib": lib, "skipped": method, "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
