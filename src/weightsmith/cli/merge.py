"""``weightsmith merge RECIPE.yaml OUT`` (or ``--out OUT``): run a merge recipe (ours or mergekit's YAML);
``weightsmith merge MODEL... --method NAME --out DIR``: the same recipe given as options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..errors import WeightsmithError
from ._app import app

HELP = """Merge checkpoints (or LoRA adapters) as a RECIPE.yaml says, or as options say, and write a Hugging
Face model directory to OUT (positional, as mergekit-yaml, or --out; sharded safetensors + index, config and
tokenizer copied from the base), atomically. A model may be a directory, a .safetensors file, a packaged model
name or a weightsmith adapt run of a full fine-tune (its model/ directory is used).

\b
One line, no YAML (the recipe below, built from options; written to OUT/weightsmith_recipe.yaml):
  weightsmith merge MODEL_A MODEL_B ... [--base BASE] --method NAME [--opt KEY=VALUE ...]
                    [--weights W1,W2,...] [--calib DATA --samples N --seq-len L] --out DIR
  weightsmith merge ft-a ft-b --base base --method ties --opt density=0.2 --out merged
  weightsmith merge ft-a --base base --method slerp --opt t=0.3 --out merged
  weightsmith merge ft-a ft-b --method linear --weights 0.3,0.7 --out merged     # mergekit's linear
  weightsmith merge ft-a ft-b --method regmean --calib hamlet --samples 64 --seq-len 128 --out merged
--opt sets an option of the method (as in the recipe); --calib (once for all models, or once per model),
--samples and --seq-len set the data of regmean, fisher and adamerging. --mergekit reads NAME and --opt
as a mergekit YAML would (merge_method: NAME, --opt under parameters:), as linear and dare_linear always are.

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


# the options `merge` and `merge-moe` share, declared once
OUT_ARGUMENT = typer.Argument(None, metavar="[OUT]", help="Output model directory (or give it as --out).")
OUT_OPTION = typer.Option(None, "--out", help="Output model directory (same as OUT).")
FORCE = typer.Option(False, "--force", help="Replace OUT if it exists.")
SHARD_SIZE = typer.Option("2GB", "--shard-size", help="Largest output shard, e.g. 2GB or 500MB.")
DATA_FLAGS = {"data": "--calib", "samples": "--samples", "seq_len": "--seq-len"}


def output(out: Path | None, out_option: Path | None, usage: str) -> Path:
    """The output directory, given as OUT or --out (not two different ones)."""
    if out is not None and out_option is not None and out != out_option:
        raise WeightsmithError(f"two outputs given: OUT {out} and --out {out_option}; give one")
    target = out if out is not None else out_option
    if target is None:
        raise WeightsmithError(f"no output given: {usage}" + ("" if "--out" in usage else " (or --out OUT)"))
    return target


def write(run: Callable[..., Path], source: Any, target: Path, force: bool, what: str, **kw: Any) -> Path:
    """Check ``target`` up front (nothing is read or written when it is refused), run ``run(source, target,
    force=..., **kw)`` and say where the model went."""
    from ..progress import log
    from ..staging import check_output

    check_output(target, force, directory=True)
    result = run(source, target, force=force, **kw)
    log(f"{what} written to {result}")
    return result


