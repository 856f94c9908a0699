"""``weightsmith recipe FILE``: run a recipe's steps (registered configs of the jobs) in order."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app

HELP = (
    "Run the steps of a recipe FILE (YAML) in order on one model. A recipe is {model: NAME or DIR, steps: "
    "[{KIND: {method: NAME, fields..., step options...}}, ...]}; today's step kind is compress (options "
    "calib, samples, seq_len, format, out), so a step says what --method/--opt/--calib/--format/--out say "
    "on the command line. Each step works on the model the previous one left unless it names its own "
    "model. Relative paths are taken from the recipe's folder. Every step is checked before the first "
    "model loads; each output is written complete or not at all. Under torchrun each step's calibration "
    "is shared out over the processes and rank 0 writes. Example: weightsmith recipe smollm2-gptq.yaml"
)


@app.command("recipe", help=HELP)
def recipe_cmd(
    file: Path = typer.Argument(..., metavar="FILE", help="recipe YAML file"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
    force: bool = typer.Option(False, "--force", help="replace the steps' outputs if they exist"),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from ..recipe import run_recipe

    for line in run_recipe(file, device, force):  # lines on rank 0 only
        Console().print(escape(line), highlight=False, soft_wrap=True)
