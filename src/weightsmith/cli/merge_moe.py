"""``weightsmith merge-moe CONFIG.yaml OUT`` (or ``--out OUT``): a Mixtral MoE from dense experts."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app

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
    config: Path = typer.Argument(..., help="mergekit-moe YAML."),
    out: Path | None = typer.Argument(None, help="Output model directory (or give it as --out)."),
    out_option: Path | None = typer.Option(None, "--out", help="Output model directory (same as OUT)."),
    device: str = typer.Option(
        "cpu", "--device", help="Where the base runs for hidden gates: cpu, cuda, cuda:N, auto."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of random gates and noise_scale."),
    allow_all_same: bool = typer.Option(
        False, "--allow-all-same", help="Allow every expert to be the same model (to train afterwards)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest output shard, e.g. 2GB or 500MB."),
) -> None:
    from ..merge import moe
    from ..progress import log
    from ._options import device as check_device
    from .merge import output

    target = output(out, out_option, "weightsmith merge-moe CONFIG.yaml OUT")
    import torch

    dev = check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    result = moe.run(
        config,
        target,
        device=dev,
        seed=seed,
        force=force,
        shard_size=shard_size,
        allow_all_same=allow_all_same,
    )
    log(f"MoE model written to {result}")
