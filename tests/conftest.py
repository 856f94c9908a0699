"""Shared test set-up: one thread (the other core may be busy), offline hub, heavy models cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Converted assets (the SmolLM2 safetensors cache) persist between test runs in the repository's .cache.
os.environ.setdefault(
    "WEIGHTSMITH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "weightsmith")
)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from weightsmith import models

    return models.resolve("minilm")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M as a safetensors directory (converted from the packaged GGUF once, then cached)."""
    from weightsmith import models

    return models.resolve("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """(model, tokenizer) for SmolLM2-135M, loaded once per session. Do not modify it in place."""
    from weightsmith import models

    return models.load_model(smollm2_dir, task="causal-lm")


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path):
    """(encoder, tokenizer) for all-MiniLM-L6-v2, loaded once per session. Do not modify it in place."""
    from weightsmith import models

    return models.load_model(minilm_dir, task="encoder")
