"""Bounded memory on the CPU: the copy-free LM loss equals the plain one, and micro-batches give the
batch's loss and gradients (issue 14)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith import evaluate
from weightsmith.tasks import get_task, lm_loss
from weightsmith.train import TrainArgs, check_args

torch.set_num_threads(1)


def _tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def test_lm_loss_equals_shifted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (3, 11), generator=g)
    plain = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ours = lm_loss(logits, ids)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    (g_plain,) = torch.autograd.grad(plain, logits)
    (g_ours,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-6, atol=1e-7)
    assert float(g_ours[:, -1].abs().sum()) == 0.0  # the last position predicts nothing


def test_lm_loss_matches_the_models_own_loss():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(lm_loss(out.logits, ids), out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_tokens", [16, 40, 47])
def test_micro_batches_give_the_batch_loss_and_gradients(max_tokens):
    task = get_task("hamlet", max_len=16)
    model = _tiny_llama()
    ids = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    whole = task.loss(model, batch)
    whole.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = task.split(batch, max_tokens)
    assert len(pieces) == -(-5 // max(1, max_tokens // 16))
    assert sum(len(p["input_ids"]) for p, _ in pieces) == 5 and sum(w for _, w in pieces) == pytest.approx(1)
    total = 0.0
    for piece, weight in pieces:
        loss = task.loss(model, piece) * weight
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(whole), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_split_keeps_small_batches_whole_and_checks_the_option():
    task = get_task("hamlet", max_len=16)
    ids = torch.zeros(4, 16, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids}
    assert task.split(batch, None) == [(batch, 1.0)]
    assert task.split(batch, 64) == [(batch, 1.0)]
    check_args(TrainArgs(micro_batch_tokens=8))
    from weightsmith.errors import WeightsmithError

    with pytest.raises(WeightsmithError, match="--micro-batch-tokens"):
        check_args(TrainArgs(micro_batch_tokens=0))


def test_perplexity_reports_progress_on_long_evaluations(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(evaluate, "log", lambda msg, markup=True: lines.append(msg))
    clock = iter(range(0, 10_000, 10))  # every call to the clock moves it 10 s on
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: float(next(clock)))

    class Tok:
        def __call__(self, text, return_tensors=None):
            from types import SimpleNamespace

            return SimpleNamespace(input_ids=torch.arange(100).unsqueeze(0) % 97)

    model = _tiny_llama()
    ppl = evaluate.perplexity(model, Tok(), "x", window=20, stride=10)
    assert ppl > 1
    assert lines and lines[-1].startswith("perplexity: 9/9 windows")
    assert all("windows" in line for line in lines)
