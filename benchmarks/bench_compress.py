"""Side by side with llm-compressor: RTN, GPTQ, AWQ, SparseGPT and Wanda on the same model, calibration data
and evaluator.

For each method and bit width both libraries quantise a fresh copy of the model on the same calibration
windows (``weightsmith.compress.calibration_batches``: --samples windows of --seq-len tokens of Hamlet's
first 90 %), then the held-out perplexity (last 10 %, strided windows of 512) is measured by the same
function (``weightsmith.evaluate.perplexity``). Reported: perplexity, wall time of the quantisation, and
peak memory (CUDA peak allocated on a GPU; the process's peak RSS on the CPU), and the relative error of the
logits on 4 x 256 held-out tokens. Our GPTQ runs with ``act_order`` on, as llm-compressor's default
(``actorder: static``) does; on a 2-layer random Llama (3 bits, group 16) the two then agree to 4 digits in
logit error (0.1761 both) and RTN's logits agree exactly.

Pruners (``--methods sparsegpt,wanda``) run at each ``--prune`` setting (``0.5``: 50 % unstructured; ``2:4``:
keep 2 of every 4 input weights) against llm-compressor's ``SparseGPTModifier`` / ``WandaPruningModifier``
with the same sparsity or ``mask_structure``, damping 0.01 and block 128 (both libraries' defaults); the
rows report ``sparsity`` (the setting) instead of bits. Our Wanda compares weights within each output row
(the paper's group), as llm-compressor's does.

Where the model lives (``--resident``; default: both for data-free methods on a GPU, ``host`` otherwise):
``host`` starts every run from the model in host memory and ends it there, for both tools (ours through its
pinned pipeline; llm-compressor's ``model.to(device)``, ``oneshot`` and ``model.to("cpu")`` all timed);
``device`` moves the model to ``--device`` before the clock starts, for both tools (ours then runs on the
weights in place; llm-compressor's ``oneshot`` only), and the model stays there. The peak (CUDA max allocated,
first run) then counts the resident model itself (``model_mb``; ``start_mb``: allocated when the clock
started); ``ends_on`` says where the model was at the end.
``--repeats N`` times N fresh copies (``seconds`` is the first run, ``seconds_best`` the best). ``--floor``
times the copies behind a data-free compress of the host model (pageable → pinned → device and back, CUDA's
own pageable copies, host dequantisation from uint8 codes).

    .venv/bin/python benchmarks/bench_compress.py --device cuda --model random-llama-1b \
        --text gpu_data/hamlet.txt --methods rtn --bits 4 --group-size 128 --samples 64 --seq-len 512 \
        --resident host,device --repeats 3 --floor --json OUT.json

llm-compressor (``llmcompressor``) is imported only here; without it the script runs weightsmith alone.
llmcompressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19; install it with ``--no-deps``
(``pip install --no-deps llmcompressor==0.14.0.1``) so the environment keeps its versions (it imports and
runs with transformers 5.24 and compressed-tensors 0.20.1). Its AWQ needs an accelerator (``pin_memory``).

    .venv/bin/python benchmarks/bench_compress.py --device cuda --model smollm2 --group-size 64 \
        --out benchmarks/results/compress_vs_llmcompressor_smollm2.json
    .venv/bin/python benchmarks/bench_compress.py --device cuda --model DIR_OF_A_1B_LLAMA --group-size 128 \
        --out benchmarks/results/compress_vs_llmcompressor_1b.json
    .venv/bin/python benchmarks/bench_compress.py --device cuda --model random-llama-1b \
        --methods sparsegpt,wanda --prune 0.5,2:4 --samples 128 --seq-len 512 --eval-tokens 4096 \
        --out benchmarks/results/prune_vs_llmcompressor_1b.json
    .venv/bin/python benchmarks/bench_compress.py --model random-llama-tiny --methods sparsegpt,wanda \
        --samples 8 --seq-len 64 --eval-tokens 512      # a CPU smoke run (seconds)

Where no trained model can travel (the GPU machine reaches no hub and carries at most 64 MiB), ``--model
random-llama-1b`` builds a random-init Llama-shaped 1.1B model (hidden 2048, 22 layers, intermediate 5632,
32/4 heads) with a BPE tokenizer trained on ``--text`` (a plain text file: its first 90 % calibrates, the
rest is held out). Its perplexity means nothing (random weights); time, peak memory and the logit error
relative to the unquantised model compare the two libraries' work on the same layers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from weightsmith.assets import load_text
from weightsmith.compress import calibration_batches, compress, heldout_text
from weightsmith.config import config_from_dict
from weightsmith.evaluate import perplexity
from weightsmith.models import load_model
from weightsmith.staging import write_text

LLMC_MODIFIER = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", "awq": "AWQModifier"}
PRUNERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


def prune_setting(spec: str) -> dict[str, Any]:
    """``"0.5"`` -> ``{"sparsity": 0.5}``; ``"2:4"`` -> ``{"n": 2, "m": 4}``."""
    if ":" in spec:
        n, m = spec.split(":")
        return {"n": int(n), "m": int(m)}
    return {"sparsity": float(spec)}


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def random_llama(size: str, text: str) -> tuple[Any, Any]:
    """A random-init Llama-shaped model and a byte-level BPE tokenizer (vocab 8192) trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(text.splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    dims = {"1b": (2048, 22, 5632, 32, 4), "tiny": (64, 2, 176, 4, 2)}[size]
    h, n, inter, heads, kv = dims
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=len(tok), max_position_embeddings=2048,
                      bos_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    # llm-compressor reads the config and tokenizer back from the model's path: give it one
    where = Path(tempfile.mkdtemp(prefix="random-llama-"))
    cfg.save_pretrained(where)
    tok.save_pretrained(where)
    model.config._name_or_path = str(where)
    return model.cpu().eval(), tok


def zero_fraction(model: Any) -> float:
    """The fraction of exact zeros over the weights of the decoder's Linear layers (lm_head left out)."""
    ws = [
        mod.weight
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name
    ]
    return sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)


