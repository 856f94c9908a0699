"""``weightsmith align``, ``barrier``, ``zoo-train`` and ``signature extract|apply|remove``.

Every option and input is checked before weights are loaded or a model is trained; every output goes
through ``weightsmith.staging`` (``ShardWriter`` for model directories).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from ..errors import WeightsmithError
from . import _options as opt
from ._app import app

SPECS = ("auto", "mlp", "cnn", "bert", "llama")
UNDO_SUFFIX = ".rws-undo.safetensors"
MAX_POINTS = 1001


def _undo_path(model: Path) -> Path:
    """The undo record sits beside the patched model (never inside a model directory, where it would be
    read as a weight shard)."""
    return model.with_name(model.name + UNDO_SUFFIX)


def _open(spec: str, option: str) -> Any:
    from ..models import open_weights

    try:
        return open_weights(spec)
    except WeightsmithError as exc:
        msg = str(exc)
        raise WeightsmithError(msg if spec in msg else f"{option} {spec}: {msg}") from exc


def _same_architecture(stores: list[tuple[str, str, Any]], what: str) -> None:
    """Every ``(label, spec, store)`` has the first one's tensor names and shapes (headers only, no data)."""
    (l0, s0, first), *rest = stores
    shapes = {n: tuple(first.meta(n).shape) for n in first}
    for label, spec, store in rest:
        other = {n: tuple(store.meta(n).shape) for n in store}
        for n in [*shapes, *(k for k in other if k not in shapes)]:
            if shapes.get(n) != other.get(n):
                where = (
                    f"is missing in {label}"
                    if n not in other
                    else f"is missing in {l0}"
                    if n not in shapes
                    else f"has shape {list(shapes[n])} in {l0} but {list(other[n])} in {label}"
                )
                raise WeightsmithError(
                    f"{what}: {l0} ({s0}) and {label} ({spec}) have different architectures: "
                    f"tensor '{n}' {where}"
                )


def _config(path: Path) -> dict | None:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise WeightsmithError(f"{cfg}: not a readable JSON config ({str(exc)[:120]})") from exc
    if not isinstance(data, dict):
        raise WeightsmithError(f"{cfg}: expected a JSON object")
    return data


