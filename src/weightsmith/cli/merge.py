"""``weightsmith merge RECIPE.yaml OUT`` (or ``--out OUT``): run a merge recipe (ours or mergekit's YAML)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app

HELP = """Merge checkpoints (or LoRA adapters) as a RECIPE.yaml says and write a Hugging Face model
directory to OUT (positional, as mergekit-yaml, or --out; sharded safetensors + index, config and tokenizer
copied from the base), atomically. A model may be a directory, a .safetensors file, a packaged model name
or a weightsmith adapt run of a full fine-tune (its model/ directory is used).

\b
Our recipe format (methods: average, task_arithmetic, ties, dare, dare_ties, gta, opcm, lora, the data-aware
regmean, fisher and adamerging (data: TASK or TEXT, samples, seq_len; docs/merging-data-aware.md), and every
mergekit method below under the same name, e.g. method: slerp with t: 0.3):
  method: ties              # its options sit beside it:
  density: 0.2              #   ties: density, scaling, trim (model|tensor), weighted_election
  scaling: 1.0              #   dare / dare_ties: p, scaling, rescale (inverse|l1), seed
  base: path/to/base        #   opcm: alpha (models are merged in the order listed)
  models:                   #   lora: mode (concat|dense); models are PEFT adapter directories
    - model: path/to/ft-a
      weight: 1.0
    - path/to/ft-b
  exclude: ["*classifier*"] # optional select/exclude globs: the rest is copied from the base
  dtype: bfloat16           # optional output dtype (default: the base's)

\b
mergekit YAML (detected by its merge_method key), read with mergekit 0.1.5's semantics:
  merge_method: ties        # linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, nuslerp,
                            # multislerp, karcher, model_stock, della, della_linear, breadcrumbs,
                            # breadcrumbs_ties, sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough
  base_model: path/to/base  # slerp: t; della: density, epsilon, lambda; breadcrumbs: density, gamma
  parameters: {normalize: true, lambda: 1.0}
  models:
    - model: path/to/ft-a
      parameters: {weight: 0.5, density: [0.2, 0.8]}   # scalars, layer gradients, {filter, value} lists
  dtype: float32
  # or slices: [{sources: [{model: a, layer_range: [0, 16]}, ...]}, ...]  (frankenmerges, scale filters)

Computation is float32 everywhere; see docs/merging.md for where mergekit's semantics differ from the
papers (weighted sign vote, L1 rescale in DARE, per-tensor trim) and how to get each with our recipe.
--exact-dtype repeats mergekit's own arithmetic in the YAML's dtype (bf16 deltas and sums for ties,
float32 for linear and slerp) so the files are bit-identical to mergekit's (linear, task_arithmetic,
ties, breadcrumbs, breadcrumbs_ties, slerp, passthrough). tokenizer_source (union | base | MODEL), the
tokenizer: block and chat_template build the output tokenizer and its embedding rows as mergekit does
(docs/merging-mergekit.md).
"""


def output(out: Path | None, out_option: Path | None, usage: str) -> Path:
    """The output directory, given as OUT or --out (not two different ones)."""
    from ..errors import WeightsmithError

    if out is not None and out_option is not None and out != out_option:
        raise WeightsmithError(f"two outputs given: OUT {out} and --out {out_option}; give one")
    target = out if out is not None else out_option
    if target is None:
        raise WeightsmithError(f"no output given: {usage} (or --out OUT)")
    return target


@app.command("merge", help=HELP)
def merge_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML: ours or mergekit's (auto-detected)."),
    out: Path | None = typer.Argument(None, help="Output model directory (or give it as --out)."),
    out_option: Path | None = typer.Option(None, "--out", help="Output model directory (same as OUT)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (float32, bfloat16, float16)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="Largest output shard, e.g. 2GB or 500MB."),
    exact_dtype: bool = typer.Option(
        False,
        "--exact-dtype",
        help="mergekit YAML: compute in the YAML's dtype exactly as mergekit does (bit-identical files) "
        "instead of float32.",
    ),
) -> None:
    from ..errors import WeightsmithError
    from ..merge import recipe as recipes
    from ..progress import log

    target = output(out, out_option, "weightsmith merge RECIPE.yaml OUT")
    from ..merge._core import parse_dtype

    try:
        parse_dtype(dtype)
    except WeightsmithError as exc:
        raise WeightsmithError(f"--dtype: {exc}") from None
    result = recipes.run(
        recipe,
        target,
        dtype=dtype,
        device=device,
        force=force,
        shard_size=shard_size,
        exact_dtype=exact_dtype,
    )
    log(f"merged model written to {result}")
