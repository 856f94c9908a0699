"""``weightsmith align``, ``barrier``, ``zoo-train`` and ``signature extract|apply|remove``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from ..errors import WeightsmithError
from ._app import app

SPECS = ("auto", "mlp", "cnn", "bert", "llama")
UNDO_SUFFIX = ".rws-undo.safetensors"


def _undo_path(model: Path) -> Path:
    """The undo record sits beside the patched model (never inside a model directory, where it would be
    read as a weight shard)."""
    return model.with_name(model.name + UNDO_SUFFIX)


def _load_state(spec: str) -> tuple[dict, Path]:
    from ..models import open_weights, resolve

    store = open_weights(spec)
    return {k: store[k] for k in store}, resolve(spec)


def _config(path: Path) -> dict | None:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def _write_state(state: dict, out: Path, like: Path, force: bool, metadata: dict | None = None) -> Path:
    """One .safetensors file (OUT ends in .safetensors) or a model directory with ``like``'s config files."""
    from safetensors.torch import save_file

    from ..store import ShardWriter, atomic_replace, prepare_output

    if out.suffix == ".safetensors":
        prepare_output(out, force)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp),
            metadata={"format": "pt", **(metadata or {})},
        )
        atomic_replace(tmp, out)
        return out
    with ShardWriter(out, force=force, metadata=metadata) as w:
        for k, v in state.items():
            w.add(k, v)
        if like.is_dir():
            w.copy_files(like, ("*.json", "*.txt", "*.model", "tokenizer*"))
    return out


def _spec(kind: str, state: dict, path: Path, residual: bool):
    from ..merge import permute

    cfg = _config(path)
    if kind == "auto":
        kind = "transformer" if cfg and "num_attention_heads" in cfg else "mlp"
    if kind in ("mlp", "cnn"):
        return permute.infer_chain_spec(state)
    if cfg is None:
        raise WeightsmithError(f"--spec {kind} needs the model's config.json (beside or inside {path})")
    if kind == "bert" and cfg.get("model_type") not in ("bert", "roberta", "xlm-roberta", "electra"):
        raise WeightsmithError(
            f"{path}: --spec bert, but config.json says model_type '{cfg.get('model_type')}'"
        )
    return permute.spec_from_config(state, cfg, residual)