def _file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a single .safetensors file (e.g. a zoo model's architecture), else nothing."""
    from safetensors import safe_open

    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    meta.pop("format", None)
    return meta


def _is_file_output(out: Path) -> bool:
    return out.suffix == ".safetensors"


def _check_model_output(out: Path, force: bool, option: str = "--out") -> None:
    from ..staging import final_path, is_special

    if str(out) == "-":
        raise WeightsmithError(
            f"{option} -: a model cannot go to stdout; give a .safetensors file or directory"
        )
    if is_special(final_path(out)):
        raise WeightsmithError(
            f"{option} {out} is a special file; a model output must be a .safetensors file or a directory"
        )
    opt.outputs(force, (option, out), directory=not _is_file_output(out))


def _write_state(state: dict, out: Path, like: Path, force: bool, metadata: dict | None = None) -> Path:
    """One .safetensors file (OUT ends in .safetensors) or a model directory with ``like``'s config files."""
    from safetensors.torch import save

    from ..staging import final_path, write_bytes
    from ..store import ShardWriter

    if _is_file_output(out):
        data = save(
            {k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt", **(metadata or {})}
        )
        write_bytes(out, data, force=force)
        return final_path(out)
    with ShardWriter(out, force=force, metadata=metadata) as w:
        for k, v in state.items():
            w.add(k, v)
        if like.is_dir():
            w.copy_files(like, ("*.json", "*.txt", "*.model", "tokenizer*"))
    return final_path(out)


def _spec(kind: str, state: dict, path: Path, residual: bool) -> Any:
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
    a: str = typer.Argument(
        ..., metavar="A", help="Reference model A (model dir, .safetensors or packaged asset)."
    ),
    b: str = typer.Argument(..., metavar="B", help="Model B, to be permuted onto A."),
    out: Path = typer.Option(..., "--out", help="Output: a .safetensors file or a model directory."),
    spec: str = typer.Option("auto", "--spec", help=f"Permutation spec: {', '.join(SPECS)}."),
    residual: bool = typer.Option(
        False, "--residual", help="Transformers: also permute the residual stream."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random layer order in weight matching (>= 0)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Weight matching (Git Re-Basin, Ainsworth et al. 2023): write B with its hidden units and
    attention heads permuted to match A. The permuted B computes the same function as B. A zoo model's
    architecture record is kept, so an aligned zoo model feeds `weightsmith barrier`."""
    import torch

    from ..merge.permute import apply_permutation, objective, weight_matching
    from ..models import resolve
    from ..progress import log

    opt.choice(spec, "--spec", SPECS)
    if seed < 0:
        raise WeightsmithError(f"--seed {seed}: must be >= 0")
    sta, stb = _open(a, "A"), _open(b, "B")
    _same_architecture([("A", a, sta), ("B", b, stb)], "align")
    _check_model_output(out, force)
    pa, pb = resolve(a), resolve(b)
    sa, sb = {k: sta[k] for k in sta}, {k: stb[k] for k in stb}
    ps = _spec(spec, sa, pa, residual)
    before = objective(ps, sa, sb, {})
    perm = weight_matching(ps, sa, sb, seed=seed)
    after = objective(ps, sa, sb, perm)
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.values())
    path = _write_state(apply_permutation(sb, ps, perm), out, pb, force, metadata=_file_metadata(pb))
    log(f"{len(perm)} permutations, {moved} units moved; <A, B> {before:.4g} -> {after:.4g}; wrote {path}")


@app.command("zoo-train")
def zoo_train_cmd(
    out_arg: Path | None = typer.Argument(None, metavar="[OUT]", help="Output .safetensors (or use --out)."),
    out_opt: Path | None = typer.Option(None, "--out", help="Output .safetensors file."),
    kind: str = typer.Option("mlp", "--kind", help="mlp or cnn."),
    task: str = typer.Option("digits", "--task", help="digits or mnist1d."),
    variant: str | None = typer.Option(None, "--variant", help="rot90, rot180, flip, invert, perm or noise."),
    seed: int = typer.Option(0, "--seed", help=">= 0"),
    width: int = typer.Option(256, "--width", help="hidden width (MLP) or fc width (CNN), >= 1"),
    epochs: int = typer.Option(40, "--epochs", help=">= 1"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train a small zoo model on packaged data (seconds on one CPU thread), e.g. for `barrier`."""
    import torch

    from .. import zoo
    from ..progress import log

    if out_arg is not None and out_opt is not None and out_arg != out_opt:
        raise WeightsmithError(f"two outputs given (OUT {out_arg} and --out {out_opt}); give one")
    out = out_opt if out_opt is not None else out_arg
    if out is None:
        raise WeightsmithError("no output: give --out FILE.safetensors")
    if out.suffix != ".safetensors":
        raise WeightsmithError(f"--out {out}: a zoo model is one file; the name must end in .safetensors")
    opt.choice(kind, "--kind", ("mlp", "cnn"))
    opt.choice(task, "--task", zoo.TASKS)
    if variant is not None:
        opt.choice(variant, "--variant", zoo.VARIANTS)
    for name, value, low in (("--seed", seed, 0), ("--width", width, 1), ("--epochs", epochs, 1)):
        if value < low:
            raise WeightsmithError(f"{name} {value}: must be >= {low}")
    if width > zoo.MAX_DIM:
        raise WeightsmithError(f"--width {width}: at most {zoo.MAX_DIM} for a zoo model")
    _check_model_output(out, force)
    torch.set_num_threads(1)
    t = zoo.load_task(task, variant)
    m = zoo.train_model(kind, t, seed, width=width, epochs=epochs)
    zoo.save(m, out, force)
    log(f"{t.name} {kind}: test accuracy {zoo.evaluate(m, t.x_test, t.y_test)[1]:.3f}; wrote {out}")


@app.command("barrier")
def barrier_cmd(
    a: Path = typer.Argument(
        ..., metavar="A", help="Zoo model A (.safetensors from `weightsmith zoo-train` or `align`)."
    ),
    b: Path = typer.Argument(..., metavar="B", help="Zoo model B."),
    task: str = typer.Option("digits", "--task", help="digits or mnist1d (the test split is used)."),
    align: bool = typer.Option(False, "--align", help="Also weight-match B to A and measure again."),
    points: int = typer.Option(
        11, "--points", help=f"Interpolation points, ends included (2..{MAX_POINTS})."
    ),
    html: Path | None = typer.Option(None, "--html", help="Write an HTML report with the curves."),
    json_out: Path | None = typer.Option(
        None, "--out", "--json", help="Write the curves as JSON (--json is the old name of --out)."
    ),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Loss and accuracy barrier on the linear path A -> B, before and (--align) after weight matching.
    BatchNorm statistics are re-estimated on the training split at every point. For other models use
    weightsmith.analyze.barrier.barrier(model, state_a, state_b, evaluate, spec) from Python."""
    import copy

    import torch

    from .. import zoo
    from ..analyze.barrier import barrier, classification_eval, plot_barrier
    from ..merge.permute import infer_chain_spec
    from ..staging import write_text

    if not 2 <= points <= MAX_POINTS:
        raise WeightsmithError(
            f"--points {points}: must be between 2 and {MAX_POINTS} (both ends are included)"
        )
    opt.choice(task, "--task", zoo.TASKS)
    if html is not None and str(html) == "-":
        raise WeightsmithError("--html -: an HTML report goes to a file")
    torch.set_num_threads(1)
    ma, mb = zoo.load(a), zoo.load(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    if {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
        raise WeightsmithError(f"{a} and {b} have different architectures")
    t = zoo.load_task(task)
    zoo.check_task(ma, t, a)
    opt.outputs(force, ("--out", json_out), ("--html", html))
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
        text = json.dumps({k: c.to_dict() for k, c in curves.items()}, indent=1)
        if str(json_out) == "-":
            typer.echo(text)
        else:
            write_text(json_out, text + "\n", force=force)
    if html is not None:
        from ..report import Report

        rep = Report(f"Barrier {a.name} -> {b.name}", f"task {task}, {points} points")
        rep.section("Linear interpolation", "Loss and accuracy of (1 - alpha) A + alpha B on the test split.")
        plot_barrier(curves, report=rep, caption="naive vs weight-matched path" if align else "naive path")
        rows = [[k, c.loss_barrier, 100 * c.acc_barrier, c.midpoint_acc] for k, c in curves.items()]
        rep.table(["path", "loss barrier", "accuracy barrier (pp)", "midpoint accuracy"], rows)
        rep.write(html, force=force)


sig_app = typer.Typer(
    help="Robust Weight Signatures (Cai et al. 2023): extract, apply, remove.", no_args_is_help=True
)
app.add_typer(sig_app, name="signature")


def _signature(path: Path) -> Any:
    """``load_signature`` with every failure of a corrupt directory turned into a message naming it."""
    from ..merge.signatures import load_signature

    if not path.is_dir():
        raise WeightsmithError(
            f"SIGNATURE {path}: not a signature directory (see `weightsmith signature extract`)"
        )
    try:
        return load_signature(path)
    except WeightsmithError:
        raise
    except Exception as exc:  # a corrupt JSON or safetensors file: the reader's own error, named
        raise WeightsmithError(
            f"SIGNATURE {path}: not a readable signature directory ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def _strength(strength: float) -> None:
    if not math.isfinite(strength) or strength == 0:
        raise WeightsmithError(f"--strength {strength}: must be a finite, non-zero number")


@sig_app.command("extract")
def sig_extract(
    robust: str = typer.Argument(..., metavar="ROBUST", help="Robust fine-tune (model dir or .safetensors)."),
    clean: str = typer.Argument(..., metavar="CLEAN", help="Clean fine-tune of the same model."),
    out: Path = typer.Option(..., "--out", help="Signature directory to write."),
    layers: int = typer.Option(1, "--layers", help="Number of shallow layers (with their norms), >= 1."),
    rank: int = typer.Option(8, "--rank", help="Singular directions kept per matrix, >= 1."),
    bits: int = typer.Option(8, "--bits", help="Quantisation bits, 2..8 (4 and below are packed)."),
    base: str | None = typer.Option(None, "--base", help="Shared base: use the paper's projected form."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Signature = robust - clean (or tau_robust minus its projection on tau_clean) in the shallow layers."""
    from ..merge.signatures import extract_signature, save_signature
    from ..progress import log

    for name, value in (("--layers", layers), ("--rank", rank)):
        if value < 1:
            raise WeightsmithError(f"{name} {value}: must be >= 1")
    if not 2 <= bits <= 8:
        raise WeightsmithError(f"--bits {bits}: must be between 2 and 8")
    stores = [("ROBUST", robust, _open(robust, "ROBUST")), ("CLEAN", clean, _open(clean, "CLEAN"))]
    if base is not None:
        stores.append(("--base", base, _open(base, "--base")))
    _same_architecture(stores, "signature extract")
    opt.outputs(force, ("--out", out), directory=True)
    st = [{k: s[k] for k in s} for _, _, s in stores]
    sig = extract_signature(st[0], st[1], layers, rank, bits, st[2] if base is not None else None)
    path = save_signature(sig, out, force)
    log(f"{len(sig.tensors)} tensors, {sig.nbytes()} bytes; wrote {path}")


@sig_app.command("apply")
def sig_apply(
    model: str = typer.Argument(..., metavar="MODEL", help="Model to patch (model dir or .safetensors)."),
    signature: Path = typer.Argument(..., metavar="SIGNATURE", help="Signature directory."),
    out: Path = typer.Option(..., "--out", help="Patched model: a .safetensors file or a directory."),
    strength: float = typer.Option(
        1.0, "--strength", help="alpha: W + alpha * signature (finite, non-zero)."
    ),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Patch a model; an undo record is written beside OUT so `signature remove` restores it bit-exactly."""
    from safetensors.torch import save

    from ..merge.signatures import apply_signature
    from ..models import resolve
    from ..progress import log
    from ..staging import final_path, write_bytes

    _strength(strength)
    store = _open(model, "MODEL")
    sig = _signature(signature)
    _check_model_output(out, force)
    undo_path = _undo_path(final_path(out))
    opt.outputs(force, ("undo record", undo_path))
    state, src = {k: store[k] for k in store}, resolve(model)
    patched, undo = apply_signature(state, sig, strength)
    path = _write_state(patched, out, src, force)
    write_bytes(undo_path, save(undo, metadata={"strength": repr(strength)}), force=force)
    log(f"patched {len(undo)} tensors at strength {strength}; wrote {path} and {undo_path.name}")


@sig_app.command("remove")
def sig_remove(
    model: str = typer.Argument(..., metavar="MODEL", help="A model patched by `signature apply`."),
    signature: Path = typer.Argument(
        ..., metavar="SIGNATURE", help="The signature directory used to patch it."
    ),
    out: Path = typer.Option(..., "--out", help="Restored model: a .safetensors file or a directory."),
    strength: float | None = typer.Option(None, "--strength", help="Needed only without an undo record."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Subtract the signature; with the undo record written by `apply` the original comes back bit-exactly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..merge.signatures import remove_signature
    from ..models import resolve
    from ..progress import log

    if strength is not None:
        _strength(strength)
    store = _open(model, "MODEL")
    src = resolve(model)
    sig = _signature(signature)
    undo_path = _undo_path(src)
    undo = None
    if undo_path.is_file():
        try:
            undo = load_file(str(undo_path))
            with safe_open(str(undo_path), "pt") as f:
                strength = float((f.metadata() or {})["strength"])
        except Exception as exc:  # a corrupt undo record: name it
            raise WeightsmithError(
                f"{undo_path}: not a readable undo record ({type(exc).__name__}: {str(exc)[:200]}); move it "
                "away and pass --strength"
            ) from exc
    if strength is None:
        raise WeightsmithError(
            f"no undo record {undo_path.name} beside {src}; pass --strength (removal is then "
            "exact only up to float rounding)"
        )
    _check_model_output(out, force)
    state = {k: store[k] for k in store}
    restored = remove_signature(state, sig, strength, undo)
    path = _write_state(restored, out, src, force)
    log(f"removed signature at strength {strength} ({'bit-exact' if undo else 'approximate'}); wrote {path}")
