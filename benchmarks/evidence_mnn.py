"""Matrix Nuclear-Norm (Li et al., 2024) tracks model quality: the paper reports MNN falling as models get
better (larger). We cannot load several sizes offline, so we degrade the packaged SmolLM2 in known ways and
check that MNN moves with perplexity: the pretrained model should have the lowest MNN.

    python benchmarks/evidence_mnn.py [--tokens 256] [--windows 4]
"""

from __future__ import annotations

import argparse
import math

import torch

from weightsmith import assets, evaluate, models
from weightsmith.analyze import text_mnn


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


if __name__ == "__main__":
    main()
