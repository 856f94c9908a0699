"""Evaluation: perplexity of a causal LM on a text (strided windows) and classification accuracy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .progress import log


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
) -> float:
    """Perplexity with strided sliding windows: each token is scored once, with up to ``window - stride``
    tokens of left context beyond its own window start (the standard Hugging Face recipe).

    ``max_tokens`` cuts the text to its first tokens; ``max_windows`` scores only the first windows (one
    forward pass each: the first scores ``window`` tokens, every later one ``stride`` new tokens)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total = math.ceil(max(len(ids) - window, 0) / stride) + 1  # windows until one reaches the end
    if max_windows is not None:
        total = min(total, max_windows)
    ticker = _Ticker("perplexity", total, "windows")
    nll, count, prev_end = 0.0, 0, 0
    for n_window, begin in enumerate(range(0, len(ids), stride)):
        if max_windows is not None and n_window >= max_windows:
            break
        ticker.tick(n_window)
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        chunk = ids[begin:end].unsqueeze(0).to(device)
        labels = chunk.clone()
        labels[:, :-target_len] = -100
        loss = model(input_ids=chunk, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    ticker.done()
    return math.exp(nll / max(count, 1))


class _Ticker:
    """Progress of an evaluation on stderr: a status line about every ``every`` seconds (from the first
    ``every`` seconds on, so a quick evaluation prints nothing), whether or not stderr is a terminal; a
    live bar would print nothing until the end when output goes to a file or a pipe."""

    def __init__(self, what: str, total: int, unit: str, every: float = 15.0) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self.last = time.perf_counter()
        self.shown = False

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last, self.shown = now, True
            log(f"{self.what}: {done}/{self.total} {self.unit} ({now - self.start:.0f} s)", markup=False)

    def done(self) -> None:
        if self.shown:
            took = time.perf_counter() - self.start
            log(f"{self.what}: {self.total}/{self.total} {self.unit} ({took:.0f} s)", markup=False)


@torch.no_grad()
def accuracy(predict: Callable[[Sequence[Any]], torch.Tensor], x: Sequence[Any], y: Sequence[int],
             batch_size: int = 64) -> float:  # fmt: skip
    """Fraction of ``x`` whose ``predict(batch).argmax(-1)`` equals ``y``."""
    correct = 0
    ticker = _Ticker("accuracy", len(y), "examples")
    for i in range(0, len(y), batch_size):
        ticker.tick(i)
        logits = predict(x[i : i + batch_size])
        correct += int((logits.argmax(-1).cpu() == torch.as_tensor(y[i : i + batch_size])).sum())
    ticker.done()
    return correct / max(len(y), 1)
