"""Tiny Llama-shaped models (random weights) and calibration batches for the compress and layer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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


def run_under_triton_interpreter(child: str, tests_dir: Path, src_dir: Path) -> list[str]:
    """Run ``child`` (Python source; argv[1:] = ``tests_dir``, ``src_dir``) in a fresh process with
    ``TRITON_INTERPRET=1`` and no GPU; the lines it printed. Fails the test on a non-zero exit."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-c", child, str(tests_dir), str(src_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def hopper_ptx(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any]) -> str:
    """``kernel`` compiled to PTX for sm_90 (H100/H200) without a GPU, with FMA contraction off; skips the
    test where this Triton build cannot compile for that target."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    except (ImportError, RuntimeError, FileNotFoundError) as exc:  # no ptxas in this Triton build
        pytest.skip(f"Triton cannot compile for sm_90 here: {exc}")
    return str(out.asm["ptx"])


def hessian_problem(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [out_f, in_f] and the Hessian 2 XᵀX / n of inputs with a rank-8 structure plus noise (badly
    conditioned, as real layer inputs are) for the OBS-update tests of GPTQ and SparseGPT."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(256, 8, generator=g) @ torch.randn(8, in_f, generator=g)
    X += 0.1 * torch.randn(256, in_f, generator=g)
    return W, 2 * X.T @ X / X.shape[0]