def run_ours(
    model: Any,
    method: str,
    bits: int,
    group: int,
    calib: list[Any],
    dev: torch.device,
    tok: Any,
    extra: dict[str, Any] | None = None,
    prune: dict[str, Any] | None = None,
) -> Any:
    opts: dict[str, Any] = {"method": method, "bits": bits, "group_size": group}
    if method in PRUNERS:
        opts = {"method": method, **(prune or {})}
    if method == "gptq":
        opts["act_order"] = True  # llm-compressor's GPTQModifier default: actorder "static"
    opts.update((extra or {}).get(method, {}))
    cfg = config_from_dict(opts, "compress")
    m, _ = compress(model, cfg, calib=calib if cfg.needs_calibration() else None, device=dev)
    return m


def run_llmcompressor(
    model: Any,
    method: str,
    bits: int,
    group: int,
    calib: list[Any],
    dev: torch.device,
    tok: Any,
    prune: dict[str, Any] | None = None,
) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import awq, pruning, quantization

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        strategy="group" if group else "channel",
        group_size=group or None,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    if method in PRUNERS:
        p = prune or {}
        structure = f"{p['n']}:{p['m']}" if p.get("m") else "0:0"
        recipe = getattr(pruning, PRUNERS[method])(
            sparsity=p.get("sparsity", 0.5), mask_structure=structure, ignore=["re:.*lm_head"]
        )  # its pruners name a matched Linear "lm_head." (trailing dot): a plain "lm_head" would not match
    else:
        mod = awq.AWQModifier if method == "awq" else getattr(quantization, LLMC_MODIFIER[method])
        recipe = mod(config_groups=groups, ignore=["lm_head"])
    ids = torch.cat([b["input_ids"] for b in calib])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    home = next(model.parameters()).device
    model.to(dev)  # a no-op when the model is already resident on the device
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
    )
    return model.to(home)  # back where it started: host memory for --resident host


def data_free(method: str) -> bool:
    """Whether our ``method`` compresses without calibration (RTN, HQQ, magnitude pruning, ...)."""
    return not config_from_dict({"method": method}, "compress").needs_calibration()


