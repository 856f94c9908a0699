"""``weightsmith demo``: the main job on the packaged default models and data, in one HTML report.

1. analyze: spectra of every 2-D weight of MiniLM and SmolLM2;
2. adapt: LoRA on MiniLM for two packaged tasks (against a frozen-encoder baseline), and the intruder
   dimensions the adaptation left in the weights;
3. merge: the two adapted encoders merged by task arithmetic and TIES, each task scored with its own head.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from ..errors import WeightsmithError
from ..progress import log
from . import _options as opt
from ._app import app

TASKS = ("rotten_tomatoes", "debates")


def _analyze(report: Any, out: Path, device: str | None) -> dict[str, Any]:
    from .. import models
    from ..analyze import add_analysis, analyze_weights

    summaries = {}
    for spec in ("minilm", "smollm2"):
        log(f"[bold]analyze[/] {spec}")
        result = analyze_weights(models.open_weights(spec), device=device, name=spec)
        # ``out`` is the demo's private staging directory: plain writes inside it are staged with it
        (out / f"analyze-{spec}.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        add_analysis(report, result, title=f"Spectra of {spec}")
        summaries[spec] = result.summary()
    return summaries


def _adapt(report: Any, out: Path, quick: bool, device: str | None) -> list[dict[str, Any]]:
    from ..adapters.lora import LoRA
    from ..analyze import add_comparison, compare_weights
    from ..store import open_store
    from ..train import export_run_merged, finetune

    n_train, n_eval = (300, 200) if quick else (800, 400)
    rows = []
    for task in TASKS:
        for label, adapter, epochs in (("head only", "head", 2), ("LoRA r8", LoRA(rank=8, alpha=16), 2)):
            log(f"[bold]adapt[/] minilm on {task}: {label}")
            kind = "head" if adapter == "head" else "lora"
            run_dir = out / f"adapt-{task}-{kind}"
            res = finetune(model="minilm", task=task, adapter=adapter, out=run_dir, force=True,
                           max_examples=n_train, eval_examples=n_eval, epochs=epochs, batch_size=32,
                           device=device or "auto")  # fmt: skip
            rows.append({"task": task, "method": label, "trainable": res.trainable_params,
                         "accuracy": res.metric, "seconds": round(res.train_time_s, 1)})  # fmt: skip
            if kind == "lora":
                export_run_merged(run_dir, out / f"merged-{task}", force=True)
    report.section(
        "Adapt: LoRA on MiniLM",
        f"MiniLM with a mean-pooling classification head, trained on {n_train} examples per task and scored "
        f"on {n_eval} test examples. 'head only' trains just the head on the frozen encoder.",
    )
    columns = ["task", "method", "trainable params", "test accuracy", "train s"]
    report.table(
        columns, [[r["task"], r["method"], r["trainable"], r["accuracy"], r["seconds"]] for r in rows]
    )
    from .. import models

    base = models.open_weights("minilm")
    tuned = open_store(out / f"merged-{TASKS[0]}")
    comparison = compare_weights(base, tuned, select=r"re:encoder\.layer\.", device=device)
    add_comparison(report, comparison, title=f"Intruder dimensions left by LoRA ({TASKS[0]})")
    return rows


def _merge(report: Any, out: Path, quick: bool, device: str | None) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    from .. import models
    from ..merge.recipe import MergeMethod, merge, merge_method
    from ..merge.task_arithmetic import TIES, TaskArithmetic
    from ..tasks import SentenceClassifier, get_task

    n_eval = 200 if quick else 400
    tuned = [out / f"merged-{t}" for t in TASKS]
    methods: dict[str, tuple[str, MergeMethod]] = {
        "task arithmetic (lambda=1)": ("task_arithmetic", merge_method(TaskArithmetic(scaling=1.0))),
        "TIES (density 0.2)": ("ties", merge_method(TIES(density=0.2))),
    }
    encoders: dict[str, Path] = {f"fine-tuned on {t}": tuned[i] for i, t in enumerate(TASKS)}
    for label, (slug, method) in methods.items():
        log(f"[bold]merge[/] {label}")
        dest = out / f"merge-{slug}"
        merge(tuned, method, dest, base=models.resolve("minilm"), force=True, device=device or "cpu")
        encoders[label] = dest
    tasks = {task: get_task(task, eval_examples=n_eval) for task in TASKS}
    heads = {task: load_file(str(out / f"adapt-{task}-lora" / "head.safetensors")) for task in TASKS}
    rows = []
    for label, path in encoders.items():
        row: dict[str, Any] = {"encoder": label}
        encoder, tok = models.load_model(path, task="encoder")  # one load per encoder, shared by the tasks
        for task, t in tasks.items():
            net = SentenceClassifier(encoder, len(t.dataset.classes))
            net.head.load_state_dict(heads[task])
            with torch.no_grad():
                row[task] = t.evaluate(net, tok, split="test")
        rows.append(row)
    report.section(
        "Merge: one encoder for both tasks",
        "The two LoRA-adapted encoders (LoRA merged into the weights) merged in weight space; each task is "
        "scored with its own trained head on the merged encoder.",
    )
    report.table(["encoder", *TASKS], [[r["encoder"], *[r[t] for t in TASKS]] for r in rows])
    return rows


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="output directory (report, JSON, checkpoints)"),
    quick: bool = typer.Option(False, "--quick", help="smaller training and evaluation subsets"),
    device: str = typer.Option("auto", "--device", help=opt.DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="replace an existing --out directory"),
) -> None:
    """Analyze the packaged MiniLM and SmolLM2, adapt MiniLM on two tasks, merge the results: one report.

    Everything is built in one hidden staging directory beside ``--out`` and swapped in when complete; an
    interrupted demo leaves nothing behind, and an existing ``--out`` stays until the new one is done."""
    import torch

    from ..report import Report
    from ..staging import Staging

    dev = opt.device(device)
    if str(out) == "-":
        raise WeightsmithError("--out -: the demo writes a directory; give a directory path")
    if out.is_dir() and not any(out.iterdir()):
        force = True  # an empty directory holds nothing to lose
    opt.outputs(force, ("--out", out), directory=True)
    if torch.get_num_threads() > 2:
        torch.set_num_threads(2)
    start = time.perf_counter()
    with Staging(out, force, directory=True) as staging:
        work = staging.path
        report = Report(
            "weightsmith demo", subtitle="packaged MiniLM and SmolLM2; Rotten Tomatoes and 2016 debates"
        )
        summary: dict[str, Any] = {"analyze": _analyze(report, work, dev)}
        summary["adapt"] = _adapt(report, work, quick, dev)
        summary["merge"] = _merge(report, work, quick, dev)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (work / "report.html").write_text(report.to_html(), encoding="utf-8")
    typer.echo(f"report: {(out / 'report.html').resolve()}")
    typer.echo(f"summary: {(out / 'summary.json').resolve()} ({summary['seconds']} s)")
