# ruff: noqa: E501  (the probe table keeps one case per line)
"""Bad-input probes over the analyze, compare, nuclear-norm, align, barrier, zoo-train, signature, assets and
demo commands: every one must exit 2 with a message naming the culprit, print no traceback, and leave the
file system as it was (see ``harness.py``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probes.harness import probe

torch.set_num_threads(1)


@dataclass
class Env:
    """Small inputs shared by the probes (built once per module) and a fresh output directory per probe."""

    data: Path  # read-only inputs
    out: Path  # a fresh, empty directory for outputs

    def __getattr__(self, name: str) -> Path:  # env.base -> data/base.safetensors etc.
        return self.__dict__["files"][name]


def _zoo(path: Path, width: int, seed: int) -> None:
    from weightsmith import zoo

    torch.manual_seed(seed)
    zoo.save(zoo.make_model("mlp", zoo.load_task("digits"), width=width, depth=2), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    d = tmp_path_factory.mktemp("probe-inputs")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.proj.weight": torch.randn(24, 16, generator=g) for i in range(2)}
    base["norm.weight"] = torch.ones(16)
    files = {"base": d / "base.safetensors", "tuned": d / "tuned.safetensors", "wide": d / "wide.safetensors"}
    save_file(base, files["base"])
    save_file({k: v + 0.01 for k, v in base.items()}, files["tuned"])
    save_file({"layers.0.proj.weight": torch.randn(24, 20, generator=g)}, files["wide"])
    files["garbage"] = d / "garbage.safetensors"
    files["garbage"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    files["empty_dir"] = d / "empty-model"
    files["empty_dir"].mkdir()
    files["za"], files["zb"], files["zwide"] = (
        d / "za.safetensors",
        d / "zb.safetensors",
        d / "zw.safetensors",
    )
    _zoo(files["za"], 8, 1)
    _zoo(files["zb"], 8, 2)
    _zoo(files["zwide"], 12, 3)
    files["zbadmeta"] = d / "zbadmeta.safetensors"
    save_file(base, files["zbadmeta"], metadata={"weightsmith.zoo": "{not json"})
    files["zhuge"] = d / "zhuge.safetensors"
    huge = {"kind": "mlp", "in_dim": 64, "hidden": [1 << 40], "n_classes": 10}
    save_file(base, files["zhuge"], metadata={"weightsmith.zoo": json.dumps(huge)})
    files["zmismatch"] = d / "zmismatch.safetensors"
    fake = {"kind": "mlp", "in_dim": 64, "hidden": [8, 8], "n_classes": 10}
    save_file(base, files["zmismatch"], metadata={"weightsmith.zoo": json.dumps(fake)})
    files["latin1"] = d / "latin1.txt"
    files["latin1"].write_bytes("caf\xe9 au lait".encode("latin-1"))
    files["blank"] = d / "blank.txt"
    files["blank"].write_text("  \n")
    files["nosig"] = d / "not-a-signature"
    files["nosig"].mkdir()
    files["badsig"] = d / "bad-signature"
    files["badsig"].mkdir()
    (files["badsig"] / "signature.json").write_text("{truncated")
    save_file({"x::d": torch.zeros(2, dtype=torch.int8)}, files["badsig"] / "signature.safetensors")
    return d, files


@pytest.fixture
def env(data: tuple[Path, dict[str, Path]], tmp_path: Path) -> Env:
    e = Env(data[0], tmp_path)
    e.__dict__["files"] = data[1]
    return e


# (id, command line, names, watched output, files to create first (content "precious")). Placeholders:
# {out} a fresh directory, {o} = {out}/o.json, {data} the inputs' directory, {null} os.devnull, and the
# input files of ``data`` by key ({base}, {za}, ...). Names are separated by "|".
CASES: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    # --- analyze
    ("analyze-missing-model", "analyze {data}/nope.safetensors --out {o}", "nope.safetensors", "{o}", ()),
    ("analyze-empty-dir", "analyze {empty_dir} --out {o}", "empty-model", "{o}", ()),
    ("analyze-garbage-file", "analyze {garbage} --out {o}", "garbage.safetensors", "{o}", ()),
    ("analyze-device-tpu", "analyze {base} --device tpu --out {o}", "--device|tpu", "{o}", ()),
    ("analyze-device-junk", "analyze {base} --device cuda:x --out {o}", "--device|cuda:x", "{o}", ()),
    ("analyze-precision", "analyze {base} --precision float16 --out {o}", "--precision|float16", "{o}", ()),
    ("analyze-select-nothing", "analyze {base} --select *.nothing --out {o}", "--select|*.nothing", "{o}", ()),
    ("analyze-select-one-typo", "analyze {base} --select *.proj,*.porj --out {o}", "*.porj", "{o}", ()),
    ("analyze-select-bad-regex", "analyze {base} --select re:[ --out {o}", "re:[", "{o}", ()),
    ("analyze-select-empty", "analyze {base} --select , --out {o}", "--select", "{o}", ()),
    ("analyze-out-exists", "analyze {base} --out {o}", "{o}|--force", "{o}", ("o.json",)),
    ("analyze-json-alias-exists", "analyze {base} --json {o}", "{o}|--force", "{o}", ("o.json",)),
    ("analyze-out-parent-is-file", "analyze {base} --out {out}/f/o.json", "{out}/f", "{out}/f/o.json", ("f",)),
    ("analyze-out-is-dir", "analyze {base} --out {out}/d --force", "{out}/d|directory", "{out}/d", ("d/",)),
    ("analyze-html-stdout", "analyze {base} --html -", "--html", "", ()),
    ("analyze-same-output-twice", "analyze {base} --out {out}/r --html {out}/r", "same output", "{out}/r", ()),
    # --- compare
    ("compare-k-zero", "compare {base} {tuned} --k 0 --out {o}", "--k", "{o}", ()),
    ("compare-k-negative", "compare {base} {tuned} --k -3 --out {o}", "--k", "{o}", ()),
    ("compare-k-not-int", "compare {base} {tuned} --k ten", "--k", "", ()),
    *[
        (f"compare-epsilon-{v}", f"compare {{base}} {{tuned}} --epsilon {v} --out {{o}}", "--epsilon", "{o}", ())
        for v in ("0", "1", "1.5", "-0.1", "nan", "inf")
    ],
    ("compare-other-missing", "compare {base} {out}/gone --out {o}", "gone", "{o}", ()),
    ("compare-device-tpu", "compare {base} {tuned} --device tpu", "--device|tpu", "", ()),
    ("compare-select-nothing", "compare {base} {tuned} --select *.attn --out {o}", "*.attn", "{o}", ()),
    ("compare-nothing-comparable", "compare {base} {wide} --out {o}", "shape mismatch", "{o}", ()),
    # --- nuclear-norm (options and the text are checked before the model is loaded)
    ("mnn-text-missing", "nuclear-norm minilm --text {out}/t.txt", "t.txt", "{out}/t.txt", ()),
    ("mnn-text-not-utf8", "nuclear-norm minilm --text {latin1}", "latin1.txt|UTF-8", "", ()),
    ("mnn-text-blank", "nuclear-norm minilm --text {blank}", "blank.txt", "", ()),
    ("mnn-text-dir", "nuclear-norm minilm --text {data}", "--text", "", ()),
    ("mnn-max-tokens", "nuclear-norm minilm --max-tokens 1", "--max-tokens", "", ()),
    ("mnn-windows", "nuclear-norm minilm --windows 0", "--windows", "", ()),
    ("mnn-device", "nuclear-norm minilm --device tpu", "--device", "", ()),
    ("mnn-weights-file", "nuclear-norm {base} --out {o}", "base.safetensors|config.json", "{o}", ()),
    ("mnn-out-exists", "nuclear-norm minilm --out {o}", "--force", "{o}", ("o.json",)),
    # --- align
    ("align-different-archs", "align {za} {zwide} --out {out}/b.safetensors",
     "different architectures|tensor 'net.", "{out}/b.safetensors", ()),
    ("align-missing-b", "align {za} {out}/nob --out {out}/b.safetensors", "nob", "{out}/b.safetensors", ()),
    ("align-spec", "align {za} {zb} --spec resnet --out {out}/b", "--spec|resnet", "{out}/b", ()),
    ("align-seed", "align {za} {zb} --seed -1 --out {out}/b", "--seed", "{out}/b", ()),
    ("align-out-devnull", "align {za} {zb} --out {null} --force", "{null}|special file", "{null}", ()),
    ("align-out-stdout", "align {za} {zb} --out -", "--out -", "", ()),
    ("align-out-exists", "align {za} {zb} --out {out}/b.safetensors", "--force", "{out}/b.safetensors",
     ("b.safetensors",)),
    ("align-dir-out-is-file", "align {za} {zb} --out {out}/b --force", "{out}/b|a file", "{out}/b", ("b",)),
    # --- barrier
    *[
        (f"barrier-points-{v}", f"barrier {{za}} {{zb}} --points {v} --out {{o}}", "--points", "{o}", ())
        for v in ("1", "0", "-4", "100000")
    ],
    ("barrier-task", "barrier {za} {zb} --task cifar", "--task|cifar", "", ()),
    ("barrier-task-mismatch", "barrier {za} {zb} --task mnist1d --out {o}", "za.safetensors|--task mnist1d",
     "{o}", ()),
    ("barrier-not-zoo", "barrier {base} {zb}", "base.safetensors|weightsmith.zoo", "", ()),
    ("barrier-missing", "barrier {za} {out}/zz.safetensors", "zz.safetensors", "", ()),
    ("barrier-garbage", "barrier {garbage} {zb}", "garbage.safetensors", "", ()),
    ("barrier-bad-metadata", "barrier {zbadmeta} {zb}", "zbadmeta.safetensors", "", ()),
    ("barrier-huge-metadata", "barrier {zhuge} {zb}", "zhuge.safetensors|hidden", "", ()),
    ("barrier-metadata-mismatch", "barrier {zmismatch} {zb}", "zmismatch.safetensors|net.0.weight", "", ()),
    ("barrier-different-archs", "barrier {za} {zwide}", "different architectures", "", ()),
    ("barrier-html-stdout", "barrier {za} {zb} --html -", "--html", "", ()),
    ("barrier-out-exists", "barrier {za} {zb} --out {o}", "--force", "{o}", ("o.json",)),
    # --- zoo-train (checked before any training)
    *[
        (f"zoo-train{opt}{v}", f"zoo-train --out {{out}}/m.safetensors {opt} {v}", opt, "{out}/m.safetensors", ())
        for opt, v in (("--width", "0"), ("--width", "-5"), ("--epochs", "0"), ("--seed", "-1"),
                       ("--kind", "rnn"), ("--task", "cifar"), ("--variant", "spin"), ("--width", "99999999"))
    ],
    ("zoo-train-suffix", "zoo-train --out {out}/m.pt", "m.pt|.safetensors", "{out}/m.pt", ()),
    ("zoo-train-no-out", "zoo-train", "--out", "", ()),
    ("zoo-train-two-outs", "zoo-train {out}/a.safetensors --out {out}/b.safetensors",
     "a.safetensors|b.safetensors", "{out}/a.safetensors", ()),
    ("zoo-train-exists", "zoo-train {out}/m.safetensors", "--force", "{out}/m.safetensors", ("m.safetensors",)),
    # --- signature
    *[
        (f"sig-extract{opt}{v}", f"signature extract {{za}} {{zb}} --out {{out}}/sig {opt} {v}", opt, "{out}/sig", ())
        for opt, v in (("--bits", "1"), ("--bits", "9"), ("--rank", "0"), ("--layers", "0"))
    ],
    ("sig-extract-archs", "signature extract {za} {zwide} --out {out}/sig", "different architectures",
     "{out}/sig", ()),
    ("sig-extract-missing", "signature extract {za} {out}/clean --out {out}/sig", "clean", "{out}/sig", ()),
    ("sig-extract-out-file", "signature extract {za} {zb} --out {out}/sig --force", "{out}/sig", "{out}/sig",
     ("sig",)),
    ("sig-extract-out-devnull", "signature extract {za} {zb} --out {null} --force", "{null}", "{null}", ()),
    ("sig-apply-missing-sig", "signature apply {za} {out}/nosig --out {out}/p.safetensors", "nosig", "{out}/p.safetensors", ()),
    ("sig-apply-empty-sig", "signature apply {za} {nosig} --out {out}/p.safetensors", "not-a-signature",
     "{out}/p.safetensors", ()),
    ("sig-apply-corrupt-sig", "signature apply {za} {badsig} --out {out}/p.safetensors", "bad-signature",
     "{out}/p.safetensors", ()),
    *[
        (f"sig-apply-strength-{v}", f"signature apply {{za}} {{badsig}} --out {{out}}/p.safetensors --strength {v}",
         "--strength", "{out}/p.safetensors", ())
        for v in ("nan", "inf", "0")
    ],
    ("sig-remove-not-a-signature", "signature remove {za} {nosig} --out {out}/r.safetensors", "not-a-signature",
     "{out}/r.safetensors", ()),
    ("sig-remove-strength-nan", "signature remove {za} {badsig} --out {out}/r.safetensors --strength nan",
     "--strength", "{out}/r.safetensors", ()),
    # --- assets, demo, the root command
    ("assets-extra-arg", "assets minilm", "minilm", "", ()),
    ("assets-bad-option", "assets --json", "--json", "", ()),
    ("demo-device", "demo --device tpu --out {out}/demo", "--device|tpu", "{out}/demo", ()),
    ("demo-out-devnull", "demo --out {null} --force", "{null}", "{null}", ()),
    ("demo-out-stdout", "demo --out -", "--out", "", ()),
    ("demo-out-file", "demo --out {out}/demo --force", "{out}/demo", "{out}/demo", ("demo",)),
    ("demo-out-nonempty", "demo --out {out}/d", "--force", "{out}/d", ("d/", "d/x")),
    ("root-unknown-command", "analyse minilm", "analyse", "", ()),
    ("root-unknown-option", "--verbose", "--verbose", "", ()),
]  # fmt: skip


@pytest.fixture
def nothing_heavy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused command must not get as far as loading a model or training one."""
    from weightsmith import models, zoo

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded or trained before the command line was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(zoo, "train_model", refuse)