def parse_weights(text: str | None, n_models: int) -> list[float] | None:
    """``--weights 0.3,0.7``: one finite number per model."""
    import math

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise WeightsmithError(
            f"--weights {text}: expected numbers separated by commas, one per model (e.g. 0.3,0.7)"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise WeightsmithError(f"--weights {text}: every weight must be a finite number")
    if len(values) != n_models:
        raise WeightsmithError(f"--weights {text}: {len(values)} weight(s) for {n_models} model(s)")
    return values


def method_options(
    method: str, opt: list[str], calib: list[str], samples: int | None, seq_len: int | None
) -> dict[str, Any]:
    """The method's options from ``--opt KEY=VALUE`` (values read as YAML) and the data flags, which only a
    method with data options (regmean, fisher, adamerging) takes."""
    from ..config import parse_opts, registered
    from ..merge._dataaware import check_source
    from ..merge.recipe import DATA_AWARE
    from ..tasks import CLASSIFICATION_TASKS

    options = {k: v for k, (_, v) in parse_opts(opt, "density=0.2").items()}
    if isinstance(options.get("data"), str):
        options["data"] = [options["data"]]
    cls = registered("merge").get(method)
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    given = {"data": list(calib) or None, "samples": samples, "seq_len": seq_len}
    for key, value in given.items():
        if value is None:
            continue
        flag = DATA_FLAGS[key]
        if key not in fields:
            raise WeightsmithError(
                f"{flag}: method '{method}' reads no data (the data-aware merges: {', '.join(DATA_AWARE)})"
            )
        if key in options:
            raise WeightsmithError(f"{flag} and --opt {key}=... both given; give one")
        options[key] = value
    if "data" in fields and not options.get("data"):
        raise WeightsmithError(
            f"--calib: method '{method}' needs data (a data set such as {CLASSIFICATION_TASKS[0]}, a "
            "packaged text such as hamlet, or a text file; once for all models or once per model)"
        )
    for source in calib:
        try:
            check_source(source)
        except WeightsmithError as exc:
            raise WeightsmithError(f"--calib {source}: {exc}") from None
    return options


@app.command("merge", help=HELP)
def merge_cmd(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="RECIPE|MODEL",
        help="A recipe YAML (ours or mergekit's, auto-detected) and OUT; or, with --method, the models.",
    ),
    out_option: Path | None = OUT_OPTION,
    method: str | None = typer.Option(
        None, "--method", help="Merge the models given with this method (any recipe method name)."
    ),
    base: str | None = typer.Option(None, "--base", help="With --method: the base model."),
    weights: str | None = typer.Option(
        None, "--weights", help="With --method: one weight per model, e.g. 0.3,0.7 (default 1 each)."
    ),
    opt: list[str] = typer.Option([], "--opt", help="With --method: a method option KEY=VALUE (repeatable)."),
    calib: list[str] = typer.Option(
        [],
        "--calib",
        help="Data-aware methods: a data set (rotten_tomatoes, ...), packaged text (hamlet) or text file; "
        "once for all models or once per model.",
    ),
    samples: int | None = typer.Option(None, "--samples", help="Data-aware methods: examples per model."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Data-aware methods: tokens per example."),
    mergekit: bool = typer.Option(
        False, "--mergekit", help="With --method: mergekit 0.1.5's semantics for NAME and --opt."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (float32, bfloat16, float16)."),
    force: bool = FORCE,
    shard_size: str = SHARD_SIZE,
    exact_dtype: bool = typer.Option(
        False,
        "--exact-dtype",
        help="mergekit YAML (or --mergekit): compute in the YAML's dtype exactly as mergekit does "
        "(bit-identical files) instead of float32.",
    ),
) -> None:
    from ..merge import recipe as recipes
    from ..merge._core import parse_dtype

    try:
        parse_dtype(dtype)
    except WeightsmithError as exc:
        raise WeightsmithError(f"--dtype: {exc}") from None
    source: recipes.Recipe | Path
    if method is None:
        flags = {"--base": base, "--weights": weights, "--opt": opt, "--calib": calib, "--samples": samples}
        flags.update({"--seq-len": seq_len, "--mergekit": mergekit or None})
        stray = [flag for flag, value in flags.items() if value not in (None, [])]
        if stray:
            raise WeightsmithError(
                f"{stray[0]} goes with --method NAME and the models on the command line; a recipe YAML "
                "gives it in the file"
            )
        if len(inputs) > 2:
            raise WeightsmithError(
                f"{len(inputs)} arguments: give RECIPE.yaml [OUT], or MODEL... --method NAME --out DIR"
            )
        out = Path(inputs[1]) if len(inputs) == 2 else None
        target = output(out, out_option, "weightsmith merge RECIPE.yaml OUT")
        source = recipes.load_recipe(inputs[0], exact_dtype=exact_dtype)
    else:
        first = Path(inputs[0])
        if first.suffix in (".yaml", ".yml") and first.is_file():
            raise WeightsmithError(
                f"{first} is a recipe and --method {method} merges models: give a recipe, or models with "
                "--method"
            )
        target = output(None, out_option, "weightsmith merge MODEL... --method NAME --out DIR")
        data = recipes.recipe_data(
            method,
            inputs,
            base=base,
            weights=parse_weights(weights, len(inputs)),
            options=method_options(method, opt, calib, samples, seq_len),
            dtype=dtype,
            mergekit=mergekit,
        )
        if exact_dtype and "merge_method" not in data:
            raise WeightsmithError(
                f"--exact-dtype reproduces mergekit's arithmetic: add --mergekit (--method {method} read as "
                "mergekit's) or drop it"
            )
        source = recipes.command_line_recipe(data, exact_dtype=exact_dtype)
    write(
        recipes.run,
        source,
        target,
        force,
        "merged model",
        dtype=dtype,
        device=device,
        shard_size=shard_size,
        exact_dtype=exact_dtype,
    )
