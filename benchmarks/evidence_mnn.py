"""Matrix Nuclear-Norm (Li et al., 2024) tracks model quality: the paper reports MNN falling as models get
better (larger). We cannot load several sizes offline, so we degrade the packaged SmolLM2 in known ways and
check that MNN moves with perplexity: the pretrained model should have the lowest MNN.

    python benchmarks/evidence_mnn.py [--tokens 256] [--windows 4]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from weightsmith import assets, evaluate, models
from weightsmith.analyze import matrix_nuclear_norm, text_mnn
from weightsmith.analyze.nuclear import last_hidden_states, normalize_rows


def matrix_entropy(R: torch.Tensor) -> float:
    """Matrix entropy of the row-normalised hidden states (the SVD-based metric MNN replaces)."""
    Z = normalize_rows(R.double())
    ev = torch.linalg.eigvalsh(Z.mT @ Z).clamp_min(0)
    p = ev / ev.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def speed(model: torch.nn.Module, tok: object, text: str, tokens: int, repeats: int = 5) -> str:
    """The paper's headline: MNN needs no SVD, so it is several times faster than matrix entropy."""
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]  # type: ignore[operator]
    with torch.no_grad():
        R = last_hidden_states(model, ids)
    times = {}
    for name, fn in (("MNN", matrix_nuclear_norm), ("matrix entropy", matrix_entropy)):
        fn(R)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(R)
        times[name] = (time.perf_counter() - t0) / repeats
    ratio = times["matrix entropy"] / times["MNN"]
    return (
        f"hidden states {tuple(R.shape)}: MNN {times['MNN'] * 1e3:.2f} ms, matrix entropy "
        f"{times['matrix entropy'] * 1e3:.2f} ms ({ratio:.1f}x)"
    )


def degraded(noise: float, layers: int | None) -> tuple[torch.nn.Module, object]:
    model, tok = models.load_model("smollm2", task="causal-lm")
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    if noise:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.add_(torch.randn(p.shape, generator=g) * noise * p.norm() / math.sqrt(p.numel()))
    return model.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    text = assets.load_text("hamlet")
    print("| SmolLM2 variant | perplexity (Hamlet, first 1024 tokens) | MNN / L |")
    print("|---|---|---|")
    variants = [
        ("pretrained", 0.0, None),
        ("weights + 30 % noise", 0.3, None),
        ("weights + 60 % noise", 0.6, None),
        ("first 15 of 30 layers", 0.0, 15),
    ]
    for label, noise, layers in variants:
        model, tok = degraded(noise, layers)
        with torch.no_grad():
            ppl = evaluate.perplexity(model, tok, text, window=256, stride=256, max_tokens=1024)
            mnn = text_mnn(model, tok, text, max_tokens=a.tokens, max_windows=a.windows)["mnn"]
        print(f"| {label} | {ppl:.1f} | {mnn:.4f} |", flush=True)
        if noise == 0.0 and layers is None:
            timing = speed(model, tok, text, tokens=2048)
    print(f"\nSpeed, one thread: {timing}")


if __name__ == "__main__":
    main()
