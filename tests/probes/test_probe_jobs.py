# ruff: noqa: E501  (the probe table keeps one case per line)
"""Bad-input probes over ``merge``, ``export`` and ``compress`` written from the user's side (the owners of
those commands keep their own probe files; these cover what issue 7 lists for them): exit 2, a message naming
the file/tensor/option, no traceback, no model loaded, nothing written, a pre-existing output unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probes.harness import probe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("jobs-inputs")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    files = {"data": d, "base": d / "base.safetensors", "a": d / "a.safetensors", "b": d / "b.safetensors"}
    save_file(base, files["base"])
    save_file({k: v + 0.1 for k, v in base.items()}, files["a"])
    save_file({k: v - 0.1 for k, v in base.items()}, files["b"])
    files["odd"] = d / "odd.safetensors"
    save_file(
        {
            "layers.0.proj.weight": torch.randn(12, 9, generator=g),
            "layers.1.proj.weight": base["layers.1.proj.weight"],
        },
        files["odd"],
    )
    recipes = {
        "ok": "method: ties\ndensity: 0.5\nbase: {base}\nmodels:\n  - {a}\n  - {b}\n",
        "density_word": "method: ties\ndensity: high\nbase: {base}\nmodels:\n  - {a}\n  - {b}\n",
        "weight_list": "method: task_arithmetic\nbase: {base}\nmodels:\n  - model: {a}\n    weight: [1]\n  - {b}\n",
        "zero_weights": "method: average\nmodels:\n  - model: {a}\n    weight: 0\n  - model: {b}\n    weight: 0\n",
        "select_nothing": "method: ties\ndensity: 0.5\nbase: {base}\nmodels:\n  - {a}\n  - {b}\nselect: ['*.nothing']\n",
        "odd_shapes": "method: average\nmodels:\n  - {a}\n  - {odd}\n",
        "missing_model": "method: average\nmodels:\n  - {a}\n  - {data}/missing.safetensors\n",
        "unknown_method": "method: frankenmerge\nmodels:\n  - {a}\n  - {b}\n",
        "mk_density": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 1.5}}\n  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
    }
    for name, text in recipes.items():
        files[f"r_{name}"] = d / f"{name}.yaml"
        files[f"r_{name}"].write_text(text.format(**{k: v for k, v in files.items()}))
    files["r_latin1"] = d / "latin1.yaml"
    files["r_latin1"].write_bytes("method: ties  # caf\xe9\n".encode("latin-1"))
    files["r_list"] = d / "list.yaml"
    files["r_list"].write_text("- 1\n- 2\n")
    files["calib"] = d / "calib.bin"
    files["calib"].write_bytes(b"\xff\xfe\x00garbage")
    return files


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightsmith import models

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(models, "load_model", refuse)


# (id, command line, names ("|"-separated), watched output, files to create first). Placeholders: {out}
# a fresh directory, {null} os.devnull, and the inputs by key ({a}, {r_ok}, ...).
CASES: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    # --- merge
    ("merge-recipe-missing", "merge {data}/nope.yaml {out}/m", "nope.yaml", "{out}/m", ()),
    ("merge-recipe-not-utf8", "merge {r_latin1} {out}/m", "latin1.yaml", "{out}/m", ()),
    ("merge-recipe-not-a-mapping", "merge {r_list} {out}/m", "list.yaml", "{out}/m", ()),
    ("merge-density-word", "merge {r_density_word} {out}/m", "density", "{out}/m", ()),
    ("merge-weight-list", "merge {r_weight_list} {out}/m", "weight", "{out}/m", ()),
    ("merge-zero-weights", "merge {r_zero_weights} {out}/m", "weight", "{out}/m", ()),
    ("merge-select-nothing", "merge {r_select_nothing} {out}/m", "*.nothing", "{out}/m", ()),
    ("merge-shape-mismatch", "merge {r_odd_shapes} {out}/m", "layers.0.proj.weight", "{out}/m", ()),
    ("merge-model-missing", "merge {r_missing_model} {out}/m", "missing.safetensors", "{out}/m", ()),
    ("merge-unknown-method", "merge {r_unknown_method} {out}/m", "frankenmerge", "{out}/m", ()),
    ("merge-mergekit-density", "merge {r_mk_density} {out}/m", "density", "{out}/m", ()),
    ("merge-device-tpu", "merge {r_ok} {out}/m --device tpu", "--device|tpu", "{out}/m", ()),
    ("merge-dtype", "merge {r_ok} {out}/m --dtype int7", "--dtype|int7", "{out}/m", ()),
    ("merge-shard-size-word", "merge {r_ok} {out}/m --shard-size big", "--shard-size", "{out}/m", ()),
    ("merge-shard-size-zero", "merge {r_ok} {out}/m --shard-size 0", "--shard-size", "{out}/m", ()),
    ("merge-out-devnull", "merge {r_ok} {null} --force", "{null}", "{null}", ()),
    ("merge-out-exists", "merge {r_ok} {out}/m", "--force", "{out}/m", ("m/", "m/x")),
    ("merge-out-is-file", "merge {r_ok} {out}/m --force", "{out}/m", "{out}/m", ("m",)),
    ("merge-two-outs", "merge {r_ok} {out}/m --out {out}/n", "--out", "{out}/m", ()),
    ("merge-no-out", "merge {r_ok}", "OUT", "", ()),
    # --- export
    ("export-source-missing", "export {out}/run --out {out}/e", "run", "{out}/e", ()),
    ("export-not-a-run", "export {data} --out {out}/e", "jobs-inputs", "{out}/e", ()),
    ("export-format", "export {data} --out {out}/e --format gguf", "--format|gguf", "{out}/e", ()),
    ("export-out-devnull", "export {data} --out {null} --force", "jobs-inputs", "{null}", ()),
    (
        "export-merged-and-peft",
        "export {data} --merged {out}/e --peft {out}/f",
        "--merged|--peft",
        "{out}/e",
        (),
    ),
    # --- compress
    ("compress-bits-low", "compress smollm2 --method gptq --out {out}/c --bits 1", "--bits", "{out}/c", ()),
    ("compress-bits-high", "compress smollm2 --method gptq --out {out}/c --bits 9", "--bits", "{out}/c", ()),
    ("compress-group-size", "compress smollm2 --method gptq --out {out}/c --group-size -1", "--group-size", "{out}/c", ()),
    ("compress-samples", "compress smollm2 --method gptq --out {out}/c --samples 0", "--samples", "{out}/c", ()),
    ("compress-format", "compress smollm2 --method gptq --out {out}/c --format zip", "--format|zip", "{out}/c", ()),
    ("compress-device", "compress smollm2 --method gptq --out {out}/c --device tpu", "--device|tpu", "{out}/c", ()),
    (
        "compress-calib-missing",
        "compress smollm2 --method gptq --out {out}/c --calib {out}/none.txt",
        "none.txt",
        "{out}/c",
        (),
    ),
    ("compress-calib-not-text", "compress smollm2 --method gptq --out {out}/c --calib {calib}", "calib.bin", "{out}/c", ()),
    ("compress-out-devnull", "compress smollm2 --method gptq --out {null} --force", "{null}", "{null}", ()),
    ("compress-method", "compress smollm2 --method zip --out {out}/c", "--method|zip", "{out}/c", ()),
    ("compress-out-exists", "compress smollm2 --method gptq --out {out}/c", "--force", "{out}/c", ("c/", "c/x")),
]  # fmt: skip


def _fill(text: str, files: dict[str, Path], out: Path) -> str:
    return text.format(out=out, null=os.devnull, **{k: str(v) for k, v in files.items()})


@pytest.mark.usefixtures("no_model_loading")
@pytest.mark.parametrize(
    ("command", "names", "out", "pre"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_probe(
    data: dict[str, Path], tmp_path: Path, command: str, names: str, out: str, pre: tuple[str, ...]
) -> None:
    for name in pre:  # "d/" makes a directory, anything else a file
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("precious\n")
    args = [_fill(a, data, tmp_path) for a in command.split()]
    names_ = [_fill(n, data, tmp_path) for n in names.split("|")]
    probe(args, names_, out=_fill(out, data, tmp_path) or None, watch=[data["data"]])
