"""``weightsmith extract-lora BASE TUNED --rank R --out DIR``: a PEFT LoRA from a fine-tune."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app

HELP = """Extract a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that turns BASE into
TUNED: each changed Linear weight's update TUNED - BASE is replaced by its rank-R truncated SVD
(lora_B = U sqrt(S), lora_A = sqrt(S) Vh, lora_alpha = r: scale 1), as mergekit-extract-lora does.
Embeddings, norms and other tensors that changed are saved whole (modules_to_save), unless --embed-lora;
a Linear's bias update goes to lora_B.bias. Tensors are streamed one at a time; DIR is written atomically.
BASE and TUNED may be model directories, .safetensors files, packaged model names or MODEL+LORA references.
"""


@app.command("extract-lora", help=HELP)
def extract_lora_cmd(
    base: str = typer.Argument(
        ..., metavar="BASE", help="Base model (directory, .safetensors, packaged name)."
    ),
    tuned: str = typer.Argument(..., metavar="TUNED", help="Fine-tuned model of the same architecture."),
    rank: int = typer.Option(..., "--rank", "-r", help="LoRA rank (largest rank with --sv-epsilon)."),
    out: Path = typer.Option(..., "--out", help="Output PEFT adapter directory."),
    force: bool = typer.Option(False, "--force", help="Replace DIR if it exists."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    embed_lora: bool = typer.Option(
        False, "--embed-lora", help="Embeddings as LoRA (embedding LoRA; lm_head as Linear LoRA)."
    ),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Drop singular values <= this."),
    save_module: list[str] = typer.Option(  # noqa: B008
        [], "--save-module", help="Keep this module whole (full path or last name component); repeatable."
    ),
) -> None:
    from ..merge.extract_lora import extract_lora
    from ..progress import log

    done = extract_lora(
        base,
        tuned,
        rank,
        out,
        force=force,
        device=device,
        embed_lora=embed_lora,
        sv_epsilon=sv_epsilon,
        modules_to_save=save_module,
    )
    if done.errors:
        worst = max(done.errors, key=lambda k: done.errors[k])
        mean = sum(done.errors.values()) / len(done.errors)
        log(
            f"{len(done.errors)} weights as LoRA (relative error mean {mean:.3g}, largest "
            f"{done.errors[worst]:.3g} on '{worst}'), {len(done.saved)} tensors saved whole",
            markup=False,
        )
    log(f"PEFT LoRA adapter written to {done.out}", markup=False)