@app.command("align")
def align_cmd(
    a: str = typer.Argument(..., help="Reference model A (model dir, .safetensors or packaged asset)."),
    b: str = typer.Argument(..., help="Model B, to be permuted onto A."),
    out: Path = typer.Option(..., "--out", help="Output: a .safetensors file or a model directory."),
    spec: str = typer.Option("auto", "--spec", help=f"Permutation spec: {', '.join(SPECS)}."),
    residual: bool = typer.Option(
        False, "--residual", help="Transformers: also permute the residual stream."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random layer order in weight matching."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Weight matching (Git Re-Basin, Ainsworth et al. 2023): write B with its hidden units and
    attention heads permuted to match A. The permuted B computes the same function as B."""
    import torch

    from ..merge.permute import apply_permutation, objective, weight_matching
    from ..progress import log

    if spec not in SPECS:
        raise WeightsmithError(f"unknown --spec '{spec}'; use one of {', '.join(SPECS)}")
    sa, pa = _load_state(a)
    sb, pb = _load_state(b)
    ps = _spec(spec, sa, pa, residual)
    before = objective(ps, sa, sb, {})
    perm = weight_matching(ps, sa, sb, seed=seed)
    after = objective(ps, sa, sb, perm)
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.values())
    path = _write_state(apply_permutation(sb, ps, perm), out, pb, force)
    log(f"{len(perm)} permutations, {moved} units moved; <A, B> {before:.4g} -> {after:.4g}; wrote {path}")


@app.command("zoo-train")
def zoo_train_cmd(
    out: Path = typer.Argument(..., help="Output .safetensors file."),
    kind: str = typer.Option("mlp", "--kind", help="mlp or cnn."),
    task: str = typer.Option("digits", "--task", help="digits or mnist1d."),
    variant: str | None = typer.Option(None, "--variant", help="rot90, rot180, flip, invert, perm or noise."),
    seed: int = typer.Option(0, "--seed"),
    width: int = typer.Option(256, "--width"),
    epochs: int = typer.Option(40, "--epochs"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train a small zoo model on packaged data (seconds on one CPU thread), e.g. for `barrier`."""
    import torch

    from .. import zoo
    from ..progress import log

    torch.set_num_threads(1)
    t = zoo.load_task(task, variant)
    m = zoo.train_model(kind, t, seed, width=width, epochs=epochs)
    zoo.save(m, out, force)
    log(f"{t.name} {kind}: test accuracy {zoo.evaluate(m, t.x_test, t.y_test)[1]:.3f}; wrote {out}")


@app.command("barrier")
def barrier_cmd(
    a: Path = typer.Argument(..., help="Zoo model A (.safetensors from `weightsmith zoo-train`)."),
    b: Path = typer.Argument(..., help="Zoo model B."),
    task: str = typer.Option("digits", "--task", help="digits or mnist1d (the test split is used)."),
    align: bool = typer.Option(False, "--align", help="Also weight-match B to A and measure again."),
    points: int = typer.Option(11, "--points", help="Interpolation points, ends included."),
    html: Path | None = typer.Option(None, "--html", help="Write an HTML report with the curves."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the curves as JSON."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Loss and accuracy barrier on the linear path A -> B, before and (--align) after weight matching.
    BatchNorm statistics are re-estimated on the training split at every point. For other models use
    weightsmith.merge.barrier.barrier(model, state_a, state_b, evaluate, spec) from Python."""
    import copy

    import torch

    from .. import zoo
    from ..merge.barrier import barrier, classification_eval, plot_barrier
    from ..merge.permute import infer_chain_spec
    from ..store import atomic_write_text, prepare_output

    torch.set_num_threads(1)
    for p in (html, json_out):
        if p is not None:
            prepare_output(p, force)
    ma, mb = zoo.load(a), zoo.load(b)
    t = zoo.load_task(task)
    sa, sb = ma.state_dict(), mb.state_dict()
    if {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
        raise WeightsmithError(f"{a} and {b} have different architectures")
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ma.modules())
    prepare = (lambda m: zoo.reset_bn_stats(m, t.x_train)) if has_bn else None
    curves = barrier(
        copy.deepcopy(ma),
        sa,
        sb,
        classification_eval(t.x_test, t.y_test),
        infer_chain_spec(sa) if align else None,
        k=points,
        prepare=prepare,
    )
    for name, c in curves.items():
        typer.echo(
            f"{name:8s} loss barrier {c.loss_barrier:.4f}  accuracy barrier {100 * c.acc_barrier:.2f} pp  "
            f"midpoint accuracy {c.midpoint_acc:.4f}"
        )
    if json_out is not None:
        atomic_write_text(json_out, json.dumps({k: c.to_dict() for k, c in curves.items()}, indent=1))
    if html is not None:
        from ..report import Report

        rep = Report(f"Barrier {a.name} -> {b.name}", f"task {task}, {points} points")
        rep.section("Linear interpolation", "Loss and accuracy of (1 - alpha) A + alpha B on the test split.")
        plot_barrier(curves, report=rep, caption="naive vs weight-matched path" if align else "naive path")
        rows = [[k, c.loss_barrier, 100 * c.acc_barrier, c.midpoint_acc] for k, c in curves.items()]
        rep.table(["path", "loss barrier", "accuracy barrier (pp)", "midpoint accuracy"], rows)
        rep.write(html)


sig_app = typer.Typer(
    help="Robust Weight Signatures (Cai et al. 2023): extract, apply, remove.", no_args_is_help=True
)
app.add_typer(sig_app, name="signature")


@sig_app.command("extract")
def sig_extract(
    robust: str = typer.Argument(..., help="Robust fine-tune (model dir or .safetensors)."),
    clean: str = typer.Argument(..., help="Clean fine-tune of the same model."),
    out: Path = typer.Option(..., "--out", help="Signature directory to write."),
    layers: int = typer.Option(1, "--layers", help="Number of shallow layers (with their norms)."),
    rank: int = typer.Option(8, "--rank", help="Singular directions kept per matrix."),
    bits: int = typer.Option(8, "--bits", help="Quantisation bits, 2..8 (4 and below are packed)."),
    base: str | None = typer.Option(None, "--base", help="Shared base: use the paper's projected form."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Signature = robust - clean (or tau_robust minus its projection on tau_clean) in the shallow layers."""
    from ..merge.signatures import extract_signature, save_signature
    from ..progress import log

    sig = extract_signature(
        _load_state(robust)[0],
        _load_state(clean)[0],
        layers,
        rank,
        bits,
        _load_state(base)[0] if base else None,
    )
    path = save_signature(sig, out, force)
    log(f"{len(sig.tensors)} tensors, {sig.nbytes()} bytes; wrote {path}")


@sig_app.command("apply")
def sig_apply(
    model: str = typer.Argument(..., help="Model to patch (model dir or .safetensors)."),
    signature: Path = typer.Argument(..., help="Signature directory."),
    out: Path = typer.Option(..., "--out", help="Patched model: a .safetensors file or a directory."),
    strength: float = typer.Option(1.0, "--strength", help="alpha: W + alpha * signature."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Patch a model; an undo record is written beside OUT so `signature remove` restores it bit-exactly."""
    from safetensors.torch import save_file

    from ..merge.signatures import apply_signature, load_signature
    from ..progress import log

    state, src = _load_state(model)
    patched, undo = apply_signature(state, load_signature(signature), strength)
    path = _write_state(patched, out, src, force)
    undo_path = _undo_path(path)
    save_file(undo, str(undo_path), metadata={"strength": repr(strength)})
    log(f"patched {len(undo)} tensors at strength {strength}; wrote {path} and {undo_path.name}")


@sig_app.command("remove")
def sig_remove(
    model: str = typer.Argument(..., help="A model patched by `signature apply`."),
    signature: Path = typer.Argument(..., help="The signature directory used to patch it."),
    out: Path = typer.Option(..., "--out", help="Restored model: a .safetensors file or a directory."),
    strength: float | None = typer.Option(None, "--strength", help="Needed only without an undo record."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Subtract the signature; with the undo record written by `apply` the original comes back bit-exactly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..merge.signatures import load_signature, remove_signature
    from ..progress import log

    state, src = _load_state(model)
    undo_path = _undo_path(src)
    undo = None
    if undo_path.is_file():
        undo = load_file(str(undo_path))
        with safe_open(str(undo_path), "pt") as f:
            strength = float((f.metadata() or {})["strength"])
    if strength is None:
        raise WeightsmithError(
            f"no undo record {undo_path.name} beside {src}; pass --strength (removal is then "
            "exact only up to float rounding)"
        )
    restored = remove_signature(state, load_signature(signature), strength, undo)
    path = _write_state(restored, out, src, force)
    log(f"removed signature at strength {strength} ({'bit-exact' if undo else 'approximate'}); wrote {path}")
