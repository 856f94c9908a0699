"""Speed of compressed layers: prefill and decode throughput of a Llama-shaped model, dense / 2:4 / low-rank.

A random-weight Llama (``--size 1b``: TinyLlama-1.1B's shape, hidden 2048, 22 layers, intermediate 5632,
32 heads, 4 KV heads; ``--size tiny`` for a CPU smoke run) in fp16/bf16, every ``nn.Linear`` of the decoder
blocks (not ``lm_head``) in these forms (``--variants``):

- ``dense``: as built;
- ``sparse-2:4``: magnitude 2:4 masks (``weightsmith.compress._sparse.nm_mask``, computed on the device in
  the weight's dtype), each weight then packed once by ``torch.sparse.to_sparse_semi_structured`` so
  ``F.linear`` runs PyTorch's semi-structured sparse kernels: cuSPARSELt (``--sparse-backend cusparselt``)
  or CUTLASS (``cutlass``), CUDA with fp16/bf16 only. The logits are checked against the same masked
  weights run densely. On the CPU (no semi-structured kernels) the row is ``sparse-2:4-masked``: the same
  masks run by the dense kernel, so the smoke run exercises pruning, the check and the timing, but its
  speed is the dense one by construction;
- ``lowrank-50%``: every Linear as two thin Linears (``weightsmith.compress.thin_linears``) at the uniform
  rank that keeps 50 % of its parameters, ``r = ⌊0.5 · out · in / (out + in)⌋``, rounded down to a multiple
  of ``--rank-multiple`` (8: a bf16 GEMM dimension that is not a multiple of 8 leaves the tensor cores'
  fast paths; TinyLlama's k/v projections would get r = 113, its MLP r = 750): two GEMMs per layer, each a
  plain ``F.linear`` on a contiguous weight (checked), half the FLOPs of the dense layer.

``--compile MODES`` adds, for every variant, a row per ``torch.compile`` mode (``max-autotune-no-cudagraphs``,
``reduce-overhead``, ...) with the prefill throughput of the compiled model (``dynamic=False``: one graph per
prefill shape, ``torch._dynamo.reset()`` before each row so no row runs on another's cache or falls back to
eager past the recompile limit), its compile time, the number of graphs compiled and its logits' error
against the eager model's. ``--compile-scope layers`` (the default) compiles each decoder layer, the
regional compilation recipe: the 22 layers share one graph (dynamo treats their parameters as inputs), so
compiling (and autotuning) costs one layer's worth, and the Python between layers is 22 calls per forward;
``model`` compiles the whole forward (longer compiles, no Python left). Decode is
measured eager only: with the dynamic KV cache every step has a new shape (a recompile per step, and a new
CUDA graph each for reduce-overhead). A mode that fails to compile a variant (e.g. the semi-structured
tensor subclass) leaves a row with the error instead of stopping the run.

Every variant is a copy of one model built once (no re-initialisation); each phase (build, prune, pack,
check, prefill, decode) prints its wall time as it ends, and the JSON keeps them (``phases_s``). Prefill:
tokens/s of one forward pass over ``B × L`` tokens for each ``BxL`` of ``--prefill`` (2:4 kernels win only
on large GEMMs: the 1B default includes 8 × 2048 = 16,384 tokens). Decode: tokens/s of
``--new-tokens`` greedy steps with the KV cache after a ``--prompt-len`` prompt, for each batch size in
``--decode-batches``. Only the last position's logits are computed (``logits_to_keep=1``), as a server
does. Each number is the median of ``--repeats`` timed runs after a warm-up run.

Why the first version did not finish a 2:4 row in minutes on the GPU (read from the code; the GPU run will
confirm it with the phase times): masking and packing the 154 weights are a few hundred milliseconds of
device work, but every semi-structured ``F.linear`` goes through the tensor subclass' Python dispatch and
one cuSPARSELt call that sets up its matmul plan each time, 154 of them per decoded token, and the old
defaults decoded 3,072 tokens per variant (4 batch sizes × 6 runs × 128 tokens) after re-initialising a
1.1B model for every variant. The defaults now decode 2 batch sizes × 4 runs × 32 tokens from one model.

    .venv/bin/python benchmarks/bench_compress_speed.py --device cuda --size 1b \\
        --out benchmarks/results/compress_speed_1b_h200.json
    .venv/bin/python benchmarks/bench_compress_speed.py --device cuda --size 1b --prefill 8x2048 \\
        --decode-batches 1 --compile max-autotune-no-cudagraphs,reduce-overhead \\
        --out benchmarks/results/compress_speed_1b_h200_compiled.json
    .venv/bin/python benchmarks/bench_compress_speed.py --device cpu --size tiny [--compile default]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from weightsmith.compress._lowrank import thin_linears, uniform_ranks
from weightsmith.compress._sparse import nm_mask
from weightsmith.layers import find_layers
from weightsmith.staging import write_text

SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}  # fmt: skip
DEFAULTS = {  # prefill shapes (batch x length), prompt length, new tokens, repeats, decode batch sizes
    "1b": ("4x1024,8x2048", 128, 32, 3, "1,16"),
    "tiny": ("2x64,4x128", 16, 8, 2, "1,4"),
}
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("dense", "sparse-2:4", "lowrank-50%")
BACKENDS = ("cusparselt", "cutlass")


class Phases:
    """Wall seconds of named phases, printed as each one ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.t0 = device, {}, time.perf_counter()

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        self.seconds[name] = round(time.perf_counter() - t, 3)
        print(f"  [{time.perf_counter() - self.t0:7.1f} s] {name}: {self.seconds[name]:.2f} s", flush=True)
        return out


