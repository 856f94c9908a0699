"""``weightsmith analyze``, ``compare`` and ``nuclear-norm``: read what the weights say.

Every option is checked before a model is read (``_options``); outputs go through ``weightsmith.staging``.
``--out`` is the primary output (the JSON metrics); ``--json`` is its old name, kept as an alias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..errors import WeightsmithError
from ..progress import log
from . import _options as opt
from ._app import app

OUT_HELP = "write the {} as JSON here ('-': stdout); --json is the old name of --out"
HTML_HELP = "write a self-contained HTML report here"
SELECT_HELP = "comma-separated weight patterns (globs, re:regex, words); each must match a weight"
PRECISIONS = ("auto", "float64", "float32")


def _check_outputs(json_out: Path | None, html_out: Path | None, force: bool) -> None:
    if html_out is not None and str(html_out) == "-":
        raise WeightsmithError("--html -: an HTML report goes to a file; use --out - for JSON on stdout")
    opt.outputs(force, ("--out", json_out), ("--html", html_out))


def _emit(data: dict[str, Any], json_out: Path | None, html_out: Path | None, force: bool) -> None:
    from ..staging import write_text

    text = json.dumps(data, indent=1, allow_nan=False)
    if (json_out is None and html_out is None) or str(json_out) == "-":
        typer.echo(text)
    elif json_out is not None:
        write_text(json_out, text + "\n", force=force)
        log(f"wrote {json_out}")


def _open(spec: str, option: str) -> Any:
    from .. import models

    try:
        return models.open_weights(spec)
    except WeightsmithError as exc:
        msg = str(exc)
        raise WeightsmithError(msg if spec in msg else f"{option} {spec}: {msg}") from exc


def _selected(select: str | None, *stores: Any) -> None:
    """Every pattern of ``--select`` must match a tensor of every store (checked from headers only)."""
    from ..select import Selector

    if select is None:
        return
    if not select.strip(" ,"):
        raise WeightsmithError("--select '': give at least one pattern, or leave --select out")
    sel = Selector.of(select)
    for store in stores:
        try:
            sel.require(list(store), f"tensors of {store.source}", each=True)
        except WeightsmithError as exc:
            raise WeightsmithError(f"--select: {exc}") from exc


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="asset name, model directory, .safetensors file or hub id"
    ),
    json_out: Path | None = typer.Option(None, "--out", "--json", help=OUT_HELP.format("metrics")),
    html_out: Path | None = typer.Option(None, "--html", help=HTML_HELP),
    select: str | None = typer.Option(None, "--select", help=SELECT_HELP),
    device: str = typer.Option("auto", "--device", help=opt.DEVICE_HELP),
    farms: bool = typer.Option(True, "--farms/--no-farms", help="also compute FARMS alpha"),
    mp: bool = typer.Option(True, "--mp/--no-mp", help="also fit the Marchenko-Pastur bulk"),
    precision: str = typer.Option(
        "auto", "--precision", help="eigensolver dtype: auto (CPU float64, GPU float32), float64, float32"
    ),
    randomize: bool = typer.Option(
        False, "--randomize", help="also the element-wise shuffled ESD: its MP fit and correlation traps"
    ),
    seed: int = typer.Option(0, "--seed", help="shuffle seed for --randomize (numpy RandomState, as WW)"),
    fix_fingers: str | None = typer.Option(
        None,
        "--fix-fingers",
        help="clip_xmax: refit with the largest eigenvalues clipped off; xmin_peak: xmin near the ESD peak",
    ),
    fit: str = typer.Option(
        "PL",
        "--fit",
        help="PL (power law), TPL (truncated power law: adds Lambda) or E_TPL (TPL + xmin_peak)",
    ),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
) -> None:
    """Spectral metrics (alpha, norms, ranks, MP spikes, FARMS alpha) of every 2-D weight and conv kernel."""
    opt.choice(precision, "--precision", PRECISIONS)
    if fix_fingers is not None:
        opt.choice(fix_fingers, "--fix-fingers", ("clip_xmax", "xmin_peak"))
    opt.choice(fit, "--fit", ("PL", "TPL", "E_TPL"))
    if fit != "PL" and fix_fingers == "clip_xmax":
        raise WeightsmithError(f"--fit {fit} --fix-fingers clip_xmax: clip_xmax refits a power law only")
    dev = opt.device(device)
    from ..execute import resolve_device
    from ..linalg import warm_up_cuda

    warm_up_cuda(resolve_device(dev))  # CUDA start-up overlaps the imports below and opening the model
    from ..analyze import add_analysis, analyze_weights
    from ..report import Report

    store = _open(model, "MODEL")
    _selected(select, store)
    _check_outputs(json_out, html_out, force)
    result = analyze_weights(
        store,
        select=select,
        device=dev,
        farms=farms,
        name=model,
        mp_fit=mp,
        precision=precision,
        randomize=randomize,
        seed=seed,
        fix_fingers=fix_fingers,
        fit=fit,
    )
    if html_out is not None:
        report = Report(f"weightsmith analyze: {model}", subtitle=store.source)
        add_analysis(report, result)
        report.write(html_out, force=force)
        log(f"wrote {html_out}")
    _emit(result.to_json(), json_out, html_out, force)
    s = result.summary()
    log(
        f"{s['num_matrices']} matrices, mean alpha {s.get('mean_alpha')}, "
        f"{s['num_skipped']} skipped, {s['seconds']} s"
    )


@app.command("compare")
def compare_cmd(
    base: str = typer.Argument(..., metavar="BASE", help="the base (pre-trained) model"),
    other: str = typer.Argument(..., metavar="OTHER", help="the fine-tuned model"),
    json_out: Path | None = typer.Option(None, "--out", "--json", help=OUT_HELP.format("comparison")),
    html_out: Path | None = typer.Option(None, "--html", help=HTML_HELP),
    k: int = typer.Option(10, "--k", help="top singular vectors of OTHER examined (>= 1)"),
    epsilon: float = typer.Option(0.5, "--epsilon", help="intruder |cosine| threshold, in (0, 1)"),
    select: str | None = typer.Option(None, "--select", help=SELECT_HELP),
    device: str = typer.Option("auto", "--device", help=opt.DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="replace existing outputs"),
) -> None:
    """Intruder dimensions, subspace overlap and update size of OTHER relative to BASE, per matrix."""
    from ..analyze import add_comparison, compare_weights
    from ..report import Report

    if k < 1:
        raise WeightsmithError(f"--k {k}: must be at least 1 (the number of singular vectors examined)")
    if not (0.0 < epsilon < 1.0):
        raise WeightsmithError(
            f"--epsilon {epsilon}: must be strictly between 0 and 1 (a |cosine| threshold; at 0 nothing "
            "and at 1 everything would be an intruder)"
        )
    dev = opt.device(device)
    sb, so = _open(base, "BASE"), _open(other, "OTHER")
    _selected(select, sb)
    _check_outputs(json_out, html_out, force)
    result = compare_weights(sb, so, k=k, epsilon=epsilon, select=select, device=dev)
    if not result.matrices:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in result.skipped[:5])
        raise WeightsmithError(f"no 2-D weight could be compared between {base} and {other} ({reasons})")
    if html_out is not None:
        report = Report(f"weightsmith compare: {other} vs {base}")
        add_comparison(report, result)
        report.write(html_out, force=force)
        log(f"wrote {html_out}")
    _emit(result.to_json(), json_out, html_out, force)
    s = result.summary()
    log(f"{s['num_matrices']} matrices, {s['total_intruders']} intruders, {s['num_skipped']} skipped")


def _read_text(text: str) -> str:
    from .. import assets

    if text == "hamlet":
        return assets.load_text("hamlet")
    path = Path(text)
    if not path.is_file():
        raise WeightsmithError(f"--text {text}: not 'hamlet' and not an existing file")
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsmithError(f"--text {text}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise WeightsmithError(f"--text {text}: cannot read it: {exc.strerror or exc}") from exc
    if not body.strip():
        raise WeightsmithError(f"--text {text}: the file is empty")
    return body


@app.command("nuclear-norm")
def nuclear_norm_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="a causal LM: asset name, model directory or hub id"
    ),
    text: str = typer.Option("hamlet", "--text", help="'hamlet' (packaged) or a path to a UTF-8 text file"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="tokens per window (one forward pass), >= 2"),
    windows: int = typer.Option(8, "--windows", help="at most this many windows from the start, >= 1"),
    device: str = typer.Option("auto", "--device", help=opt.DEVICE_HELP),
    json_out: Path | None = typer.Option(None, "--out", "--json", help=OUT_HELP.format("result")),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Matrix Nuclear-Norm (Li et al., 2024) of the model's last hidden states on a text."""
    from .. import models
    from ..analyze import text_mnn
    from ..execute import resolve_device

    if max_tokens < 2:
        raise WeightsmithError(f"--max-tokens {max_tokens}: must be at least 2")
    if windows < 1:
        raise WeightsmithError(f"--windows {windows}: must be at least 1")
    dev = opt.device(device)
    body = _read_text(text)
    path = models.resolve(model)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise WeightsmithError(
            f"MODEL {model}: nuclear-norm runs the model, so it needs a model directory with config.json "
            "(an asset name, a Hugging Face directory or hub id), not a weights file"
        )
    _check_outputs(json_out, None, force)
    net, tokenizer = models.load_model(path, task="causal-lm")
    net.to(resolve_device(dev))
    try:
        result = text_mnn(net, tokenizer, body, max_tokens=max_tokens, max_windows=windows)
    except ValueError as exc:
        raise WeightsmithError(f"--text {text}: {exc}") from exc
    result = {"model": model, "text": text, "max_tokens": max_tokens, **result}
    _emit(result, json_out, None, force)
