"""The real user's first call: RTN of a local checkpoint, one fresh process a run, ``weightsmith compress``
against an llm-compressor script doing the same job (issue 9: at least 3x faster, also on the first call).

Each run starts a new Python process, so every run is a first call: imports, the model load, the
quantisation (with whatever start-up it has: Triton's import and first launch, CUDA's lazy kernel loading)
and the compressed save. Timed from the parent: the whole process's wall time. From the child: its
quantisation step (ours: ``seconds`` of the output's ``compression.json``, the ``compress`` call; llm-
compressor: the ``oneshot`` call) and, for llm-compressor, the import / load / save phases.

- ours: ``python -m weightsmith compress DIR --method rtn --bits B --group-size G --format
  compressed-tensors --device DEV --out OUT --force`` with ``--resident R`` and ``WEIGHTSMITH_RTN_KERNEL=K``
  per variant (``--variants``: ``R`` or ``R:K``, e.g. ``auto`` (the default CLI), ``host``,
  ``device:torch``, ``device:triton``);
- llm-compressor: this file with ``--llmc-child``: ``from_pretrained(DIR, dtype=D, device_map=DEV)``,
  ``oneshot(model, recipe=QuantizationModifier(config_groups={int B-bit symmetric group G weights of every
  Linear}, ignore=["lm_head"]))`` (no calibration data: RTN's min-max observers need none),
  ``save_pretrained(OUT, save_compressed=True)`` and the tokenizer. ``D`` is float32, as our CLI loads
  (``--llmc-dtype auto`` for the checkpoint's own dtype).

The checkpoint is written once (``--make`` with ``--size``: a random-init Llama of bench_compress.py's
``random_llama``, 1b = 1.1B (hidden 2048, 22 layers), tiny = 2 layers of 64), in ``--dtype``.

``--gil``: whether priming in a side thread slows a CPU-bound load on the main thread (docs/compress-first-
call.md): each repeat a fresh process that loads DIR's weights with safetensors' ``load_file``
(or transformers' import and ``from_pretrained``, as ``load_model`` does) alone, or with a thread that
imports Triton and computes its cache key (``triton_key()``, what the kernel's first launch spends most of its
start-up on) at the same time; ``small_ops`` stands for a launch-bound quantisation (the GPU batches' host
side) running beside the thread.

On the GPU machine (H200)::

    python benchmarks/bench_compress_process.py --make /tmp/rl1b --size 1b --dtype fp32
    python benchmarks/bench_compress_process.py --model /tmp/rl1b --device cuda --runs 3 \\
        --variants auto,host,device:torch,device:triton \\
        --json benchmarks/results/rtn_process_random1b_h200.json

On the CPU (a test of the script): ``--make /tmp/rlt --size tiny`` then ``--model /tmp/rlt --device cpu
--group-size 32 --runs 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIL_LOADS = ("safetensors", "from_pretrained", "small_ops")
ROOT = HERE.parent


def make_checkpoint(where: Path, size: str, dtype: str, text: Path | None = None) -> None:
    """A random-init Llama-shaped model and its tokenizer (trained on ``text``, default the packaged
    Hamlet) written to ``where``."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_compress import random_llama

    from weightsmith.assets import load_text

    model, tok = random_llama(size, text.read_text(encoding="utf-8") if text else load_text("hamlet"))
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(where)
    tok.save_pretrained(where)
    print(f"wrote {where}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} G parameters, {dtype}")


def llmc_child(model_dir: str, out: str, device: str, bits: int, group: int, dtype: str) -> None:
    """The llm-compressor script (one process): prints its phases as one JSON line."""
    t0 = time.perf_counter()
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t1 = time.perf_counter()
    kind = "auto" if dtype == "auto" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=kind, device_map=device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    _sync(device)
    t2 = time.perf_counter()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    recipe = QuantizationModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]
    )
    oneshot(model=model, recipe=recipe)
    _sync(device)
    t3 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "quant_s": t3 - t2, "save_s": t4 - t3}))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return wall, run


def run_ours(args: argparse.Namespace, variant: str, out: Path) -> dict[str, Any]:
    resident, _, kernel = variant.partition(":")
    env = {**os.environ, "WEIGHTSMITH_RTN_KERNEL": kernel or "auto"}
    cmd = [sys.executable, "-m", "weightsmith", "compress", args.model, "--method", "rtn",
           "--bits", str(args.bits), "--group-size", str(args.group_size), "--format", "compressed-tensors",
           "--device", args.device, "--resident", resident, "--out", str(out), "--force"]  # fmt: skip
    wall, _ = _timed(cmd, env)
    info = json.loads((out / "compression.json").read_text())
    return {"tool": f"weightsmith ({variant})", "wall_s": wall, "quant_s": info["seconds"]}


def run_llmc(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--llmc-child", "--model", args.model, "--out-dir", str(out),
           "--device", args.device, "--bits", str(args.bits), "--group-size", str(args.group_size),
           "--llmc-dtype", args.llmc_dtype]  # fmt: skip
    wall, run = _timed(cmd, dict(os.environ))
    phases = json.loads(run.stdout.strip().splitlines()[-1])
    return {"tool": "llm-compressor", "wall_s": wall, **phases}