def build(size: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size]))
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tps(model: nn.Module, batch: int, length: int, device: torch.device, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    return (
        batch
        * length
        / timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, repeats)
    )


def cache_key(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_tps(
    model: nn.Module, batch: int, prompt: int, new: int, device: torch.device, repeats: int
) -> float:
    import copy

    key = cache_key(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def steps() -> None:  # greedy decoding from a copy of the prompt's cache
        cache = copy.deepcopy(out[key])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            step = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{key: cache})
            cache, nxt = step[key], step.logits[:, -1:].argmax(-1)

    return batch * new / timed(steps, device, repeats)


def linear_params(model: nn.Module) -> int:
    """Stored numbers of the decoder blocks' Linear weights (a 2:4 weight counts its kept half)."""
    from torch.sparse import SparseSemiStructuredTensor

    total = 0
    for name, p in model.named_parameters():
        if "layers." in name and name.endswith("weight") and p.dim() == 2:
            total += p.numel() // 2 if isinstance(p, SparseSemiStructuredTensor) else p.numel()
    return total


@torch.no_grad()
def mask_24(model: nn.Module) -> int:
    """Magnitude 2:4 masks applied in place to every Linear of the decoder blocks, on the weights' own
    device and dtype (still dense); returns the number of weights masked."""
    layers = find_layers(model)
    for ly in layers:
        W = ly.module.weight
        W.mul_(nm_mask(W.abs(), 2, 4).to(W.dtype))
    return len(layers)


def pack_24(model: nn.Module, backend: str) -> None:
    """The (already 2:4) weights packed once each as semi-structured sparse tensors (CUDA only)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    for ly in find_layers(model):
        lin = ly.module
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)


@torch.no_grad()
def lowrank_50(model: nn.Module, multiple: int = 1) -> None:
    """Every Linear of the blocks as two thin Linears at the uniform rank keeping 50 % of its parameters,
    rounded down to a multiple of ``multiple`` (random factors drawn on the device). Checks that each
    thin layer runs as plain ``F.linear`` calls on contiguous weights."""
    from weightsmith.compress import LowRankLinear

    layers = find_layers(model)
    ranks = uniform_ranks({ly.name: ly.shape for ly in layers}, 0.5)
    thin_linears(model, {k: max(multiple, r - r % multiple) for k, r in ranks.items()})
    for mod in model.modules():
        if isinstance(mod, LowRankLinear):
            parts = (mod.down, mod.up)
            if not all(type(p) is nn.Linear and p.weight.is_contiguous() for p in parts):
                raise RuntimeError("a low-rank layer is not two plain Linears with contiguous weights")
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(1)
    for name, p in model.named_parameters():
        if ".down.weight" in name or ".up.weight" in name:
            p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32) / p.shape[1] ** 0.5)


@torch.inference_mode()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def prefill_key(batch: int, length: int) -> str:
    return f"prefill_{batch}x{length}_tok_s"


def measure(
    model: nn.Module, name: str, args: argparse.Namespace, device: torch.device, phases: Phases
) -> list[dict[str, Any]]:
    """The eager row of a variant (every prefill shape, every decode batch), then one compiled row per
    ``--compile`` mode."""
    row: dict[str, Any] = {"variant": name, "mode": "eager", "linear_params": linear_params(model)}
    for b, n in args.prefill:
        row[prefill_key(b, n)] = phases(
            f"{name} prefill {b}x{n}", lambda b=b, n=n: prefill_tps(model, b, n, device, args.repeats)
        )
    for b in args.decode_batches:
        row[f"decode_b{b}_tok_s"] = phases(
            f"{name} decode b={b}",
            lambda b=b: decode_tps(model, b, args.prompt_len, args.new_tokens, device, args.repeats),
        )
    print(f"{name}: {row}", flush=True)
    return [row] + [compiled_row(model, name, mode, args, device, phases) for mode in args.compile]


@contextlib.contextmanager
def compiled(model: nn.Module, mode: str, scope: str) -> Iterator[nn.Module]:
    """``model`` with ``torch.compile(mode=mode, dynamic=False)`` applied to the whole model (``scope``
    "model") or to each decoder layer (``"layers"``: regional compilation, one graph that every layer of the
    same shapes reuses); the layers are put back and dynamo's caches cleared on exit."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh cache: no recompile limit carried over from the previous row
    layers = model.model.layers  # type: ignore[union-attr]
    originals = list(layers)  # type: ignore[arg-type]
    try:
        if scope == "model":
            yield cast(nn.Module, torch.compile(model, mode=mode, dynamic=False))
        else:
            for i, layer in enumerate(originals):
                layers[i] = torch.compile(layer, mode=mode, dynamic=False)  # type: ignore[index]
            yield model
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer  # type: ignore[index]
        torch._dynamo.reset()


def compiled_row(
    model: nn.Module, name: str, mode: str, args: argparse.Namespace, device: torch.device, phases: Phases
) -> dict[str, Any]:
    """Prefill throughput of the compiled model (:func:`compiled`) at every prefill shape; the compile time
    (the first two calls of each shape), the number of graphs compiled, and the compiled logits' error
    against the eager ones."""
    from torch._dynamo.utils import counters

    row: dict[str, Any] = {"variant": name, "mode": mode, "scope": args.compile_scope}
    row["linear_params"] = linear_params(model)
    shapes = {
        (b, n): torch.randint(0, int(model.config.vocab_size), (b, n), device=device) for b, n in args.prefill
    }
    with torch.inference_mode():  # the eager logits, before any layer is swapped for its compiled form
        refs = {
            k: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
            for k, ids in shapes.items()
        }
    graphs = int(counters["stats"]["unique_graphs"])  # dynamo's counters outlive its reset
    try:
        with compiled(model, mode, args.compile_scope) as cm:
            for (b, n), ids in shapes.items():

                @torch.inference_mode()
                def first_calls(ids: torch.Tensor = ids) -> torch.Tensor:
                    cm(input_ids=ids, use_cache=False, logits_to_keep=1)  # compiles (a CUDA graph: recorded)
                    return cm(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float().clone()

                got = phases(f"{name} {mode} compile {b}x{n}", first_calls)
                ref = refs[(b, n)]
                row[f"logit_rel_err_vs_eager_{b}x{n}"] = float((got - ref).norm() / ref.norm())
                row[f"compile_s_{b}x{n}"] = phases.seconds[f"{name} {mode} compile {b}x{n}"]
                row[prefill_key(b, n)] = phases(
                    f"{name} {mode} prefill {b}x{n}",
                    lambda b=b, n=n: prefill_tps(cm, b, n, device, args.repeats),
                )
            row["graphs"] = int(counters["stats"]["unique_graphs"]) - graphs
    except Exception as exc:  # a mode that cannot compile this variant: say so, go on with the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    print(f"{name} {mode}: {row}", flush=True)
    return row


def sparse_rows(
    base: nn.Module, args: argparse.Namespace, device: torch.device, phases: Phases, notes: list[str]
) -> list[dict[str, Any]]:
    """The 2:4 variant: masks, the masked-dense reference logits, the packing (CUDA, fp16/bf16) and the
    check of the packed logits against the reference; a masked-dense row elsewhere."""
    import copy

    model = phases("copy model for 2:4", lambda: copy.deepcopy(base))
    n = phases("2:4 prune (magnitude masks, on the device)", lambda: mask_24(model))
    probe = torch.randint(0, model.config.vocab_size, (1, 128 if args.size == "1b" else 16), device=device)
    ref = phases("2:4 reference logits (masked, dense kernel)", lambda: logits(model, probe))
    kernels = device.type == "cuda" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    if not kernels:
        notes.append(
            f"sparse-2:4-masked: the {n} masked weights run by the dense kernel, because semi-structured "
            f"sparse kernels need CUDA and fp16/bf16 (here {device.type}, {next(model.parameters()).dtype}): "
            "its speed is the dense one by construction"
        )
        return measure(model, "sparse-2:4-masked", args, device, phases)
    phases(f"2:4 pack {n} weights ({args.sparse_backend})", lambda: pack_24(model, args.sparse_backend))
    got = phases("2:4 packed logits", lambda: logits(model, probe))
    err = float((got - ref).norm() / ref.norm())
    notes.append(
        f"2:4 semi-structured ({args.sparse_backend}) logits vs the same masks run densely: {err:.2e}"
    )
    name = f"sparse-2:4-{args.sparse_backend}"
    rows = measure(model, name, args, device, phases)
    rows[0]["logit_rel_err_vs_masked_dense"] = err
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown: one line per row, each number with its ratio to the dense row of the same mode."""
    keys = [prefill_key(b, n) for b, n in args.prefill] + [f"decode_b{b}_tok_s" for b in args.decode_batches]
    heads = [f"prefill {b}x{n} tok/s" for b, n in args.prefill]
    heads += [f"decode b={b} tok/s" for b in args.decode_batches]
    lines = ["| variant | mode | block Linear params (M) | " + " | ".join(heads) + " |"]
    lines.append("|---" * (3 + len(keys)) + "|")
    dense = {r["mode"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        base = dense.get(r["mode"])
        cells = [r["variant"], r["mode"], f"{r['linear_params'] / 1e6:.1f}"]
        for key in keys:
            if key not in r:
                cells.append("-")
                continue
            x = f"{r[key]:,.0f}"
            ratio = base is not None and base is not r and key in base
            cells.append(f"{x} ({r[key] / base[key]:.2f}x)" if ratio else x)  # type: ignore[index]
        if "error" in r:
            cells[-1] += f" (compile failed: {r['error'][:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--sparse-backend", choices=BACKENDS, default="cusparselt")
    ap.add_argument(
        "--prefill", default=None, help="prefill shapes BxL, comma separated (e.g. 4x1024,8x2048)"
    )
    ap.add_argument(
        "--compile-scope",
        choices=("layers", "model"),
        default="layers",
        help="compile each decoder layer or the model",
    )
    ap.add_argument("--rank-multiple", type=int, default=8, help="low-rank ranks rounded down to a multiple")
    ap.add_argument(
        "--compile", default="", help=f"torch.compile modes for extra prefill rows, of {', '.join(MODES)}"
    )
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--decode-batches", default=None, help="comma separated batch sizes")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    keys = ("prefill", "prompt_len", "new_tokens", "repeats", "decode_batches")
    for key, value in zip(keys, DEFAULTS[args.size], strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.decode_batches = [int(b) for b in str(args.decode_batches).split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    try:
        args.prefill = [tuple(int(x) for x in shape.split("x")) for shape in str(args.prefill).split(",")]
    except ValueError:
        ap.error(f"--prefill {args.prefill}: use BxL shapes, comma separated (e.g. 4x1024,8x2048)")
    if not args.prefill or any(len(sh) != 2 or min(sh) < 1 for sh in args.prefill):
        ap.error(f"--prefill {args.prefill}: use BxL shapes, comma separated (e.g. 4x1024,8x2048)")
    args.compile = [m for m in args.compile.split(",") if m]
    if any(m not in MODES for m in args.compile):
        ap.error(f"--compile {','.join(args.compile)}: use modes of {', '.join(MODES)}")
    if args.rank_multiple < 1:
        ap.error(f"--rank-multiple {args.rank_multiple}: must be >= 1")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        ap.error(f"--variants: unknown {', '.join(bad) or '(none given)'}; use {', '.join(VARIANTS)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested variant measured; returns ``{"meta", "rows", "table"}`` (also written to --out)."""
    import copy

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size} Llama, {dtype}, {device} ({gpu}); variants {', '.join(args.variants)}", flush=True)
    phases = Phases(device)
    base = phases("build (random init, once)", lambda: build(args.size, dtype, device))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def result() -> dict[str, Any]:
        meta = {
            "size": args.size,
            "config": SIZES[args.size],
            "dtype": str(dtype),
            "device": gpu,
            "torch": torch.__version__,
            "prefill": args.prefill,
            "compile": args.compile,
            "compile_scope": args.compile_scope,
            "rank_multiple": args.rank_multiple,
            "decode": {
                "prompt": args.prompt_len,
                "new_tokens": args.new_tokens,
                "batches": args.decode_batches,
            },
            "repeats": args.repeats,
            "sparse_backend": args.sparse_backend,
            "notes": notes,
            "phases_s": phases.seconds,
        }
        return {"meta": meta, "rows": rows, "table": table(rows, args)}

    for (
        variant
    ) in args.variants:  # in the order asked; the JSON is rewritten after each (a cut run keeps them)
        if variant == "dense":
            rows += measure(base, "dense", args, device, phases)
        elif variant == "sparse-2:4":
            rows += sparse_rows(base, args, device, phases, notes)
        else:
            model = phases("copy model for low-rank", lambda: copy.deepcopy(base))
            phases("low-rank: two thin Linears per layer", lambda m=model: lowrank_50(m, args.rank_multiple))
            rows += measure(model, "lowrank-50%", args, device, phases)
            del model
        if args.out is not None:
            write_text(args.out, json.dumps(result(), indent=2) + "\n")
    for n in notes:
        print(n)
    out = result()
    print(out["table"])
    if args.out is not None:
        write_text(args.out, json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