def copy_floor(model: Any, dev: torch.device, group: int) -> dict[str, Any]:
    """What a data-free compress of ``model`` (host-resident) on the CUDA device ``dev`` has to move, timed
    piece by piece over its target weights in their dtype: pageable → pinned (``stage``), pinned → device,
    device → pinned, pinned → pageable (``land``), the pageable copies CUDA stages itself (what ``.to()``
    does) and the alternative of bringing back uint8 codes and dequantising on the host: ``(q − z)·s``
    against the copy it replaces, timed on the largest weight and projected over all of them. Seconds, one
    pass each."""
    from weightsmith.layers import find_layers

    ws = [ly.weight().detach() for ly in find_layers(model)]
    sizes = [w.numel() * w.element_size() for w in ws]
    big = max(sizes)

    def timed(fn: Any) -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        return round(time.perf_counter() - t0, 4)

    def at(buf: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return buf[: w.numel() * w.element_size()].view(w.dtype).view(w.shape)

    out: dict[str, Any] = {"library": "floor", "method": "data-free copies", "weights_gb": sum(sizes) / 1e9,
                           "weights": len(ws), "host_threads": torch.get_num_threads()}  # fmt: skip
    t0 = time.perf_counter()
    pinned = torch.empty(big, dtype=torch.uint8, pin_memory=True)
    out["pinned_alloc_s"] = round(time.perf_counter() - t0, 4)
    scratch = torch.zeros(big, dtype=torch.uint8)
    on_dev = torch.empty(big, dtype=torch.uint8, device=dev)
    out["stage_s"] = timed(lambda: [at(pinned, w).copy_(w) for w in ws])
    out["h2d_pinned_s"] = timed(lambda: [at(on_dev, w).copy_(at(pinned, w), non_blocking=True) for w in ws])
    out["d2h_pinned_s"] = timed(lambda: [at(pinned, w).copy_(at(on_dev, w), non_blocking=True) for w in ws])
    out["land_s"] = timed(lambda: [at(scratch, w).copy_(at(pinned, w)) for w in ws])
    out["h2d_pageable_s"] = timed(lambda: [at(on_dev, w).copy_(w) for w in ws])
    out["d2h_pageable_s"] = timed(lambda: [at(scratch, w).copy_(at(on_dev, w)) for w in ws])
    w = max(ws, key=lambda t: t.numel())
    o, i = w.shape
    g = group if group and i % group == 0 else i
    q = torch.randint(0, 16, (o, i // g, g), dtype=torch.uint8)
    scale, zero = torch.rand(o, i // g, 1) + 0.1, torch.full((o, i // g, 1), 8.0)
    dst, src = torch.empty(o, i // g, g), torch.randn(o, i // g, g)
    reps, share = 5, sum(t.numel() for t in ws) / w.numel()

    def dequant() -> None:
        for _ in range(reps):
            torch.sub(q, zero, out=dst)
            dst.mul_(scale)

    def memcpy() -> None:
        for _ in range(reps):
            dst.copy_(src)

    out["host_dequant_fp32_s"] = round(timed(dequant) / reps * share, 4)
    out["host_copy_fp32_s"] = round(timed(memcpy) / reps * share, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="smollm2", help="a model name/dir, or random-llama-1b / random-llama-tiny"
    )
    ap.add_argument("--text", type=Path, default=None, help="a text file instead of the packaged Hamlet")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--prune", default="0.5,2:4", help="pruners' settings: sparsities and N:M, e.g. 0.5,2:4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens scored (0 = all)")
    ap.add_argument("--libraries", default="weightsmith,llmcompressor")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model weights, both tools")
    ap.add_argument("--out", "--json", dest="out", type=Path, default=None, help="the rows, as JSON")
    ap.add_argument(
        "--resident",
        default=None,
        help="where the model lives when the timing starts and ends: host (both tools start and end in host "
        "memory), device (already on --device, both tools, not timed), or host,device (default: both for "
        "data-free methods on a GPU, host for the others)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each job, a fresh copy each")
    ap.add_argument("--floor", action="store_true", help="also time the copies behind a data-free compress")
    ap.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="METHOD:K=V",
        help="an option of our method, e.g. gptq:fused=false (the eager column loop); repeatable",
    )
    args = ap.parse_args()
    places = None if args.resident is None else args.resident.split(",")
    if places is not None and not set(places) <= {"host", "device"}:
        ap.error(f"--resident {args.resident}: use host, device or host,device")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: use 1 or more")
    extra: dict[str, dict[str, Any]] = {}
    for item in args.opt:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        try:
            extra.setdefault(name, {})[key] = json.loads(value)  # numbers, true/false
        except ValueError:
            extra.setdefault(name, {})[key] = value
    dev = torch.device(args.device)
    full = args.text.read_text(encoding="utf-8") if args.text else None
    if args.model.startswith("random-llama-"):
        base, tok = random_llama(args.model.removeprefix("random-llama-"), full or load_text("hamlet"))
    else:
        base, tok = load_model(args.model, task="causal-lm")
    if args.dtype == "bf16":
        base = base.to(torch.bfloat16)
    if full is None:
        text, calib_src = heldout_text("hamlet"), "hamlet"
    else:
        cut = full.rfind("\n", 0, int(len(full) * 0.9)) + 1
        text, calib_src = full[cut:], str(args.text.with_suffix(".calib.txt"))
        Path(calib_src).write_text(full[:cut], encoding="utf-8")
    libs = args.libraries.split(",")
    if "llmcompressor" in libs:
        try:
            import llmcompressor  # noqa: F401
        except ImportError:
            print("llmcompressor is not installed: running weightsmith alone")
            libs.remove("llmcompressor")
    methods = args.methods.split(",")
    need_calib = "llmcompressor" in libs or not all(data_free(m) for m in methods)
    calib = calibration_batches(tok, calib_src, args.samples, args.seq_len) if need_calib else []

    def ppl(m: Any) -> float:
        m.to(dev)
        return perplexity(
            m, tok, text, window=512, stride=256, max_tokens=args.eval_tokens or None, device=dev
        )

    probe = tok(text, return_tensors="pt").input_ids[0][: 4 * 256].view(4, 256)
    with torch.no_grad():
        ref = base.to(dev)(probe.to(dev)).logits.float()
    base.to("cpu")

    def logit_error(m: Any) -> float:
        with torch.no_grad():
            out = m.to(dev)(probe.to(dev)).logits.float()
        return float((out - ref).norm() / ref.norm())

    rows: list[dict[str, Any]] = [{"library": "-", "method": "fp", "ppl": ppl(copy.deepcopy(base))}]
    print(rows[-1], flush=True)
    jobs: list[tuple[str, int, dict[str, Any] | None]] = [
        (method, int(b), None) for b in args.bits.split(",") for method in methods if method not in PRUNERS
    ]
    jobs += [
        (method, 0, prune_setting(p))
        for p in args.prune.split(",")
        for method in methods
        if method in PRUNERS
    ]
    model_mb = sum(t.numel() * t.element_size() for t in base.state_dict().values()) / 2**20
    for method, bits, prune in jobs:
        on_gpu = dev.type != "cpu"
        where = places or (["host", "device"] if on_gpu and data_free(method) else ["host"])
        for place, lib in [(p, lib) for p in where for lib in libs]:
            if lib == "llmcompressor" and method not in LLMC_MODIFIER and method not in PRUNERS:
                continue  # llm-compressor has no such method
            times, peak, start, m = [], 0.0, 0.0, None
            for _ in range(args.repeats):
                m = None  # the previous repeat's model goes before the next copy is made
                gc.collect()
                m = copy.deepcopy(base)
                if place == "device":
                    m.to(dev)  # resident before the timing starts (both tools)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    start = start or torch.cuda.memory_allocated(dev) / 2**20
                _peak_reset(dev)  # the peak then counts a resident model's own memory
                t0 = time.perf_counter()
                if lib == "weightsmith":
                    m = run_ours(m, method, bits, args.group_size, calib, dev, tok, extra, prune)
                else:  # host: .to(dev), oneshot, .to("cpu") all timed; device: oneshot only
                    m = run_llmcompressor(m, method, bits, args.group_size, calib, dev, tok, prune)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
                peak = peak or _peak_mb(dev)  # the first run's (a library may hold on to its last model)
            assert m is not None
            where_now = next(m.parameters()).device.type
            row: dict[str, Any] = {"library": lib, "method": method, "resident": place}
            if prune is None:
                row |= {"bits": bits, "group": args.group_size}
            else:
                row |= {"sparsity": f"{prune['n']}:{prune['m']}" if "m" in prune else prune["sparsity"],
                        "zeros": zero_fraction(m)}  # fmt: skip
            row |= {"ppl": ppl(m), "logit_error": logit_error(m), "seconds": times[0], "peak_mb": peak,
                    "start_mb": start, "model_mb": model_mb, "ends_on": where_now}  # fmt: skip
            if len(times) > 1:
                row |= {"seconds_best": min(times), "seconds_all": times}
            if lib == "weightsmith" and extra.get(method):
                row["opts"] = extra[method]
            rows.append(row)
            print(row, flush=True)
            if args.out is not None:
                write_text(args.out, json.dumps(rows, indent=1))
            del m
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.floor and dev.type == "cuda":
        try:
            rows.append(copy_floor(base, dev, args.group_size))
        except Exception as exc:  # a probe must not lose the rows above
            rows.append({"library": "floor", "error": repr(exc)})
        print(rows[-1], flush=True)
        if args.out is not None:
            write_text(args.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