def _fill(text: str, env: Env) -> str:
    keys = {k: str(v) for k, v in env.__dict__["files"].items()}
    return text.format(out=env.out, o=env.out / "o.json", data=env.data, null=os.devnull, **keys)


@pytest.mark.parametrize(
    ("command", "names", "out", "pre"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.usefixtures("nothing_heavy")
def test_probe(env: Env, command: str, names: str, out: str, pre: tuple[str, ...]) -> None:
    for name in pre:  # "d/" makes a directory, anything else a file
        if name.endswith("/"):
            (env.out / name).mkdir()
        else:
            (env.out / name).write_text("precious\n")
    args = [_fill(a, env) for a in command.split()]
    probe(args, [_fill(n, env) for n in names.split("|")], out=_fill(out, env) or None, watch=[env.data])


def _existing(e: Env, name: str = "o.json") -> Path:
    p = e.out / name
    p.write_text("precious\n")
    return p


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["analyze", "demo"])
def test_probe_cuda_absent(env: Env, command: str) -> None:
    args = [command, str(env.base)] if command == "analyze" else [command]
    probe(
        [*args, "--device", "cuda", "--out", str(env.out / "o")], ["--device cuda", "CUDA"], out=env.out / "o"
    )


def test_probe_cuda_index_out_of_range(env: Env) -> None:
    probe(["analyze", str(env.base), "--device", "cuda:99"], ["--device cuda:99"], watch=[env.data])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_probe_read_only_output_directory(env: Env) -> None:
    ro = env.out / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe(["analyze", str(env.base), "--out", str(ro / "o.json")], [str(ro)], out=ro / "o.json")
    finally:
        ro.chmod(0o755)


def test_probe_through_main_in_a_subprocess(env: Env) -> None:
    """The real entry point: rich's stderr console, exit code 2, no wrapping of a long path, no traceback."""
    long = env.out / ("x" * 120) / "o.json"
    probe(["analyze", str(env.base), "--device", "tpu", "--out", str(long)], ["--device tpu"], out=long,
          subprocess=True)  # fmt: skip
    existing = _existing(env)
    res = probe(["analyze", str(env.data / "[3, 4]" / "m.safetensors"), "--out", str(existing)],
                ["[3, 4]/m.safetensors"], out=existing, subprocess=True)  # fmt: skip
    assert "error:" in res.output


def test_interrupted_demo_leaves_no_debris_and_keeps_the_old_output(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of `demo`: the staging directory goes, an existing --out stays as it was."""
    import weightsmith.cli.demo as demo

    def interrupted(report: object, out: Path, device: str | None) -> dict:
        (out / "analyze-minilm.json").write_text("{}")  # some work already written into the staging
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_analyze", interrupted)
    old = env.out / "demo"
    old.mkdir()
    (old / "report.html").write_text("the previous demo\n")
    probe(["demo", "--out", str(old), "--force", "--device", "cpu"], [], out=old, exit_code=130)
    assert (old / "report.html").read_text() == "the previous demo\n"


def test_demo_builds_in_one_staging_dir_and_swaps_it_in(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's steps write into the staging directory; the old --out is replaced only at the end."""
    import weightsmith.cli.demo as demo
    from probes.harness import run_cli

    seen: list[Path] = []

    def step(report: object, out: Path, *rest: object) -> list:
        seen.append(out)
        assert out.name.startswith(".demo.ws-staging-") and out.parent == env.out
        assert (env.out / "demo" / "old.txt").is_file(), "the old output stays until the new one is complete"
        (out / f"step{len(seen)}.json").write_text("{}")
        return []

    for name in ("_analyze", "_adapt", "_merge"):
        monkeypatch.setattr(demo, name, step)
    (env.out / "demo").mkdir()
    (env.out / "demo" / "old.txt").write_text("old")
    res = run_cli(["demo", "--out", str(env.out / "demo"), "--force", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (env.out / "demo").iterdir()) == [
        "report.html", "step1.json", "step2.json", "step3.json", "summary.json"
    ]  # fmt: skip
    assert [p.name for p in env.out.iterdir()] == ["demo"], "no staging debris"
