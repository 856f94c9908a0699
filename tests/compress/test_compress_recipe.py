"""A recipe's ``compress:`` steps: the output equals the direct ``ws.compress`` result and loads; steps
chain on one model; bad steps are refused (naming step and option) before any model loads or is written."""

from __future__ import annotations

import pytest
import torch
from test_compress_cli import _run as _main  # weightsmith ARGS as the console script runs it
from typer.testing import CliRunner

import weightsmith.cli.recipe  # noqa: F401  (registers the command)
from weightsmith.cli._app import app
from weightsmith.compress import GPTQ, RTN, Magnitude, calibration_batches, compress, load_compressed
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model
from weightsmith.recipe import load_steps, run_recipe, step_kinds

torch.set_num_threads(1)
runner = CliRunner()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)


def test_gptq_step_equals_direct_compress_and_loads(tiny_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"model: {tiny_dir}\n"
        "steps:\n"
        "  - compress:\n"
        "      method: gptq\n"
        "      bits: 4\n"
        "      group_size: 32\n"
        "      damp: 0.02\n"
        "      calib: hamlet\n"
        "      samples: 4\n"
        "      seq_len: 32\n"
        "      format: compressed-tensors\n"
        "      out: q\n"
    )
    res = runner.invoke(app, ["recipe", str(tmp_path / "r.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "step 1 (compress): 14 layers quantised" in " ".join(res.output.split())
    net, tok = load_model(tiny_dir)
    compress(net, GPTQ(bits=4, group_size=32, damp=0.02), calib=calibration_batches(tok, "hamlet", 4, 32))
    _same(_weights(load_compressed(tmp_path / "q")), _weights(net))
    assert (tmp_path / "q" / "tokenizer.json").is_file()


def test_steps_chain_on_one_model_unless_a_step_names_its_own(tiny_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"model: {tiny_dir}\n"
        "steps:\n"
        "  - compress: {method: magnitude, sparsity: 0.5, format: dense, out: pruned}\n"
        "  - compress: {method: rtn, bits: 4, group_size: 32, out: pruned-rtn}\n"
        f"  - compress: {{model: {tiny_dir}, method: rtn, bits: 3, group_size: 0, format: weightsmith, "
        "out: rtn3}\n"
    )
    lines = run_recipe(tmp_path / "r.yaml")
    assert [ln.split(":")[0] for ln in lines] == [
        "step 1 (compress)",
        "step 2 (compress)",
        "step 3 (compress)",
    ]
    net, _ = load_model(tiny_dir)
    compress(net, Magnitude(sparsity=0.5))
    _same(_weights(load_compressed(tmp_path / "pruned")), _weights(net))
    compress(net, RTN(bits=4, group_size=32))  # step 2 went on from step 1's model
    _same(_weights(load_compressed(tmp_path / "pruned-rtn")), _weights(net))
    base, _ = load_model(tiny_dir)
    compress(base, RTN(bits=3, group_size=0))  # step 3 loaded its own model afresh
    _same(_weights(load_compressed(tmp_path / "rtn3")), _weights(base))


def test_paths_are_taken_from_the_recipe_folder(tiny_dir, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "text.txt").write_text("to be or not to be, that is the question. " * 200)
    (folder / "r.yaml").write_text(
        f"model: {tiny_dir}\nsteps:\n  - compress: {{method: wanda, calib: text.txt, samples: 2, "
        "seq_len: 16, format: dense, out: ../w}\n"
    )
    recipe = load_steps(folder / "r.yaml")
    step = recipe.steps[0].step
    assert step.calib == str(folder / "text.txt") and step.out == folder / "../w"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "steps,message",
    [
        ("  - compress: {method: rtn, out: a}\n  - compress: {method: gptq, dmp: 1, out: b}\n",
         "step 2 (compress): compress method 'gptq' has no option 'dmp'"),
        ("  - compress: {method: rtn}\n", "step 1 (compress): 'out' (the output directory) is"),
        ("  - compress: {method: rtn, group_size: 32, out: a}\n  - compress: {method: rtn, out: a}\n",
         "step 2 (compress): 'out' a is step 1's output too"),
        ("  - prune: {method: wanda, out: a}\n", "step 1: unknown step kind 'prune'; known: compress"),
        ("  - compress: {method: nope, out: a}\n", "--method nope: unknown"),
        ("  - compress: {method: rtn, bits: 9, out: a}\n", "step 1 (compress): --bits 9"),
        ("  - compress: {method: svd, format: compressed-tensors, out: a}\n", "no layout for low-rank"),
        ("  - compress: {method: gptq, calib: missing.txt, out: a}\n", "--calib missing.txt: not a packaged"),
        ("  - compress: {method: gptq, samples: many, out: a}\n", "'samples' must be a whole number"),
        ("  - compress: [rtn]\n", "step 1 (compress): expected a mapping"),
        ("  - compress: {bits: 4, out: a}\n", "step 1 (compress): 'method' is required; known: armor, asvd"),
        ("  - {compress: {method: rtn, out: a}, merge: {}}\n", "a step is one mapping"),
        ("  - []\n", "a step is one mapping"),
    ],
)  # fmt: skip
def test_bad_steps_are_refused_before_anything_loads_or_is_written(tiny_dir, tmp_path, steps, message):
    (tmp_path / "r.yaml").write_text(f"model: {tiny_dir}\nsteps:\n{steps}")
    with pytest.raises(WeightsmithError) as err:
        run_recipe(tmp_path / "r.yaml")
    assert message in " ".join(str(err.value).split())
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("steps: []\n", "a mapping with a non-empty 'steps' list"),
        ("model: m\nsteps:\n  - compress: {method: rtn, out: a}\nseed: 1\n", "unknown key 'seed'"),
        ("steps:\n  - compress: {method: rtn, out: a}\n", "step 1 (compress): no model"),
        ("model: [a]\nsteps:\n  - compress: {method: rtn, out: a}\n", "'model' must be a packaged name"),
    ],
)
def test_bad_recipe_files(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(WeightsmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_steps(tmp_path / "r.yaml")


def test_existing_output_is_refused_unless_forced_and_cli_exits_2(tiny_dir, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "r.yaml").write_text(f"model: {tiny_dir}\nsteps:\n  - compress: {{method: rtn, out: a}}\n")
    assert _main(["recipe", str(tmp_path / "r.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_steps(tmp_path / "r.yaml", force=True).steps[0].kind == "compress"
    assert "compress" in step_kinds()
    assert _main(["recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
