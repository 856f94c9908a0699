"""Tiny Llama-shaped models (random weights) and calibration batches for the compress and layer tests."""

from __future__ import annotations

import torch


def tiny_llama(vocab: int = 256, seed: int = 0, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def calib(vocab: int = 256, n: int = 4, length: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": ids[i : i + 2]} for i in range(0, n, 2)]
