"""Tiny checkpoints for the merge tests (Llama-shaped, written with plain safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "vocab_size": 40,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "hidden_act": "silu",
    "rope_theta": 10000.0,
}


def llama_shapes(cfg: dict = LLAMA_CONFIG) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], cfg: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg or LLAMA_CONFIG))
    return path


def make_family(
    root: Path, n: int = 3, seed: int = 0, scale: float = 0.05, dtype: torch.dtype = torch.float32
) -> tuple[Path, list[Path]]:
    """A random base and ``n`` 'fine-tunes' (base + independent Gaussian task vectors)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in llama_shapes().items()}
    base_dir = write_checkpoint(root / "base", {k: v.to(dtype) for k, v in base.items()})
    fts = []
    for j in range(n):
        ft = {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        fts.append(write_checkpoint(root / f"ft{j}", ft))
    return base_dir, fts


def cli_app():
    """A typer app with the ``merge`` command (plus a second command, so typer keeps subcommands)."""
    import typer

    from weightsmith.cli.merge import HELP, merge_cmd

    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("merge", help=HELP)(merge_cmd)
    app.command("version")(lambda: None)
    return app
