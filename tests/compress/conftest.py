"""Tiny Llama-shaped models (random weights, real SmolLM2 tokenizer) for the compress tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from compress_fixtures import tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """A saved 2-layer Llama with SmolLM2's vocabulary and tokenizer (loads like any HF model)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny") / "llama"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(vocab=len(tok))
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