def gil_child(model_dir: str, what: str, side: bool) -> None:
    """One load of ``model_dir`` (``what``: safetensors ``load_file`` of its weights, or transformers'
    import and ``from_pretrained``, as ``load_model`` does; or ``small_ops``, 40,000 tiny CPU ops, which
    hold the GIL as a launch-bound quantisation does), with or without the priming-like thread."""
    import threading

    import torch

    torch.set_num_threads(1)
    took: dict[str, float] = {}

    def prime_like() -> None:
        t = time.perf_counter()
        import triton  # noqa: F401

        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # older Triton
            from triton.compiler.compiler import triton_key
        triton_key()
        took["side_s"] = time.perf_counter() - t

    thread = threading.Thread(target=prime_like, daemon=True)
    t0 = time.perf_counter()
    if side:
        thread.start()
    if what == "small_ops":  # launch-bound like the torch batches' host side: many tiny kernels, GIL held
        x = torch.randn(64, 64)
        for _ in range(20000):
            x = (x * 1.0001).clamp_(-5, 5)
    elif what == "safetensors":
        from safetensors.torch import load_file

        for f in sorted(Path(model_dir).glob("*.safetensors")):
            load_file(f)
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    took["load_s"] = time.perf_counter() - t0
    if side:
        thread.join()
    print(json.dumps(took))


def run_gil(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows, loads = [], args.gil_loads.split(",")
    for what in loads:
        for rep in range(args.runs):
            for side in (False, True):
                cmd = [sys.executable, __file__, "--gil-child", what, "--model", args.model]
                _, run = _timed(cmd + (["--side"] if side else []), dict(os.environ))
                row = {"load": what, "side_thread": side, "repeat": rep}
                row.update(json.loads(run.stdout.strip().splitlines()[-1]))
                print(row)
                rows.append(row)
    for what in loads:
        for side in (False, True):
            v = [float(r["load_s"]) for r in rows if r["load"] == what and r["side_thread"] == side]
            med, low = statistics.median(v), min(v)
            print(f"{what:16s} side thread {side!s:5s}: load s median {med:.3f} min {low:.3f}")
    return rows


def summarise(rows: list[dict[str, Any]]) -> None:
    tools = dict.fromkeys(r["tool"] for r in rows)
    print(f"{'tool':32s} {'wall s (first / median / min)':32s} {'quant s (first / median / min)':32s}")
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool]
        cols = []
        for key in ("wall_s", "quant_s"):
            v = [r[key] for r in mine]
            cols.append(f"{v[0]:.3f} / {statistics.median(v):.3f} / {min(v):.3f}")
        print(f"{tool:32s} {cols[0]:32s} {cols[1]:32s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=Path, help="write a random Llama checkpoint here and stop")
    ap.add_argument("--size", default="1b", choices=["1b", "tiny"])
    ap.add_argument("--text", type=Path, default=None, help="--make: a text file for the tokenizer")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the checkpoint's dtype")
    ap.add_argument("--model", help="the local checkpoint directory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes a tool (or repeats of --gil)")
    ap.add_argument("--variants", default="auto,host", help="ours: --resident[:WEIGHTSMITH_RTN_KERNEL], ...")
    ap.add_argument("--tools", default="weightsmith,llmcompressor")
    ap.add_argument("--llmc-dtype", default="float32", choices=["float32", "auto"])
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--gil", action="store_true", help="the side-thread load check instead (see above)")
    ap.add_argument("--llmc-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gil-child", choices=GIL_LOADS, help=argparse.SUPPRESS)
    ap.add_argument(
        "--gil-loads", default=",".join(GIL_LOADS), help="--gil: which of " + ", ".join(GIL_LOADS)
    )
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make_checkpoint(args.make, args.size, args.dtype, args.text)
    if not args.model:
        ap.error("--model DIR is needed (write one with --make DIR)")
    if args.llmc_child:
        return llmc_child(args.model, args.out_dir, args.device, args.bits, args.group_size, args.llmc_dtype)
    if args.gil_child:
        return gil_child(args.model, args.gil_child, args.side)
    if args.gil:
        rows = run_gil(args)
    else:
        rows = []
        tools = args.tools.split(",")
        with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
            for rep in range(args.runs):  # the tools alternate, so a drift in the machine hits both
                if "weightsmith" in tools:
                    for v in args.variants.split(","):
                        rows.append({**run_ours(args, v, Path(tmp) / "ws"), "run": rep})
                        print(rows[-1])
                if "llmcompressor" in tools:
                    rows.append({**run_llmc(args, Path(tmp) / "llmc"), "run": rep})
                    print(rows[-1])
        summarise(rows)
    if args.json:
        from weightsmith.staging import write_text

        meta = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
        write_text(args.json, json.dumps({"args": meta, "rows": rows}, indent=1) + "\n", force=True)


if __name__ == "__main__":
    main()
