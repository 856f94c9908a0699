"""Side by side with llm-compressor: RTN, GPTQ and AWQ on the same model, calibration data and evaluator.

For each method and bit width both libraries quantise a fresh copy of the model on the same calibration
windows (``weightsmith.compress.calibration_batches``: --samples windows of --seq-len tokens of Hamlet's
first 90 %), then the held-out perplexity (last 10 %, strided windows of 512) is measured by the same
function (``weightsmith.evaluate.perplexity``). Reported: perplexity, wall time of the quantisation, and
peak memory (CUDA peak allocated on a GPU; the process's peak RSS on the CPU), and the relative error of the
logits on 4 x 256 held-out tokens. Our GPTQ runs with ``act_order`` on, as llm-compressor's default
(``actorder: static``) does; on a 2-layer random Llama (3 bits, group 16) the two then agree to 4 digits in
logit error (0.1761 both) and RTN's logits agree exactly.

llm-compressor (``llmcompressor``) is imported only here; without it the script runs weightsmith alone.
llmcompressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19; install it with ``--no-deps``
(``pip install --no-deps llmcompressor==0.14.0.1``) so the environment keeps its versions (it imports and
runs with transformers 5.24 and compressed-tensors 0.20.1). Its AWQ needs an accelerator (``pin_memory``).

    .venv/bin/python benchmarks/bench_compress.py --device cuda --model smollm2 --group-size 64 \
        --out benchmarks/results/compress_vs_llmcompressor_smollm2.json
    .venv/bin/python benchmarks/bench_compress.py --device cuda --model DIR_OF_A_1B_LLAMA --group-size 128 \
        --out benchmarks/results/compress_vs_llmcompressor_1b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from weightsmith.compress import calibration_batches, compress, heldout_text
from weightsmith.config import config_from_dict
from weightsmith.evaluate import perplexity
from weightsmith.models import load_model

LLMC_MODIFIER = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", "awq": "AWQModifier"}


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(
    model: Any, method: str, bits: int, group: int, calib: list[Any], dev: torch.device, tok: Any
) -> Any:
    opts: dict[str, Any] = {"method": method, "bits": bits, "group_size": group}
    if method == "gptq":
        opts["act_order"] = True  # llm-compressor's GPTQModifier default: actorder "static"
    cfg = config_from_dict(opts, "compress")
    m, _ = compress(model, cfg, calib=calib if cfg.needs_calibration() else None, device=dev)
    return m


def run_llmcompressor(
    model: Any, method: str, bits: int, group: int, calib: list[Any], dev: torch.device, tok: Any
) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import awq, quantization

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        strategy="group" if group else "channel",
        group_size=group or None,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    mod = awq.AWQModifier if method == "awq" else getattr(quantization, LLMC_MODIFIER[method])
    recipe = mod(config_groups=groups, ignore=["lm_head"])
    ids = torch.cat([b["input_ids"] for b in calib])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model.to(dev)
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
    )
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens scored (0 = all)")
    ap.add_argument("--libraries", default="weightsmith,llmcompressor")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    base, tok = load_model(args.model, task="causal-lm")
    text = heldout_text("hamlet")
    calib = calibration_batches(tok, "hamlet", args.samples, args.seq_len)
    libs = args.libraries.split(",")
    if "llmcompressor" in libs:
        try:
            import llmcompressor  # noqa: F401
        except ImportError:
            print("llmcompressor is not installed: running weightsmith alone")
            libs.remove("llmcompressor")

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
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            for lib in libs:
                m = copy.deepcopy(base)
                _peak_reset(dev)
                t0 = time.perf_counter()
                fn = run_ours if lib == "weightsmith" else run_llmcompressor
                m = fn(m, method, bits, args.group_size, calib, dev, tok)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - t0
                peak = _peak_mb(dev)
                row = {"library": lib, "method": method, "bits": bits, "group": args.group_size,
                       "ppl": ppl(m), "logit_error": logit_error(m), "seconds": seconds,
                       "peak_mb": peak}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
                if args.out is not None:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1))
                del m
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
