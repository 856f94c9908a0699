"""``--eval-examples`` counts examples on every task: windows (one forward pass each) for language
modelling, sentences for classification."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from weightsmith import evaluate
from weightsmith.errors import WeightsmithError
from weightsmith.tasks import get_task

torch.set_num_threads(1)


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([len(w) % 100 for w in text.split()])
        return SimpleNamespace(input_ids=ids.unsqueeze(0))


class CountingLM(nn.Module):
    """A causal LM with a constant loss of log 7 (perplexity 7) that records how many tokens each call
    scores."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels):
        scored = int((labels[:, 1:] != -100).sum())
        self.calls.append(scored)
        return SimpleNamespace(loss=torch.tensor(math.log(7.0)) + self.w)


def test_perplexity_max_windows_counts_forward_passes():
    text = " ".join(f"w{i}" for i in range(100))
    lm = CountingLM()
    ppl = evaluate.perplexity(lm, WordTokenizer(), text, window=20, stride=10, max_windows=3)
    assert len(lm.calls) == 3 and lm.calls == [19, 10, 10]
    assert ppl == pytest.approx(7.0)
    lm.calls.clear()
    evaluate.perplexity(lm, WordTokenizer(), text, window=20, stride=10)
    assert len(lm.calls) == 9  # windows start every 10 tokens until one reaches the end
    lm.calls.clear()  # the old token count: the first 60 tokens are exactly the first 5 windows
    evaluate.perplexity(lm, WordTokenizer(), text, window=20, stride=10, max_tokens=60)
    by_tokens = list(lm.calls)
    lm.calls.clear()
    evaluate.perplexity(lm, WordTokenizer(), text, window=20, stride=10, max_windows=5)
    assert lm.calls == by_tokens == [19, 10, 10, 10, 10]


def test_lm_task_eval_examples_are_windows():
    task = get_task("hamlet", max_len=16, eval_examples=4)
    lm = CountingLM()
    task.evaluate(lm, WordTokenizer(), "val")
    assert len(lm.calls) == 4, "eval_examples must count windows (forward passes), not tokens"
    assert sum(lm.calls) == 31 + 3 * 16  # the first window scores 2*max_len - 1 tokens, the others max_len


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_eval_examples_must_be_a_positive_integer(bad):
    with pytest.raises(WeightsmithError, match="--eval-examples"):
        get_task("hamlet", eval_examples=bad)
