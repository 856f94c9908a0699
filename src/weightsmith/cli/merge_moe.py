"""``weightsmith merge-moe CONFIG.yaml OUT`` (or ``--out OUT``): a Mixtral MoE from dense experts."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app
from .merge import FORCE, OUT_ARGUMENT, OUT_OPTION, SHARD_SIZE, output, write

HELP = """Assemble a Mixtral mixture-of-experts model from dense Llama/Mistral experts as a mergekit-moe
CONFIG.yaml says, and write it to OUT (positional, as mergekit-moe, or --out), atomically: attention,
norms, embeddings and head from base_model, each layer's MLP from every expert, and a router whose rows
come from gate_mode.

\b
  base_model: path/to/base
  gate_mode: hidden          # hidden | hidden_avg | cheap_embed | random | uniform_random
  dtype: bfloat16
  experts_per_token: 2
  experts:
    - source_model: path/to/code-ft
      positive_prompts: ["def fibonacci(n):"]
      negative_prompts: ["Once upon a time"]   # optional
      residual_scale: 1.0                      # optional; noise_scale too
    - source_model: path/to/story-ft
      positive_prompts: ["Once upon a time"]

hidden: each router row is the base model's (bf16) hidden state entering the layer for the expert's
prompts (last token; hidden_avg: mean over positions), minus its negative prompts', unit length.
See docs/merging-mergekit.md.
"""


@app.command("merge-moe", help=HELP)
def merge_moe_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", help="mergekit-moe YAML."),
    out: Path | None = OUT_ARGUMENT,
    out_option: Path | None = OUT_OPTION,
    device: str = typer.Option(
        "cpu", "--device", help="Where the base runs for hidden gates: cpu, cuda, cuda:N, auto."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of random gates and noise_scale."),
    allow_all_same: bool = typer.Option(
        False, "--allow-all-same", help="Allow every expert to be the same model (to train afterwards)."
    ),
    force: bool = FORCE,
    shard_size: str = SHARD_SIZE,
) -> None:
    import torch

    from ..merge import moe
    from ._options import device as check_device

    target = output(out, out_option, "weightsmith merge-moe CONFIG.yaml OUT")
    dev = check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    write(
        moe.run, config, target, force, "MoE model", device=dev, seed=seed, shard_size=shard_size,
        allow_all_same=allow_all_same,
    )  # fmt: skip
