"""Matrix Nuclear-Norm (Li et al., 2024): the formula by hand, and the per-window plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.analyze import matrix_nuclear_norm, text_mnn
from weightsmith.analyze.nuclear import last_hidden_states, normalize_rows


def test_formula_worked_by_hand() -> None:
    R = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # centred rows: (1/3, -2/3), (-2/3, 1/3), (1/3, 1/3)
    # unit rows: (1, -2)/sqrt5, (-2, 1)/sqrt5, (1, 1)/sqrt2
    # column norms: sqrt(1/5 + 4/5 + 1/2) = sqrt(1.5) each; D = min(3, 2) = 2
    assert matrix_nuclear_norm(R) == pytest.approx(2 * math.sqrt(1.5))
    assert matrix_nuclear_norm(R, D=1) == pytest.approx(math.sqrt(1.5))


def test_column_norm_sum_bounds_the_nuclear_norm() -> None:
    R = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    X = normalize_rows(R)
    assert matrix_nuclear_norm(R, D=20) >= float(torch.linalg.matrix_norm(X, ord="nuc")) - 1e-9


class _Tokenizer:
    """Stands in for a HF tokenizer: one token id per character."""

    def __call__(self, text: str, return_tensors: str, add_special_tokens: bool) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}


def test_text_mnn_averages_windows_of_the_last_hidden_states() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    text = "to be or not to be, that is the question" * 2  # 80 characters: windows of 32, 32 and 16
    out = text_mnn(model, _Tokenizer(), text, max_tokens=32, max_windows=None)
    assert out["windows"] == 3 and out["tokens"] == 80
    ids = _Tokenizer()(text, "pt", False)["input_ids"]
    first = matrix_nuclear_norm(last_hidden_states(model, ids[:, :32])) / 32
    assert out["per_window"][0] == pytest.approx(first)
    assert out["mnn"] == pytest.approx(sum(out["per_window"]) / 3)
    short = text_mnn(model, _Tokenizer(), text[:70], max_tokens=32)  # tail of 6 < 16 tokens is dropped
    assert short["windows"] == 2
    with pytest.raises(ValueError, match="no tokens"):
        text_mnn(model, _Tokenizer(), "", max_tokens=32)
